"""Loading models of either ecosystem: a timm architecture, a transformers / timm Hub repository or
a saved folder (:func:`load_model`), with one-line errors (:class:`ModelLoadError`), and the input
sizes a model takes (:func:`takes_input_size`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .calling import call_model, set_label_names, short_name
from .specs import _pair, input_spec, set_input_spec

logger = logging.getLogger("hf_distill.models")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


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


def _class_named_by(config):
    """The transformers class a saved config names in ``architectures`` (None when it names none we have)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    return getattr(transformers, archs[0], None) if archs else None


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
