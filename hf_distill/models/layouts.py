"""Tensors out of module outputs, their layouts and conversions (used by the taps, FitNets, BYOT, SFTN).

Module outputs
    :func:`feature_tensor` takes the tensor out of whatever a module returns: the tensor itself,
    the first tensor of a tuple/list, or ``last_hidden_state`` (else the first tensor value) of a
    transformers ``ModelOutput`` / dict.

Layouts
    Every tapped tensor has one of these layouts:

    ``"nchw"``   feature maps ``[B, C, H, W]`` (CNNs);
    ``"nhwc"``   channels-last maps ``[B, H, W, C]`` (timm Swin / SwinV2 / MambaOut / Sequencer /
                 Hiera stages, the inside of ConvNeXt blocks);
    ``"tokens"`` sequences ``[B, N, C]`` (ViT / DeiT / BEiT blocks, transformers Swin), possibly
                 starting with prefix tokens (class, distillation, register tokens), see
                 :func:`num_prefix_tokens`;
    ``"vector"`` pooled features ``[B, C]``.

How the layout is decided (:func:`hf_distill.models.taps.infer_layout`), first rule that applies wins:

    1. a user override ``{layer name: layout}`` (``FeatureTaps(..., layouts=...)``,
       ``infer_layout(..., overrides=...)``) always wins;
    2. the number of dimensions: 2-D -> ``"vector"``, 3-D -> ``"tokens"``; only 4-D tensors go on;
    3. a module that declares its format is believed: timm's ``output_fmt`` (``"NHWC"`` /
       ``"NCHW"``, e.g. timm ``PatchEmbed``) or transformers' ``data_format``
       (``"channels_last"`` / ``"channels_first"``, e.g. ``ConvNextLayerNorm``);
    4. channels-first operators give ``"nchw"``: convolutions, batch/group/instance norms,
       2-D pooling, and any module whose class name ends in ``2d`` (timm ``LayerNorm2d``,
       ``BatchNormAct2d``, ``SelectAdaptivePool2d`` ...), the PyTorch naming convention;
    5. operators that act on the last dimension give ``"nhwc"`` on a 4-D tensor, since that
       last dimension is then the channel one: ``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm``;
    6. a model that declares channels-last outputs gives ``"nhwc"``: timm sets
       ``model.output_fmt = "NHWC"`` on its Swin, SwinV2, MambaOut, Sequencer and Hiera models,
       whose stages (``SwinTransformerStage``, ...) emit ``[B, H, W, C]``;
    7. otherwise ``"nchw"``.

    A model of your own that emits channels-last maps can set ``model.output_fmt = "NHWC"`` (or
    ``output_fmt`` on the emitting module), or pass ``layouts={"name": "nhwc"}``.

:func:`to_nchw` turns any layout into a ``[B, C, H, W]`` map (tokens are laid back on their
square patch grid after the prefix tokens are dropped) and :func:`pool_features` into a
``[B, C]`` vector (the mean over positions / patch tokens), so hints between a CNN and a ViT
need no special cases in the methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from .calling import is_transformers_model


NCHW = "nchw"
NHWC = "nhwc"
TOKENS = "tokens"
VECTOR = "vector"
LAYOUTS = (NCHW, NHWC, TOKENS, VECTOR)
_NDIM = {NCHW: 4, NHWC: 4, TOKENS: 3, VECTOR: 2}


def feature_tensor(output: Any) -> torch.Tensor:
    """The feature tensor in a module output.

    A tensor is returned as is; a tuple/list gives its first tensor (nested tuples are
    searched in order); a transformers ``ModelOutput`` or a dict gives ``last_hidden_state``
    when it holds one, else its first tensor value. Anything else is a ``TypeError``.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # transformers ModelOutput is an OrderedDict
        hidden = output.get("last_hidden_state")
        if isinstance(hidden, torch.Tensor):
            return hidden
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = None
    if values is not None:
        for v in values:
            if isinstance(v, torch.Tensor):
                return v
        for v in values:
            if isinstance(v, (tuple, list, Mapping)):
                try:
                    return feature_tensor(v)
                except TypeError:
                    continue
    raise TypeError(
        f"cannot find a feature tensor in a module output of type {type(output).__name__}: "
        "expected a tensor, a tuple/list holding one, or a ModelOutput/dict "
        "(last_hidden_state or a tensor value); tap another layer"
    )


_CHANNELS_FIRST_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
)
_LAST_DIM_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _declared_format(obj: Any) -> str | None:
    """``"nhwc"`` / ``"nchw"`` when ``obj`` declares its output format, else ``None``."""
    fmt = getattr(obj, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)  # timm's Format enum
    if isinstance(fmt, str):
        if fmt.upper() == "NHWC":
            return NHWC
        if fmt.upper() == "NCHW":
            return NCHW
    data_format = getattr(obj, "data_format", None)
    if isinstance(data_format, str):
        if data_format.lower() == "channels_last":
            return NHWC
        if data_format.lower() == "channels_first":
            return NCHW
    return None


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return layout


