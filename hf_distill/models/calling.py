"""Which kind of model we hold (timm, transformers, plain ``nn.Module``) and how to call it.

Names, logits out of any output, the image inputs each model takes, distillation heads, label names
and parameter counts: what depends on the kind of model lives here, so the trainer and the methods
never branch on it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# Kinds of model
# ---------------------------------------------------------------------------------------------


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def is_timm_model(model: nn.Module) -> bool:
    # timm models carry a pretrained_cfg with an architecture name; nothing else does.
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg and not is_transformers_model(model)


def model_family(model: nn.Module) -> str:
    """``"transformers"``, ``"timm"`` or ``"torch"`` (any other classifier)."""
    if is_transformers_model(model):
        return "transformers"
    if is_timm_model(model):
        return "timm"
    return "torch"


def model_name(model: nn.Module) -> str:
    """A short human name: the Hub id / path it was loaded from, else the architecture."""
    source = getattr(model, "hf_distill_source", None)
    if source:
        return source
    if is_transformers_model(model):
        return getattr(model.config, "_name_or_path", "") or type(model).__name__
    if is_timm_model(model):
        return model.pretrained_cfg["architecture"]
    return type(model).__name__


def display_name(model: nn.Module) -> str:
    """:func:`model_name` for people (cards): a local folder is named by its last part."""
    return short_name(model_name(model))


def short_name(name: str) -> str:
    """A model name or path for people: ``local-dir:`` paths and local folders by their last part."""
    path = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    if name.startswith("local-dir:") or os.path.isabs(path) or os.path.isdir(path):
        return os.path.basename(os.path.normpath(path)) or name
    return name


def logits_of(output: Any) -> torch.Tensor:
    """Logits from whatever a classifier returns: a tensor, a ``ModelOutput`` / dict (``logits``, else its one
    2-D tensor) or a tuple (its first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
        if logits is None:  # an output that names its class scores otherwise: its only [B, classes] tensor
            matrices = [v for v in output.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
            logits = matrices[0] if len(matrices) == 1 else None
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = next((v for v in output if isinstance(v, torch.Tensor)), None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in model output of type {type(output).__name__}")
    return logits


def image_input_name(model: nn.Module) -> str | None:
    """The keyword a transformers model takes images by (``pixel_values``; Perceiver: ``inputs``), or ``None``
    when its forward takes no images (ImageGPT: colour-cluster token ids)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("pixel_values", "inputs"):
        if name in params:
            return name
    return None


def check_image_model(model: nn.Module, role: str = "model") -> None:
    """Refuse, in one line, a transformers model whose forward takes no images."""
    if is_transformers_model(model) and image_input_name(model) is None:
        import inspect

        takes = ", ".join(list(inspect.signature(model.forward).parameters)[:2])
        raise ValueError(f"the {role} ({type(model).__name__}) takes no pixel values (its forward takes {takes}): "
                         "choose an image model")


def _naflex_inputs(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    """Patches, their grid and a full mask for a model fed as NaFlex (SigLIP 2 takes ``[B, N, p*p*C]`` patch
    rows, ``spatial_shapes`` and ``pixel_attention_mask``, as its image processor makes them)."""
    config = getattr(model.config, "vision_config", model.config)
    p = int(config.patch_size)
    b, c, h, w = pixel_values.shape
    gh, gw = h // p, w // p
    patches = pixel_values[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    shapes = torch.tensor([[gh, gw]] * b, device=pixel_values.device)
    mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device)
    return {"pixel_values": patches.reshape(b, gh * gw, p * p * c), "spatial_shapes": shapes,
            "pixel_attention_mask": mask}


def image_inputs(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    """The keyword arguments a transformers model takes a ``[B, C, H, W]`` image batch as."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "spatial_shapes" in params and "pixel_attention_mask" in params:
        return _naflex_inputs(model, pixel_values)
    name = image_input_name(model)
    if name is None:
        check_image_model(model)
    return {name: pixel_values}


def forward_images(model: nn.Module, pixel_values: torch.Tensor) -> Any:
    """The model's output on an image batch, passed the way its library expects (transformers: by the keyword
    its forward takes images by; NaFlex models as patches)."""
    if is_transformers_model(model):
        return model(**image_inputs(model, pixel_values))
    return model(pixel_values)


def call_model(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run a classifier the way its library expects and return its logits."""
    return logits_of(forward_images(model, pixel_values))


def distillation_heads(model: nn.Module):
    """For a student with a distillation token (DeiT), a function ``x -> (class-head logits,
    distillation-head logits)``; ``None`` for every other model.

    timm ``*_distilled_*`` ViTs (``set_distilled_training(True)`` is switched on; both heads are read
    by hooks on ``head`` / ``head_dist`` in any mode) and transformers
    ``DeiTForImageClassificationWithTeacher`` (``cls_logits`` / ``distillation_logits``). Both
    libraries predict with the mean of the two heads.
    """
    if not has_distillation_head(model):
        return None
    if is_transformers_model(model):
        def heads(x):
            out = model(pixel_values=x)
            return out.cls_logits, out.distillation_logits

        return heads
    model.set_distilled_training(True)  # timm: the tuple of both heads in training
    if getattr(model, "hf_distill_heads", None) is not None:  # hooks already placed (another trainer)
        return model.hf_distill_heads
    captured: dict[str, torch.Tensor] = {}
    model.head.register_forward_hook(lambda m, a, out: captured.__setitem__("cls", out))
    model.head_dist.register_forward_hook(lambda m, a, out: captured.__setitem__("dist", out))

    def timm_heads(x):
        captured.clear()
        model(x)
        return captured.pop("cls"), captured.pop("dist")

    model.hf_distill_heads = timm_heads
    return timm_heads


def has_distillation_head(model: nn.Module) -> bool:
    """A DeiT-style model: a class head and a distillation head (timm ``*_distilled_*``, transformers
    ``DeiTForImageClassificationWithTeacher``)."""
    if is_transformers_model(model):
        return isinstance(getattr(model, "distillation_classifier", None), nn.Module)
    return hasattr(model, "set_distilled_training") and isinstance(getattr(model, "head_dist", None), nn.Module)


def num_classes_of(model: nn.Module) -> int | None:
    """Number of output classes, when the model declares it (``None`` for plain modules)."""
    if is_transformers_model(model):
        return int(model.config.num_labels)
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    return None


def label_names_of(model: nn.Module) -> list[str] | None:
    """Class names in index order, when the model carries them."""
    if is_transformers_model(model):
        id2label = getattr(model.config, "id2label", None) or {}
        names = [id2label.get(i, id2label.get(str(i))) for i in range(model.config.num_labels)]
        # transformers fills generic LABEL_i names by default: those carry no information
        if all(n is not None for n in names) and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return [str(n) for n in names]
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return list(names) if names else None


def set_label_names(model: nn.Module, names: Sequence[str] | None) -> None:
    """Record class names on the model so they are saved with it."""
    if not names:
        return
    names = [str(n) for n in names]
    if is_transformers_model(model):
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    elif is_timm_model(model):
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": names}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
