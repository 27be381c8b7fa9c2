"""Saving and reloading in each library's native format (:func:`save_native`,
:func:`load_native_weights`): a timm or transformers folder its own library reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from torch import nn

from .calling import label_names_of, model_family
from .loading import _read_json
from .specs import input_spec

WEIGHTS_NAME = "model.safetensors"


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
        from ..preprocessing import export_processor  # the processor the run evaluated with

        export_processor(model).save_pretrained(output_dir)
    elif family == "timm":
        from timm.models._hub import save_config_for_hf

        from ..preprocessing import timm_data_config

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
    from ..preprocessing import export_processor

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
