"""What a teacher cache is on disk: the manifest, its Arrow shards and their plan, what the cache was built from
(and how that differs from what it is used with), top-k storage."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..models import declares_input_spec, input_spec, model_family, model_name

MANIFEST_NAME = "cache_info.json"
FORMAT_NAME = "hf_distill.teacher_cache"
FORMAT_VERSION = 1


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used as asked: partial, corrupt, or built from other inputs."""


# ---------------------------------------------------------------------------------------------
# Top-k storage
# ---------------------------------------------------------------------------------------------


def rebuild_logits(values: torch.Tensor, indices: torch.Tensor, tail_logsumexp: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """Full ``[..., C]`` logits from the top-k logits and the logsumexp of the other ``C - k``.

    The top-k positions get their exact logits; every other class gets the same value
    ``f = tail_logsumexp - log(C - k)``, the log of the mean of the tail's ``exp(z)``. Hence:

    * at temperature 1 the softmax is exact on the top-k classes and exact in total tail mass
      (spread uniformly over the tail instead of its true shape);
    * ``f <= min(top-k)``, so the top-k ordering and the argmax hold at every temperature;
    * at ``T != 1`` only the tail mass is approximate: ``(C - k) exp(f / T)`` versus
      ``sum exp(z_j / T)``; by the power-mean inequality it is over-estimated for ``T > 1`` and
      under-estimated for ``T < 1``, and the top-k probabilities move by the same small relative
      amount. A logit-regression loss (``distill_loss="mse"``) would regress the tail onto ``f``.
    """
    k = values.shape[-1]
    if num_classes <= k:
        raise ValueError(f"top_k={k} must be smaller than the number of classes ({num_classes})")
    fill = (tail_logsumexp.double() - math.log(num_classes - k)).float()
    full = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return full.scatter(-1, indices.long(), values.float())


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = logits.topk(k, dim=-1)
    tail = logits.double().scatter(-1, indices, float("-inf"))
    return values, indices, torch.logsumexp(tail, dim=-1).float()


# ---------------------------------------------------------------------------------------------
# What a cache is built from
# ---------------------------------------------------------------------------------------------


def teacher_fingerprint(model: nn.Module, max_values_per_tensor: int = 4096) -> str:
    """A hash of a model's weights: every state-dict entry's name, shape and dtype, and up to
    ``max_values_per_tensor`` evenly strided values of each (cheap for any model size, and any
    fine-tuning moves sampled values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // max_values_per_tensor)
        sample = flat[::step].contiguous().cpu()
        if sample.numel():
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _teacher_entries(teachers: Sequence[nn.Module]) -> list[dict]:
    return [{"name": model_name(t), "family": model_family(t), "weights": teacher_fingerprint(t),
             "input_spec": input_spec(t).to_dict() if declares_input_spec(t) else None} for t in teachers]


def _as_id_list(value) -> list[str] | None:
    if value is None:
        return None
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def _dataset_entry(dataset, image_column: str, label_column: str) -> dict:
    return {"fingerprint": getattr(dataset, "_fingerprint", None), "num_rows": len(dataset),
            "image_column": image_column, "label_column": label_column}


def _label_column_of(dataset, label_column: str | None) -> str | None:
    """``None`` (unlabelled images) when the default name ``"label"`` is asked for and the dataset has no such
    column; any other name is kept (and checked by :func:`_check_raw_dataset`)."""
    from ..data import is_stream

    if label_column == "label" and not is_stream(dataset) and "label" not in dataset.column_names:
        return None
    return label_column


def _check_raw_dataset(dataset, image_column: str, label_column: str) -> None:
    from ..data import is_stream

    if is_stream(dataset):
        raise TeacherCacheError("a teacher-output cache needs a dataset it can index (entries are stored per sample "
                                "and replayed by index): a stream (streaming=True) cannot be cached; train with a "
                                "live teacher, or load the data without streaming")
    for col in (image_column, label_column):
        if col is not None and col not in dataset.column_names:
            raise ValueError(f"column '{col}' not in the dataset; columns: {dataset.column_names}")
    fmt = getattr(dataset, "format", {}) or {}
    if fmt.get("type") is not None:
        raise ValueError(
            "pass the raw image dataset (no with_transform / with_format): its fingerprint identifies the cache, "
            f"and formatting changes it; this one has format type '{fmt.get('type')}'"
        )


_KEY_NAMES = {
    "weights": "fingerprint of the teacher weights",
    "student_spec": "student input spec",
    "fingerprint": "dataset fingerprint",
    "num_rows": "dataset length",
    "transform": "view transform",
    "top_k": "top-k",
}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {f"{prefix}[len]": len(value)}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _differences(cached: dict, given: dict) -> list[str]:
    """Human lines for every key of ``given`` whose value differs in ``cached``."""
    have, want = _flatten(cached), _flatten(given)
    lines = []
    for key, value in want.items():
        if have.get(key, "<absent>") != value:
            last = key.rsplit(".", 1)[-1].split("[")[0]
            top = key.split(".", 1)[0].split("[")[0]
            label = _KEY_NAMES.get(last) or _KEY_NAMES.get(top)
            lines.append(f"{key}{f' ({label})' if label else ''}: cache has {have.get(key, '<absent>')!r}, "
                         f"given {value!r}")
    return lines


# ---------------------------------------------------------------------------------------------
# Manifest and shards
# ---------------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise TeacherCacheError(f"{path} is not a teacher-cache manifest (format {manifest.get('format')!r})")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise TeacherCacheError(f"{path} has format version {manifest['version']}; this hf_distill reads "
                                f"up to {FORMAT_VERSION}")
    return manifest


def _remove_cache_files(cache_dir: str) -> None:
    for name in os.listdir(cache_dir):
        if (name.startswith("shard-") and (name.endswith(".arrow") or name.endswith(".tmp"))) or name in (
                MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
            os.remove(os.path.join(cache_dir, name))


def _features(num_classes: int, top_k: int | None, mixed: bool = False, feature_shapes=None,
              feature_dtype: str = "float16"):
    from datasets import Features, List, Value

    cols = {
        "index": Value("int64"), "epoch": Value("int32"), "label": Value("int64"),
        "crop_top": Value("int32"), "crop_left": Value("int32"), "crop_height": Value("int32"),
        "crop_width": Value("int32"), "flip": Value("bool"),
    }
    if mixed:
        cols.update(position=Value("int64"), mix_lam=Value("float64"), mix_partner=Value("int64"),
                    mix_box=List(Value("int32"), length=4))
    if feature_shapes is not None:  # per teacher: its summary vector and its (flattened) spatial map
        for i, shapes in enumerate(feature_shapes):
            for target, shape in shapes.items():
                cols[f"{target}_{i}"] = List(Value(feature_dtype), length=int(np.prod(shape)))
    elif top_k:
        cols.update(topk_values=List(Value("float32"), length=top_k), topk_indices=List(Value("int32"), length=top_k),
                    tail_logsumexp=Value("float32"))
    else:
        cols["logits"] = List(Value("float32"), length=num_classes)
    return Features(cols)


def _write_shard(path: str, columns: dict[str, np.ndarray], features) -> int:
    """Write one shard as a ``datasets`` Arrow file (temporary name, then renamed: never half-written)."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    arrays = []
    for name in features:
        value = np.ascontiguousarray(columns[name])
        if value.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value.shape[1]))
        else:
            arrays.append(pa.array(value))
    table = pa.Table.from_arrays(arrays, names=list(features)).cast(features.arrow_schema)
    tmp = f"{path}.{os.getpid()}.tmp"  # one temporary name per process: several may build at once
    writer = ArrowWriter(features=features, path=tmp)
    writer.write_table(table)
    rows, _ = writer.finalize()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows


