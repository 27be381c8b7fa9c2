"""What a model expects as input: channels, size and normalisation (:class:`InputSpec`).

Read from timm's ``pretrained_cfg`` or a transformers config / image processor, or declared with
:func:`set_input_spec`; :class:`InputAdapter` feeds a teacher images prepared for another spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .calling import is_transformers_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


# ---------------------------------------------------------------------------------------------
# Input expectations (normalisation, size, channels)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What a model was trained to see: channels, size and normalisation of its input."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    in_chans: int = 3
    fixed_size: bool = False  # the model cannot take another size (ViT without dynamic size)
    interpolation: str = "bilinear"
    # where the statistics came from (for the log line each teacher's input adapter writes); not compared
    source: str = field(default="declared with set_input_spec", compare=False)

    def __post_init__(self):
        # One value per channel: a 3-value mean on a 1-channel image would silently broadcast.
        object.__setattr__(self, "mean", _per_channel(self.mean, self.in_chans))
        object.__setattr__(self, "std", _per_channel(self.std, self.in_chans))

    def to_dict(self) -> dict:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": list(self.image_size),
            "in_chans": self.in_chans,
            "fixed_size": self.fixed_size,
            "interpolation": self.interpolation,
        }


def _per_channel(values: Sequence[float], n: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    if n == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{len(values)} normalisation values for a {n}-channel input")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


def input_spec(model: nn.Module) -> InputSpec:
    """The input a model expects, from timm's data config or the transformers image processor.

    ``load_model`` records the image processor of transformers checkpoints; a spec set with
    :func:`set_input_spec` wins over both.
    """
    spec = getattr(model, "hf_distill_input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    if is_transformers_model(model):
        return _transformers_input_spec(model, getattr(model, "hf_distill_image_processor", None))
    if hasattr(model, "pretrained_cfg"):
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        in_chans, size = int(cfg["input_size"][0]), _pair(cfg["input_size"])
        fixed = bool(model.pretrained_cfg.get("fixed_input_size", False))
        try:  # the built model's real input (in_chans / img_size given at creation are not in pretrained_cfg)
            from timm.models._input import get_model_input_config

            actual = get_model_input_config(model)
            in_chans, fixed = int(actual["input_size"][0]), bool(actual["fixed_input_size"])
            if fixed:
                size = _pair(actual["input_size"])
        except (ImportError, KeyError, TypeError, ValueError):
            pass
        return InputSpec(
            mean=cfg["mean"],
            std=cfg["std"],
            image_size=size,
            in_chans=in_chans,
            fixed_size=fixed,
            interpolation=cfg.get("interpolation", "bilinear") or "bilinear",
            source="timm data config",
        )
    return InputSpec(source="not declared: ImageNet statistics assumed")


def declares_input_spec(model: nn.Module) -> bool:
    """Whether the model says what input it expects (timm, transformers, or set_input_spec)."""
    return (isinstance(getattr(model, "hf_distill_input_spec", None), InputSpec)
            or is_transformers_model(model) or hasattr(model, "pretrained_cfg"))


def set_input_spec(model: nn.Module, spec: InputSpec) -> None:
    """Declare what a model expects (for plain modules, or to override a library's default)."""
    model.hf_distill_input_spec = spec


def _transformers_input_spec(model: nn.Module, processor: Any | None) -> InputSpec:
    # CLIP, SigLIP, MetaCLIP 2 ... keep their image settings in the vision sub-config
    config = getattr(model.config, "vision_config", None) or model.config
    in_chans = int(getattr(config, "num_channels", 3) or 3)
    # Patch-embedding models (ViT, DeiT, CLIP, PVT's per-stage patch_sizes ...) take exactly config.image_size.
    fixed = (hasattr(config, "patch_size") or hasattr(config, "patch_sizes")) and hasattr(config, "image_size")
    size = _pair(getattr(config, "image_size", DEFAULT_IMAGE_SIZE) or DEFAULT_IMAGE_SIZE)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    source = (f"no image processor found: ImageNet mean/std guessed from model_type '{getattr(config, 'model_type', '')}' "
              "(most released processors, DINOv2's and Swin's among them, use them; save the checkpoint's "
              "preprocessor_config.json to be sure)")
    if processor is not None:
        source = f"image processor ({type(processor).__name__})"
        mean = tuple(getattr(processor, "image_mean", None) or mean)
        std = tuple(getattr(processor, "image_std", None) or std)
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        psize = crop or getattr(processor, "size", None)
        def get(key):  # size is a dict in transformers 4, a SizeDict object in 5
            return psize.get(key) if isinstance(psize, dict) else getattr(psize, key, None)

        if psize is not None:
            if get("height") and get("width"):
                size = (int(get("height")), int(get("width")))
            elif get("shortest_edge") and not fixed:
                size = _pair(get("shortest_edge"))
    elif getattr(model.config, "model_type", "") in ("vit", "beit"):
        mean, std = (0.5,) * 3, (0.5,) * 3  # Google's ViT and BEiT processors scale to [-1, 1]
        source = (f"no image processor found: mean/std 0.5 guessed from model_type '{model.config.model_type}' (its released "
                  "processors use them; save the checkpoint's preprocessor_config.json to be sure)")
    return InputSpec(mean=mean, std=std, image_size=size, in_chans=in_chans, fixed_size=fixed, source=source)


class InputAdapter(nn.Module):
    """Turns a batch prepared for one model into the batch another model expects.

    Undo the source normalisation, match channels and (when the target needs it) size, then
    apply the target normalisation. Identity when both specs agree, so it costs nothing then.
    """

    def __init__(self, source: InputSpec, target: InputSpec):
        super().__init__()
        self.source, self.target = source, target
        same_norm = source.mean == target.mean and source.std == target.std
        self.resize = target.fixed_size and tuple(source.image_size) != tuple(target.image_size)
        self.identity = same_norm and source.in_chans == target.in_chans and not self.resize
        if source.in_chans != target.in_chans and 1 not in (source.in_chans, target.in_chans):
            raise ValueError(
                f"cannot feed {source.in_chans}-channel images to a model that expects "
                f"{target.in_chans} channels"
            )
        # x_target = x_source * scale + shift, folded into one affine per channel.
        s_mean, s_std = torch.tensor(source.mean), torch.tensor(source.std)
        t_mean, t_std = torch.tensor(target.mean), torch.tensor(target.std)
        if source.in_chans == 1 and target.in_chans > 1:
            s_mean, s_std = s_mean.expand(target.in_chans), s_std.expand(target.in_chans)
        elif target.in_chans == 1 and source.in_chans > 1:
            t_mean, t_std = t_mean.expand(source.in_chans), t_std.expand(source.in_chans)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)

    def describe(self) -> str:
        """What the adapter does, in words (logged once per teacher)."""
        if self.identity:
            return "none: the teacher takes the student's batches as they are"
        s, t = self.source, self.target
        steps = []
        if s.in_chans != t.in_chans:
            steps.append("grey -> RGB (channel repeated)" if s.in_chans == 1 else "RGB -> grey (channel mean)")
        if s.mean != t.mean or s.std != t.std:
            steps.append(f"re-normalised from mean {_fmt_stats(s.mean)} / std {_fmt_stats(s.std)} to mean "
                         f"{_fmt_stats(t.mean)} / std {_fmt_stats(t.std)}")
        if self.resize:
            steps.append(f"resized {s.image_size[0]}x{s.image_size[1]} -> {t.image_size[0]}x{t.image_size[1]} "
                         "(the teacher takes a fixed size)")
        return "; ".join(steps) + f" (teacher statistics: {t.source})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if self.source.in_chans == 1 and self.target.in_chans > 1:
            x = x.expand(-1, self.target.in_chans, -1, -1)
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.target.in_chans == 1 and self.source.in_chans > 1:
            x = x.mean(dim=1, keepdim=True)
        if self.resize:
            x = nn.functional.interpolate(
                x, size=tuple(self.target.image_size), mode="bilinear", align_corners=False
            )
        return x


def _fmt_stats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
