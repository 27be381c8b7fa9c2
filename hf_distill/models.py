"""Loading, calling and saving models of either ecosystem (timm, transformers) or plain ``nn.Module``s.

Everything that depends on *which kind* of model we hold lives here, so the trainer and
the methods never branch on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224

WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_timm_config(cfg: dict | None) -> bool:
    return bool(cfg) and "architecture" in cfg and "model_type" not in cfg


def _hub_config(repo_id: str, revision: str | None, cache_dir: str | None, token: Any) -> dict | None:
    """The repo's config.json (from the cache when offline), or None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir, token=token)
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError as err:
        raise ModelLoadError(_offline_message(repo_id, revision)) from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"'{repo_id}' is neither a local folder, a timm architecture nor a Hub repository "
            "you can access (check the name, or log in with `hf auth login` / set HF_TOKEN for a "
            "private repo)."
        ) from err
    return _read_json(Path(path))


def _offline_message(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants

    rev = f" (revision {revision})" if revision else ""
    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return (
        f"cannot load '{repo_id}'{rev}: {why} and it is not in the local cache "
        f"({constants.HF_HUB_CACHE}). Download it once with network access "
        f"(`hf download {repo_id}`), point HF_HOME / cache_dir at a cache that holds it, "
        "or pass a local folder."
    )


def load_model(
    name_or_path: str,
    num_labels: int | None = None,
    *,
    pretrained: bool = True,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    label_names: Sequence[str] | None = None,
    backbone: bool = False,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load an image classifier (or, with ``backbone=True``, a feature backbone) from timm or transformers.

    ``name_or_path`` may be:

    * ``hf-hub:org/name`` — a timm model on the Hub;
    * a timm architecture name (``resnet18``), with ImageNet weights when ``pretrained``;
    * ``local-dir:PATH`` or a local folder holding a timm ``config.json``;
    * a local folder or Hub repo id with a transformers ``config.json``
      (``AutoModelForImageClassification``); a local folder with a config but no weights
      gives a freshly initialised model of that architecture.

    ``pretrained=False`` builds the architecture with random weights whatever the source (the
    config is still read). ``backbone=True`` (feature distillation) loads timm models without their
    classifier (``num_classes=0``) and transformers checkpoints with ``AutoModel`` (``Dinov2Model``,
    ``CLIPModel``, ``SiglipModel``, ``ViTModel``, ...). ``num_labels`` replaces the classification head when it differs from
    the checkpoint's. ``image_size`` builds the model for that input size: timm models whose class takes
    ``img_size`` are created with it (ViT, DeiT, Swin, LeViT ...); every model is then checked on one image of
    that size, and one that cannot take it is refused in one line naming the sizes it takes
    (:class:`InputSizeError`). Extra ``kwargs`` go to ``timm.create_model`` or ``from_pretrained``.
    """
    name = str(name_or_path)
    if backbone:
        num_labels = 0  # timm: no classifier; transformers: the AutoModel class below
        kwargs["_backbone"] = True
    if image_size is not None:
        kwargs["_image_size"] = int(image_size)
    if name.startswith(("hf-hub:", "local-dir:")):
        model = _load_timm(name, num_labels, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    elif os.path.isdir(name):
        cfg = _read_json(Path(name) / "config.json")
        if cfg is None:
            raise ModelLoadError(f"folder '{name}' has no config.json: not a saved timm or transformers model")
        if _is_timm_config(cfg):
            model = _load_timm(f"local-dir:{name}", num_labels, pretrained=pretrained, **kwargs)
        else:
            model = _load_transformers(name, num_labels, revision, cache_dir, token, pretrained, **kwargs)
    else:
        import timm

        if timm.is_model(name):
            model = _load_timm(name, num_labels, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
        else:
            if "/" not in name.strip("/") or _looks_like_path(name):
                # not a timm name, not a folder, and not shaped like a Hub repo id (org/name): asking
                # the Hub would only end in retries and an offline message
                raise ModelLoadError(_missing_folder_message(name) or _not_found_message(name))
            try:
                cfg = _hub_config(name, revision, cache_dir, token)
                if _is_timm_config(cfg):
                    model = _load_timm(f"hf-hub:{name}", num_labels, pretrained=pretrained, cache_dir=cache_dir,
                                       **kwargs)
                else:
                    model = _load_transformers(name, num_labels, revision, cache_dir, token, pretrained, **kwargs)
            except ModelLoadError:
                local = _missing_folder_message(name)  # `runs/teacher_tim` next to a `runs/` folder: a typo
                if local:
                    raise ModelLoadError(local + "; no Hub repository of that name could be loaded either") from None
                raise
    if image_size is not None:
        _set_input_size(model, name, int(image_size), backbone)
    model.hf_distill_source = name
    if not hasattr(model, "hf_distill_init"):
        model.hf_distill_init = _init_description(model, name, pretrained)
    set_label_names(model, label_names)
    return model


def _looks_like_path(name: str) -> bool:
    """Written as a path, never a Hub repo id (``./runs/x``, ``/data/x``, ``~/x``, ``a/b/c``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.strip("/").count("/") > 1


def _missing_folder_message(name: str) -> str | None:
    """For a name meant as a local folder that does not exist (its parent folder does, or it is written as a
    path): the closest existing folders. None when it reads as a Hub repo id."""
    import difflib

    path = Path(os.path.expanduser(name.rstrip("/")))
    parent = path.parent
    if not (_looks_like_path(name) or (str(parent) not in ("", ".") and parent.is_dir())):
        return None
    if not parent.is_dir():
        return f"no folder '{name}' (nor its parent folder '{parent}')"
    siblings = sorted(str(p) for p in parent.iterdir() if p.is_dir())
    close = difflib.get_close_matches(str(path), siblings, n=3, cutoff=0.5)
    where = f"did you mean {' or '.join(close)}?" if close else f"'{parent}' holds {', '.join(siblings[:8]) or 'no folders'}"
    return f"no folder '{name}' ({where})"


def _not_found_message(name: str) -> str:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close timm names: {', '.join(close)}." if close else " `timm.list_models('*pattern*')` lists timm names."
    return (f"'{name}' is neither a timm architecture, a local folder, nor a Hub repository id (org/name).{hint}")


def _init_description(model: nn.Module, name: str, pretrained: bool) -> str:
    """Where the weights a model starts from came from (for model cards)."""
    if not pretrained:
        return "random initialisation"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    weights = cfg.get("hf_hub_id") or (f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else None)
    return f"pretrained weights of {weights or short_name(name)}"


def _load_timm(name: str, num_labels: int | None, pretrained: bool, cache_dir=None, **kwargs) -> nn.Module:
    import timm

    kwargs.pop("_backbone", None)
    image_size = kwargs.pop("_image_size", None)
    if num_labels is not None:
        kwargs["num_classes"] = num_labels
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    sized = image_size is not None and "img_size" not in kwargs and _timm_takes_img_size(name, kwargs)
    if sized:
        kwargs["img_size"] = image_size  # position embeddings / windows / attention biases built for that size
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # timm raises many kinds; make the offline case readable
        if _is_offline_error(err):
            if pretrained and not name.startswith(("hf-hub:", "local-dir:")):
                raise ModelLoadError(_timm_weights_offline_message(name)) from err
            raise ModelLoadError(_offline_message(name.split(":", 1)[-1], None)) from err
        if sized and not isinstance(err, (OSError, RuntimeError)):  # the size is what the constructor refused
            raise InputSizeError(f"image_size={image_size}: {short_name(name)} cannot be built for "
                                 f"{image_size}x{image_size} inputs ({_first_line(err)}); pass a larger image_size"
                                 ) from err
        raise


def _timm_weights_offline_message(name: str) -> str:
    """An architecture name whose pretrained weights are not cached: they live in the ``timm/NAME.TAG`` repo."""
    import timm
    from huggingface_hub import constants

    try:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    except Exception:
        repo = f"timm/{name}"
    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return (f"cannot load the pretrained weights of timm's '{name}': {why} and they are not in the local cache "
            f"({constants.HF_HUB_CACHE}). Train from random weights with pretrained=False, or download them once "
            f"with network access (`hf download {repo}`; timm's weights live in timm/NAME.TAG repositories).")


class InputSizeError(ValueError):
    """A model that cannot take the requested input size; the message names the sizes it takes."""


def _timm_takes_img_size(name: str, kwargs: dict) -> bool:
    """Whether the timm model's class takes ``img_size`` (its constructor is read from a build on the meta
    device: no weights are allocated or loaded)."""
    import inspect

    import timm

    meta_kw = {k: v for k, v in kwargs.items() if k not in ("cache_dir", "pretrained_cfg_overlay")}
    try:
        with torch.device("meta"):
            cls = type(timm.create_model(name, pretrained=False, **meta_kw))
    except Exception:  # noqa: BLE001 - e.g. a hub model not cached yet: the real build says what is wrong
        return False
    for klass in cls.__mro__:  # a subclass passing **kwargs on (LevitDistilled) takes what its base takes
        params = inspect.signature(klass.__init__).parameters
        if "img_size" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


_PROBE_SIZES = (32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)


def takes_input_size(model: nn.Module, size: Sequence[int], backbone: bool = False) -> bool:
    """Whether one forward on a ``size`` image runs (eval mode, no gradients, every module's mode restored)."""
    return _input_size_error(model, size, backbone) is None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def _input_size_error(model: nn.Module, size: Sequence[int], backbone: bool = False) -> Exception | None:
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    x = torch.zeros(1, input_spec(model).in_chans, *_pair(size), device=device, dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if backbone:
                from .features import backbone_features

                backbone_features(model, x)
            else:
                call_model(model, x)
        return None
    except Exception as err:  # noqa: BLE001 - any failure at that size (shapes, pooling, patch divisibility) is no
        return err
    finally:
        for m, training in modes:
            m.training = training


def _set_input_size(model: nn.Module, name: str, size: int, backbone: bool) -> None:
    """Record ``size`` as the model's input size, after checking on one image that the model takes it."""
    import dataclasses

    spec = input_spec(model)
    err = _input_size_error(model, (size, size), backbone)
    from .features import FeatureExtractionError

    if isinstance(err, FeatureExtractionError):  # its features cannot be read at any size: say why
        raise err
    if err is not None:
        own = tuple(spec.image_size)
        own_err = _input_size_error(model, own, backbone) if own != (size, size) else None
        if own_err is not None:  # not about the size at all
            raise InputSizeError(f"{short_name(name)} does not run on images of its own size {own[0]}x{own[1]} "
                                 f"either ({_first_line(own_err)})")
        if own == (size, size):  # built for that size (timm img_size) and still failing on it
            default = _pair((getattr(model, "pretrained_cfg", None) or {}).get("input_size", own))
            hint = f"pass image_size={default[0]} (its default size)" if default != own else "pass a larger image_size"
            raise InputSizeError(f"image_size={size}: {short_name(name)} built for {size}x{size} inputs fails on "
                                 f"them ({_first_line(err)}); {hint}")
        larger = next((s for s in _PROBE_SIZES if size < s and takes_input_size(model, (s, s), backbone)), None)
        if spec.fixed_size or larger is None:
            raise InputSizeError(f"image_size={size}: {short_name(name)} takes {own[0]}x{own[1]} inputs only; pass "
                                 f"image_size={own[0]}, or choose a student that takes {size}x{size}")
        raise InputSizeError(f"image_size={size}: {short_name(name)} needs larger inputs (the smallest size tried "
                             f"that it takes is {larger}); pass image_size={larger} or more")
    set_input_spec(model, dataclasses.replace(spec, image_size=(size, size),
                                              source=f"{spec.source}; image_size={size} requested"))


def _load_transformers(name, num_labels, revision, cache_dir, token, pretrained=True, **kwargs) -> nn.Module:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    image_size = kwargs.pop("_image_size", None)  # checked (and recorded) once the model is built

    if kwargs.pop("_backbone", False):
        return _load_transformers_backbone(name, revision, cache_dir, token, pretrained, AutoModel, AutoConfig,
                                           AutoImageProcessor, image_size=image_size, **kwargs)
    local = os.path.isdir(name)
    has_weights = not local or any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(name)
    )
    hub_kw = {"revision": revision, "cache_dir": cache_dir, "token": token}
    if num_labels is None and local:
        _refuse_backbone_as_classifier(name)
    try:
        if has_weights and pretrained:
            extra = {}
            if num_labels is not None:
                extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
            model = AutoModelForImageClassification.from_pretrained(name, **hub_kw, **extra, **kwargs)
        else:
            config = AutoConfig.from_pretrained(name, **hub_kw)
            if num_labels is not None and num_labels != config.num_labels:
                config.num_labels = num_labels
                config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
                config.label2id = {v: k for k, v in config.id2label.items()}
            if pretrained:
                logger.warning("'%s' has a config but no weights: the model starts from random init", name)
            _config_for_size(config, image_size)
            model = AutoModelForImageClassification.from_config(config, **kwargs)
            model.hf_distill_init = "random initialisation"
    except OSError as err:
        if _is_offline_error(err):
            raise ModelLoadError(_offline_message(name, revision)) from err
        raise
    return _with_processor(model, AutoImageProcessor, name, hub_kw)


def _refuse_backbone_as_classifier(folder: str) -> None:
    """A saved base model (``Dinov2Model``, ``CLIPModel``, ...) has no classifier to take logits from: loading it
    as one would invent an untrained 2-class head."""
    archs = (_read_json(Path(folder) / "config.json") or {}).get("architectures") or []
    if archs and not any("For" in a and "Classification" in a for a in archs):
        raise ModelLoadError(
            f"'{folder}' is a {archs[0]} backbone without a classification head, so it has no logits to distill: "
            "use it as a feature-distillation teacher (distill_method='feature'), or give a *ForImageClassification "
            "checkpoint")


def _with_processor(model: nn.Module, processor_class, name: str, hub_kw: dict) -> nn.Module:
    """The model with its saved image processor attached (its input spec), when there is one."""
    try:
        model.hf_distill_image_processor = processor_class.from_pretrained(name, **hub_kw)
    except (OSError, ValueError):
        pass  # no processor saved: the spec falls back to the config's defaults
    return model


def _config_for_size(config, image_size: int | None) -> None:
    """A model built from its config (random weights) is built for ``image_size``: position embeddings sized for
    it (ViT, CLIP / SigLIP towers, PVT ...)."""
    if image_size is None:
        return
    for cfg in (config, getattr(config, "vision_config", None)):
        if cfg is not None and isinstance(getattr(cfg, "image_size", None), (int, list, tuple)):
            cfg.image_size = image_size if isinstance(cfg.image_size, int) else [image_size] * len(cfg.image_size)


def _load_transformers_backbone(name, revision, cache_dir, token, pretrained, auto_model, auto_config,
                                auto_processor, image_size=None, **kwargs) -> nn.Module:
    """A transformers checkpoint as its base model (``AutoModel``): the backbone feature distillation reads; a
    type with no base model there (PP-LCNet) as its ``AutoBackbone`` (its stage maps)."""
    from transformers import AutoBackbone

    hub_kw = {"revision": revision, "cache_dir": cache_dir, "token": token}
    local = os.path.isdir(name)
    has_weights = not local or any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
    try:
        config = auto_config.from_pretrained(name, **hub_kw)
        backbone_class = None
        if type(config) not in auto_model._model_mapping and type(config) in AutoBackbone._model_mapping:
            backbone_class = AutoBackbone._model_mapping[type(config)]  # its class: AutoBackbone asks the Hub
        elif type(config) not in auto_model._model_mapping:  # a tower AutoModel does not map (MetaClip 2's vision
            backbone_class = _class_named_by(config)         # model in transformers 5.25): the class its config names
        if has_weights and pretrained:
            model = _backbone_from_pretrained(backbone_class or auto_model, name, **hub_kw, **kwargs)
        else:
            _config_for_size(config, image_size)
            model = backbone_class(config, **kwargs) if backbone_class else auto_model.from_config(config, **kwargs)
            model.hf_distill_init = "random initialisation"
    except OSError as err:
        if _is_offline_error(err):
            raise ModelLoadError(_offline_message(name, revision)) from err
        raise
    return _with_processor(model, auto_processor, name, hub_kw)


def _class_named_by(config):
    """The transformers class a saved config names in ``architectures`` (None when it names none we have)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    return getattr(transformers, archs[0], None) if archs else None


def _backbone_from_pretrained(auto_model, name: str, **kwargs) -> nn.Module:
    """``AutoModel.from_pretrained`` with transformers' LOAD REPORT table (a classifier checkpoint read as its
    backbone lists every unused head key) said in one line: unused checkpoint weights are expected there;
    weights the checkpoint lacks are worth a warning."""
    from transformers.utils import logging as hf_logging

    def keep_out(record):
        return "LOAD REPORT" not in str(record.msg)

    target = hf_logging.get_logger("transformers.modeling_utils")
    target.addFilter(keep_out)
    try:
        model, info = auto_model.from_pretrained(name, output_loading_info=True, **kwargs)
    finally:
        target.removeFilter(keep_out)
    unused, missing = sorted(info.get("unexpected_keys") or []), sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if unused:
        logger.info("'%s' read as its backbone (%s): %d checkpoint weights unused (%s)", name, type(model).__name__,
                    len(unused), ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else ""))
    if missing or mismatched:
        logger.warning("'%s' read as its backbone (%s): %d weights not in the checkpoint and %d of another shape start "
                       "from random initialisation (%s)", name, type(model).__name__, len(missing), len(mismatched),
                       ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
    return model


def _is_offline_error(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        text = str(err)
        if "offline" in text.lower() or "couldn't connect" in text.lower() or "cannot find the requested files" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


# ---------------------------------------------------------------------------------------------
# Saving and reloading in each library's native format
# ---------------------------------------------------------------------------------------------


def save_native(model: nn.Module, output_dir: str | os.PathLike, state_dict: dict | None = None) -> str:
    """Save a classifier so its own library loads it back; returns the family name.

    timm: ``config.json`` + ``model.safetensors`` for ``timm.create_model("local-dir:DIR")``
    (or ``hf-hub:`` once pushed). transformers: ``save_pretrained`` plus the image processor.
    Plain modules: ``model.safetensors`` with the state dict.
    """
    import safetensors.torch

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    family = model_family(model)
    if family == "transformers":
        with _no_transformers_progress_bars():  # no "Writing model shards" bar at every checkpoint
            model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        from .preprocessing import export_processor  # the processor the run evaluated with

        export_processor(model).save_pretrained(output_dir)
    elif family == "timm":
        from timm.models._hub import save_config_for_hf

        from .preprocessing import timm_data_config

        spec = input_spec(model)
        # timm's save_for_hf = these two steps, but its save_file refuses weights that modules share (CoaT's
        # shared conv position encodings); _contiguous saves a copy per name, which timm's strict load fills.
        save_config_for_hf(
            model,
            str(output_dir / "config.json"),
            model_config={"label_names": label_names_of(model)} if label_names_of(model) else None,
            data_config=timm_data_config(spec),  # squash to the input size, as the run evaluated
        )
        _drop_weight_provenance(output_dir / "config.json")
        sd = state_dict if state_dict is not None else model.state_dict()
        safetensors.torch.save_file(_contiguous(sd), str(output_dir / WEIGHTS_NAME))
    else:
        sd = state_dict if state_dict is not None else model.state_dict()
        safetensors.torch.save_file(_contiguous(sd), str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return family


@contextlib.contextmanager
def progress_bars_off(is_enabled, disable, enable):
    """Turn a library's progress bars off for a block, as it was before afterwards
    (``progress_bars_off(datasets.is_progress_bar_enabled, datasets.disable_progress_bars, ...)``)."""
    was_enabled = is_enabled()
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()


def _no_transformers_progress_bars():
    from transformers.utils import logging as hf_logging

    return progress_bars_off(hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar,
                             hf_logging.enable_progress_bar)


# pretrained_cfg keys that describe the checkpoint a model was created from; a trained student's
# weights are its own, so they must not claim that checkpoint's tag, papers, licence or source.
_WEIGHT_PROVENANCE_KEYS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "paper_ids", "paper_name",
                           "origin_url", "license", "notes")


def _drop_weight_provenance(config_path: Path) -> None:
    cfg = _read_json(config_path)
    pretrained_cfg = (cfg or {}).get("pretrained_cfg")
    if not isinstance(pretrained_cfg, dict):
        return
    for key in _WEIGHT_PROVENANCE_KEYS:
        pretrained_cfg.pop(key, None)
    config_path.write_text(json.dumps(cfg, indent=2))


def _contiguous(sd: dict) -> dict:
    # safetensors refuses tensors that share memory (weights shared by modules, views): a copy for each
    # name after the first keeps every key, so a strict load_state_dict (timm, plain modules) still fits.
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        out[k] = v.clone().contiguous() if key in seen else v.contiguous()
        seen.add(key)
    return out


def _default_processor(model: nn.Module):
    """An image processor matching the model's input, so pipelines work after export."""
    from .preprocessing import export_processor

    return export_processor(model)


def load_native_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load weights saved by :func:`save_native` into an existing model, in place."""
    import safetensors.torch

    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    state = safetensors.torch.load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # transformers drops tied/duplicated weights on save; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights in {path} do not fit the model: missing {missing}, unexpected {unexpected}")