def default_shard_size(num_entries: int, batch_size: int) -> int:
    """About 1/64 of the entries in whole batches (work for up to 64 builders, fine-grained resuming),
    at least one batch, at most 10,000 entries (or one batch when that is larger)."""
    batches = -(-max(1, -(-num_entries // 64)) // batch_size)
    return max(batch_size, min(batches * batch_size, 10_000 // batch_size * batch_size))


def _shard_plan(config: dict, n: int) -> list[tuple[int, int]]:
    """The entry range ``[start, stop)`` of every shard. Without mixing: ``shard_size`` entries each.
    With mixing: whole batches of an epoch's order (batches restart at every epoch), ``shard_size``
    entries' worth of batches per shard."""
    size, epochs = int(config["shard_size"]), int(config["stored_epochs"])
    total = epochs * n
    if "mixing" not in config:
        return [(start, min(start + size, total)) for start in range(0, total, size)]
    batch = int(config["batch_size"])
    batches = [(e * n + p, e * n + min(p + batch, n)) for e in range(epochs) for p in range(0, n, batch)]
    per_shard = max(1, size // batch)
    return [(group[0][0], group[-1][1]) for group in
            (batches[i:i + per_shard] for i in range(0, len(batches), per_shard))]


def _shard_entries(plan, done) -> list[dict]:
    return [{"file": _shard_name(i), "start": plan[i][0], "stop": plan[i][1], "rows": plan[i][1] - plan[i][0]}
            for i in sorted(done)]


def _shard_on_disk(cache_dir: str, i: int, span: tuple[int, int]) -> bool:
    """Shard ``i`` is complete: its file exists (files are renamed into place whole) with the rows it should have."""
    import pyarrow as pa

    path = os.path.join(cache_dir, _shard_name(i))
    if not os.path.exists(path):
        return False
    try:
        with pa.memory_map(path) as source:
            rows = pa.ipc.open_stream(source).read_all().num_rows
    except (OSError, pa.ArrowInvalid):
        return False
    return rows == span[1] - span[0]