def _layout_of(model: nn.Module, module: nn.Module, tensor: torch.Tensor) -> str:
    """Rules 2-7 of the module docstring."""
    if tensor.ndim == 2:
        return VECTOR
    if tensor.ndim == 3:
        return TOKENS
    if tensor.ndim != 4:
        raise ValueError(
            f"cannot tell the layout of a {tensor.ndim}-D output {tuple(tensor.shape)} "
            f"from {type(module).__name__}: only 2-D, 3-D and 4-D features are supported"
        )
    declared = _declared_format(module)
    if declared is not None:
        return declared
    if isinstance(module, _CHANNELS_FIRST_TYPES) or type(module).__name__.lower().endswith("2d"):
        return NCHW
    if isinstance(module, _LAST_DIM_TYPES):
        return NHWC
    if _declared_format(model) == NHWC:
        return NHWC
    return NCHW


def _grid(n: int, grid_size: tuple[int, int] | None, num_prefix: int,
          image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``n`` tokens: ``grid_size`` when given; else, for an input of ``image_size``, the
    grid of the smallest stride ``s`` whose ``H/s x W/s`` positions (rounded down, or up as padded patch
    embeddings do) are ``n``, so non-square inputs keep their aspect ratio; else a square."""
    if grid_size is not None:
        h, w = int(grid_size[0]), int(grid_size[1])
        if h * w == n:
            return h, w
        raise ValueError(f"{n} patch tokens do not fit a {h}x{w} grid (num_prefix_tokens={num_prefix})")
    if image_size is not None:
        height, width = int(image_size[0]), int(image_size[1])
        for s in range(1, max(height, width) + 1):
            for h, w in ((height // s, width // s), (-(-height // s), -(-width // s))):
                if h * w == n and n > 0:
                    return h, w
            if -(-height // s) * -(-width // s) < n:
                break
        raise ValueError(f"{n} tokens (after dropping {num_prefix} prefix tokens) do not lie on a grid of a "
                         f"{height}x{width} input at any stride: pass the right num_prefix_tokens, or compare "
                         "pooled features instead of maps")
    side = math.isqrt(n)
    if side * side != n or n == 0:
        raise ValueError(
            f"{n} tokens (after dropping {num_prefix} prefix tokens) cannot be mapped to a square "
            "grid: pass grid_size=(h, w) or the right num_prefix_tokens, or compare pooled "
            "features (pool_features) instead of maps"
        )
    return side, side


def to_nchw(
    t: torch.Tensor, layout: str, num_prefix_tokens: int = 0, *, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``[B, C, H, W]`` feature map from a tensor of any layout.

    ``"nhwc"`` is permuted (a view, not a copy); ``"tokens"`` drop their first
    ``num_prefix_tokens`` tokens and the rest are laid on a square grid (or ``grid_size``), a
    ``ValueError`` when they do not fit one; ``"vector"`` becomes ``[B, C, 1, 1]``.
    """
    _check_layout(layout)
    if t.ndim != _NDIM[layout]:
        raise ValueError(f"a {layout!r} tensor has {_NDIM[layout]} dims, got shape {tuple(t.shape)}")
    if layout == NCHW:
        return t
    if layout == NHWC:
        return t.permute(0, 3, 1, 2)
    if layout == VECTOR:
        return t[:, :, None, None]
    tokens = t[:, num_prefix_tokens:]
    b, n, c = tokens.shape
    h, w = _grid(n, grid_size, num_prefix_tokens)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def resize_map(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """An ``[B, C, H, W]`` map brought to spatial ``size``: average pooling to shrink, bilinear to grow.

    Parameter-free, so features can be aligned where the sizes are known (at run time: images come
    at any size), outside the modules that were built from a probe's shapes."""
    size = (int(size[-2]), int(size[-1]))
    if tuple(y.shape[-2:]) == size:
        return y
    if y.shape[-2] >= size[0] and y.shape[-1] >= size[1]:
        return torch.nn.functional.adaptive_avg_pool2d(y, size)
    return torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)


def pool_features(t: torch.Tensor, layout: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """``[B, C]`` global average of a tensor of any layout (for tokens: of the patch tokens)."""
    _check_layout(layout)
    if t.ndim != _NDIM[layout]:
        raise ValueError(f"a {layout!r} tensor has {_NDIM[layout]} dims, got shape {tuple(t.shape)}")
    if layout == NCHW:
        return t.mean(dim=(2, 3))
    if layout == NHWC:
        return t.mean(dim=(1, 2))
    if layout == VECTOR:
        return t
    if t.shape[1] <= num_prefix_tokens:
        raise ValueError(f"no patch tokens left in {tuple(t.shape)} after {num_prefix_tokens} prefix tokens")
    return t[:, num_prefix_tokens:].mean(dim=1)


def num_prefix_tokens(model: nn.Module) -> int:
    """How many non-patch tokens (class, distillation, register) start the model's token sequence.

    timm models say it (``model.num_prefix_tokens``). For transformers models it is counted from
    the embedding parameters: ``cls_token`` / ``class_embedding`` (ViT, BEiT, DINOv2, CLIP: 1),
    plus ``distillation_token`` (DeiT: 2), plus ``register_tokens``. Otherwise 0.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    if is_transformers_model(model):
        for module in model.modules():
            cls = getattr(module, "cls_token", None)
            if not isinstance(cls, torch.Tensor):
                cls = getattr(module, "class_embedding", None)
            if not isinstance(cls, torch.Tensor):
                continue
            count = 1
            if isinstance(getattr(module, "distillation_token", None), torch.Tensor):
                count += 1
            registers = getattr(module, "register_tokens", None)
            if isinstance(registers, torch.Tensor) and registers.ndim >= 2:
                count += registers.shape[-2]
            return count
    return 0
