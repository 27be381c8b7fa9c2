"""Teacher-output cache: soft labels computed once, read back at every epoch (FKD-style).

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022):
the teacher runs once over the training images - once per epoch when the views are random -
and each view's soft labels are stored together with the parameters of the view, so that
training replays exactly the view the teacher saw and never runs the teacher.

    cache = build_teacher_cache(teacher, train_raw, input_spec(student), "cache/", epochs=3,
                                augmentation="timm", top_k=None)
    train = with_teacher_cache(train_raw, cache, input_spec(student))
    args = DistillationTrainingArguments(..., teacher_cache_dir="cache/")
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=train,
                                  callbacks=[TeacherCacheCallback(train)])

On disk (``cache_dir``)::

    cache_info.json        manifest: status ("partial" | "complete"), what the cache was built from
                           ("config": teachers and their weight fingerprints, teacher id/revision,
                           student input spec, transform, dataset fingerprint/length, epochs, top_k, ...),
                           num_classes, num_entries and the list of complete shards
    shard-00000.arrow      ``datasets`` Arrow files (``Dataset.from_file``), ``shard_size`` entries each
    shard-00001.arrow      ...

Entry ``g`` (global row number over the shards, in order) holds view ``index = g % N`` of epoch
``g // N`` (``N = len(dataset)``). Columns: ``index`` (int64), ``epoch`` (int32), ``label`` (int64,
the dataset's label, for checks), the view parameters ``crop_top, crop_left, crop_height,
crop_width`` (int32, a box of the original image) and ``flip`` (bool), then either ``logits``
(float32 ``[C]``) or, with ``top_k``, ``topk_values`` (float32 ``[k]``, descending), ``topk_indices``
(int32 ``[k]``) and ``tail_logsumexp`` (float32: logsumexp of the ``C - k`` other logits).

Transforms (``augmentation``):

* ``"none"``: resize to the student's size + normalise (:func:`hf_distill.data.build_transform`,
  the same pixels as ``with_image_transform(..., augmentation="none")``). Deterministic, so one
  entry per sample whatever ``epochs`` says; the stored box is the whole image, ``flip`` False.
* ``"timm"``: the geometry of timm's training transform: random-resized-crop (scale (0.08, 1),
  ratio (3/4, 4/3), torchvision's sampling algorithm, the student's interpolation) then a
  horizontal flip with probability 0.5. No colour jitter (it is not a geometric view and would
  have to be stored too). The parameters of ``(epoch, index)`` come from
  ``numpy.random.default_rng([seed, epoch, index])``: they do not depend on the batch size, the
  shard size or on resuming, and are stored, so replay (``torchvision.transforms.functional``
  crop-resize-flip of the stored box) gives exactly the view the teacher saw.

Several teachers: each gets its own input adapter (:class:`hf_distill.teacher.Teachers`) and the
cache stores the mean of their logits (``teacher_ensemble="mean"``; ``"random"`` cannot be cached).

Exactness: full logits are stored as the float32 the teacher produced, so training reads bit for
bit what the teacher computed on the replayed view. A cached run equals a live-teacher run bit for
bit when the build's ``batch_size`` equals the training batch size (and the precision is the
same: the live trainer runs the teacher under autocast with --bf16/--fp16 on an accelerator,
the build in ``dtype``): CPU/GPU kernels are not batch-size invariant (other batch sizes differ in
the last bits, ~1e-7), though a row's result does not depend on the other rows of a batch of the
same size (on CPU; cuDNN may choose algorithms per call). ``top_k`` is lossy: see
:func:`rebuild_logits`.

Mismatch policy: :func:`build_teacher_cache` on a folder whose manifest was built from other
inputs **refuses** (listing the differences) unless ``overwrite=True``, which deletes the
cache's files and rebuilds it from scratch. The same inputs resume a partial cache from its
last complete shard, or return a complete one without running the teacher.
:func:`load_teacher_cache` refuses a partial cache and any difference from what it is given.

Epochs: :class:`TeacherCacheDataset` has ``set_epoch(epoch)`` and serves the entries of epoch
``epoch % stored_epochs``. In one process, accelerate's ``DataLoaderShard.set_epoch`` (called by
the Trainer before each epoch, and by ``DataLoaderShard.__iter__``) forwards the epoch to the
dataset. With several processes the sampler is wrapped in a ``BatchSamplerShard`` and accelerate
1.15 does *not* forward it to the dataset: add :class:`TeacherCacheCallback` (it sets the epoch at
``on_epoch_begin`` from ``state.epoch``; harmless in one process). Dataloader workers get the epoch
when they are started at each epoch; ``dataloader_persistent_workers=True`` would freeze it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from .callbacks import SetEpochCallback
from .models import InputSpec, declares_input_spec, input_spec, model_family, model_name
from .teacher import Teachers

logger = logging.getLogger(__name__)

MANIFEST_NAME = "cache_info.json"
FORMAT_NAME = "hf_distill.teacher_cache"
FORMAT_VERSION = 1
AUGMENTATIONS = ("none", "timm")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
HFLIP_PROB = 0.5

__all__ = [
    "TeacherCache",
    "TeacherCacheCallback",
    "TeacherCacheDataset",
    "TeacherCacheError",
    "ViewParams",
    "build_teacher_cache",
    "load_teacher_cache",
    "rebuild_logits",
    "teacher_fingerprint",
    "with_teacher_cache",
]


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used as asked: partial, corrupt, or built from other inputs."""


# ---------------------------------------------------------------------------------------------
# Views: parameters drawn from (seed, epoch, index), replayed exactly
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """One view of an image: crop box ``(top, left, height, width)`` of the original image, then flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_view_params(seed: int, epoch: int, index: int, image_width: int, image_height: int,
                     augmentation: str) -> ViewParams:
    """The view of sample ``index`` at ``epoch``: a pure function of its arguments.

    ``"timm"`` follows torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a central
    crop) with scale (0.08, 1) and ratio (3/4, 4/3), then a flip with probability 0.5, drawing
    from ``numpy.random.default_rng([seed, epoch, index])``.
    """
    if augmentation == "none":
        return ViewParams(0, 0, image_height, image_width, False)
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    width, height = image_width, image_height
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(RRC_SCALE[0], RRC_SCALE[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:  # central crop at the nearest allowed ratio
        in_ratio = width / height
        if in_ratio < min(RRC_RATIO):
            w, h = width, int(round(width / min(RRC_RATIO)))
        elif in_ratio > max(RRC_RATIO):
            h, w = height, int(round(height * max(RRC_RATIO)))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < HFLIP_PROB)
    return ViewParams(*box, flip)


def _image_mode(spec: InputSpec) -> str:
    return "L" if spec.in_chans == 1 else "RGB"


def render_view(image, params: ViewParams, spec: InputSpec, augmentation: str) -> torch.Tensor:
    """The normalised tensor of one view of a PIL image, for a student with input ``spec``."""
    if augmentation == "none":
        from .data import build_transform

        return build_transform(spec, training=False, augmentation="none")(image)
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    interp = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    img = image.convert(_image_mode(spec))
    img = TF.resized_crop(img, params.top, params.left, params.height, params.width, list(spec.image_size),
                          interpolation=interp)
    if params.flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), list(spec.mean), list(spec.std))


def _transform_config(augmentation: str, seed: int) -> dict:
    if augmentation == "none":
        return {"augmentation": "none"}
    return {"augmentation": augmentation, "random_resized_crop": {"scale": list(RRC_SCALE), "ratio": list(RRC_RATIO)},
            "hflip_prob": HFLIP_PROB, "seed": int(seed), "params_rng": "numpy.default_rng([seed, epoch, index])"}


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
    from .data import is_stream

    if label_column == "label" and not is_stream(dataset) and "label" not in dataset.column_names:
        return None
    return label_column


def _check_raw_dataset(dataset, image_column: str, label_column: str) -> None:
    from .data import is_stream

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


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_teacher_cache(
    teachers: nn.Module | Sequence[nn.Module],
    dataset,
    student_spec: InputSpec,
    cache_dir: str | os.PathLike,
    *,
    epochs: int = 1,
    augmentation: str = "none",
    top_k: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    mixing=None,
    teacher_id: str | Sequence[str] | None = None,
    teacher_revision: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    shard_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
    outputs: str = "logits",
    feature_targets: Sequence[str] = ("summary", "spatial"),
    feature_grid: int | None = None,
    feature_dtype: str = "float16",
) -> "TeacherCache":
    """Run the teacher(s) once over ``dataset`` (per epoch for random views) and store their logits
    (or, ``outputs="features"``, their backbone features).

    Args:
        teachers: a teacher module or several (their logits are averaged). They are frozen.
        dataset: the raw ``datasets.Dataset`` with PIL images (no transform set).
        student_spec: the student's :class:`InputSpec` (views are made for the student; each
            teacher re-normalises them through its adapter, as in training).
        cache_dir: output folder (created).
        epochs: number of epochs of views for ``augmentation="timm"`` or with ``mixing``;
            ``"none"`` without mixing stores one.
        augmentation: ``"none"`` or ``"timm"`` (random-resized-crop + flip; see the module doc).
        top_k: store only the ``k`` largest logits (+ the tail's logsumexp) instead of all.
        batch_size: images per teacher forward; with ``mixing``, the training batch size (batches
            are mixed, so a mixed cache serves exactly that batch size).
        seed: seed of the view parameters (and, with ``mixing``, of the epoch order and the mixing:
            the training run's ``data_seed``, or ``seed``).
        mixing: a :class:`hf_distill.mixing.MixingConfig` with mixup / CutMix on: each batch, in the
            epoch's order, is mixed as training will mix it and the logits of the *mixed* views are
            stored with the mixing (partner, lambda, box).
        teacher_id / teacher_revision: what the teacher was loaded from (recorded, checked by
            :func:`load_teacher_cache`); default: the teachers' names.
        shard_size: entries per Arrow shard (the unit of resuming and of splitting the work between
            processes; whole batches with ``mixing``). Default: a partial build's own, else about
            1/64 of the entries, in whole batches, between one batch and 10,000 entries, so up to 64
            processes share even a small build.
        device / dtype: where and in which dtype the teachers run (default: their device, float32).
        overwrite: rebuild from scratch when ``cache_dir`` holds a cache built from other inputs
            (otherwise that raises :class:`TeacherCacheError`).
        on_shard_written: called with the shard number after each shard this process wrote.
        outputs: ``"logits"`` (the mean of the teachers' logits) or ``"features"`` (for
            ``distill_method="feature"``: each teacher's backbone features,
            :func:`hf_distill.features.backbone_features`, stored per teacher).
        feature_targets: with features, which to store: ``"summary"`` (a vector per image) and/or
            ``"spatial"`` (the teacher's map or patch grid).
        feature_grid: with features, average-pool each spatial map to at most this many cells a side
            (a 16x16 ViT-L grid is 512 KB per view in float16, 8x8 is 128 KB); ``None`` keeps it whole.
            The student then learns the pooled map.
        feature_dtype: ``"float16"`` (half the disk; relative rounding ~5e-4) or ``"float32"`` (exact).

    Returns the complete :class:`TeacherCache`. A build that stops early leaves a manifest with
    status ``"partial"`` and its complete shards; calling again with the same inputs resumes. Under
    ``torchrun`` (several processes), the missing shards are split between the processes, each
    written once; the first process writes the manifest.
    """
    from .data import without_image_decoding

    teachers = list(teachers) if isinstance(teachers, (list, tuple, nn.ModuleList)) else [teachers]
    if not teachers:
        raise ValueError("build_teacher_cache needs at least one teacher")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got '{augmentation}'")
    if int(epochs) < 1 or int(batch_size) < 1 or (shard_size is not None and int(shard_size) < 1):
        raise ValueError("epochs, batch_size and shard_size must be >= 1")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    mixing = mixing if mixing is not None and mixing.enabled else None
    if outputs not in ("logits", "features"):
        raise ValueError(f"outputs must be 'logits' or 'features', got '{outputs}'")
    if outputs == "features":
        from .features import targets_of

        feature_targets = targets_of(list(feature_targets))
        if top_k or mixing is not None:
            raise ValueError("a feature cache stores each view's features: top_k and mixup / CutMix apply to logits")
        if feature_dtype not in ("float16", "float32"):
            raise ValueError(f"feature_dtype must be 'float16' or 'float32', got '{feature_dtype}'")
        if feature_grid is not None and int(feature_grid) < 1:
            raise ValueError(f"feature_grid must be >= 1 or None, got {feature_grid}")
        label_column = _label_column_of(dataset, label_column)
    _check_raw_dataset(dataset, image_column, label_column)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    cache_dir = os.fspath(cache_dir)
    state = _process_state()
    if state.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)

    stored_epochs = 1 if augmentation == "none" and mixing is None else int(epochs)
    if shard_size is None:  # a partial build resumes with its own shards
        old = _read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
        shard_size = (old["config"]["shard_size"] if old is not None and old["status"] == "partial"
                      else default_shard_size(stored_epochs * n, int(batch_size)))
    config = {
        "teachers": _teacher_entries(teachers),
        "teacher_id": _as_id_list(teacher_id) or [model_name(t) for t in teachers],
        "teacher_revision": teacher_revision,
        "teacher_dtype": str(dtype).replace("torch.", ""),
        "student_spec": student_spec.to_dict(),
        "transform": _transform_config(augmentation, seed),
        "dataset": _dataset_entry(dataset, image_column, label_column),
        "epochs": int(epochs),
        "stored_epochs": stored_epochs,
        "top_k": int(top_k) if top_k else None,
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),
    }
    if mixing is not None:
        config["mixing"] = {**mixing.to_dict(), "seed": int(seed), "order": "numpy.default_rng([seed, epoch])"}
    if outputs == "features":
        config.update(outputs="features", feature_targets=list(feature_targets),
                      feature_grid=int(feature_grid) if feature_grid else None, feature_dtype=feature_dtype)
    plan = _shard_plan(config, n)
    num_entries = stored_epochs * n

    manifest = _read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if manifest is not None and manifest["config"] != config:
        diff = _differences(manifest["config"], config)
        if not overwrite:
            raise TeacherCacheError(
                f"{cache_dir} holds a teacher cache built from other inputs:\n  - " + "\n  - ".join(diff)
                + "\nUse another folder, or overwrite=True (CLI: --overwrite) to delete it and rebuild."
            )
        state.wait_for_everyone()  # every process has read the old manifest before it goes
        if state.is_main_process:
            logger.warning("rebuilding the teacher cache in %s from scratch (%s)", cache_dir, "; ".join(diff))
            _remove_cache_files(cache_dir)
        manifest = None
    if manifest is not None and manifest["status"] == "complete":
        logger.info("teacher cache in %s is complete; nothing to do", cache_dir)
        return load_teacher_cache(cache_dir)
    reading = without_image_decoding(dataset, image_column)
    first = next(teachers[0].parameters(), None)
    if device is None:
        device = state.device if state.num_processes > 1 else (first.device if first is not None else "cpu")
    device = torch.device(device)
    with _left_as_they_are(teachers):
        return _build(_placed(teachers, device, dtype), reading, config, plan, manifest, cache_dir, state, n,
                      num_entries, student_spec, augmentation, seed, int(batch_size), image_column, label_column,
                      outputs, feature_targets, feature_dtype, mixing, top_k, device, on_shard_written)


def _placed(teachers: list[nn.Module], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """The teachers on ``device`` in ``dtype``: a copy of each that is elsewhere, so that the caller's teacher
    (whose fingerprint the cache records) is never cast or moved."""
    import copy

    placed = []
    for teacher in teachers:
        tensors = list(teacher.parameters()) + list(teacher.buffers())
        here = all(t.device.type == device.type and device.index in (None, t.device.index)
                   and (t.dtype == dtype or not t.is_floating_point()) for t in tensors)
        placed.append(teacher if here else copy.deepcopy(teacher).to(device=device, dtype=dtype))
    return placed


class _left_as_they_are:
    """Restores the teachers' train/eval modes and ``requires_grad`` flags (running them freezes them)."""

    def __init__(self, teachers):
        self.teachers = teachers

    def __enter__(self):
        self.modes = [[m.training for m in t.modules()] for t in self.teachers]
        self.grads = [[p.requires_grad for p in t.parameters()] for t in self.teachers]

    def __exit__(self, *exc):
        for teacher, modes, grads in zip(self.teachers, self.modes, self.grads):
            for module, mode in zip(teacher.modules(), modes):
                module.training = mode
            for param, grad in zip(teacher.parameters(), grads):
                param.requires_grad_(grad)
        return False


def _build(teachers, reading, config, plan, manifest, cache_dir, state, n, num_entries, student_spec, augmentation,
           seed, batch_size, image_column, label_column, outputs, feature_targets, feature_dtype, mixing, top_k,
           device, on_shard_written) -> "TeacherCache":
    """The build itself, with teachers already placed (see :func:`build_teacher_cache`)."""
    shapes = None
    if outputs == "features":
        num_classes = None
        shapes = _feature_shapes(teachers, reading, student_spec, augmentation, seed, image_column, feature_targets,
                                 config["feature_grid"])
    else:
        num_classes = _num_classes(teachers, reading, student_spec, augmentation, seed, image_column)
    if top_k is not None and int(top_k) >= num_classes:
        raise ValueError(f"top_k={top_k} must be smaller than the number of classes ({num_classes})")
    if manifest is None:
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "status": "partial", "config": config,
            "num_classes": num_classes, "num_entries": num_entries, "num_shards": len(plan), "shards": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if shapes is not None:
            manifest["feature_shapes"] = shapes
        state.wait_for_everyone()
        if state.is_main_process:
            _remove_cache_files(cache_dir)  # stray shards of a build killed before its first manifest
            _write_json_atomic(os.path.join(cache_dir, MANIFEST_NAME), manifest)
    elif state.is_main_process:  # half-written shards of a killed build (nobody writes before the barrier below)
        for name in os.listdir(cache_dir):
            if name.startswith("shard-") and name.endswith(".tmp"):
                os.remove(os.path.join(cache_dir, name))
    state.wait_for_everyone()

    missing = [i for i, span in enumerate(plan) if not _shard_on_disk(cache_dir, i, span)]
    if len(missing) < len(plan):
        logger.info("resuming the teacher cache in %s: %d of %d shards to build", cache_dir, len(missing), len(plan))
    mine = missing[state.process_index::state.num_processes]  # each shard written by one process
    ensemble = Teachers(teachers, student_spec)
    ensemble.to(device=device)  # the input adapters (the teachers are placed already)
    mixer = None
    if mixing is not None:
        from .mixing import BatchMixer, EpochOrder

        mixer, order = BatchMixer(mixing, num_classes, seed), EpochOrder(n, seed)
    features = _features(num_classes, config["top_k"], mixed=mixer is not None, feature_shapes=shapes,
                         feature_dtype=feature_dtype)
    for shard in mine:
        start, stop = plan[shard]
        if shapes is not None:
            data = _shard_rows(ensemble, reading, start, stop, n, int(batch_size), seed, student_spec, augmentation,
                               image_column, label_column, device,
                               outputs=lambda views: _teacher_features(ensemble, views, device, shapes, config["feature_grid"],
                                                                      feature_dtype))
        elif mixer is None:
            data = _shard_rows(ensemble, reading, start, stop, n, int(batch_size), seed, student_spec, augmentation,
                               image_column, label_column, device)
        else:
            data = _mixed_shard_rows(ensemble, reading, start, stop, n, int(batch_size), seed, student_spec,
                                     augmentation, image_column, label_column, device, mixer, order)
        if shapes is not None:
            pass  # feature columns are ready
        elif config["top_k"]:
            values, indices, tail = _topk(data.pop("logits"), config["top_k"])
            data.update(topk_values=values.numpy(), topk_indices=indices.to(torch.int32).numpy(),
                        tail_logsumexp=tail.numpy())
        else:
            data["logits"] = data["logits"].numpy()
        rows = _write_shard(os.path.join(cache_dir, _shard_name(shard)), data, features)
        if state.num_processes == 1:  # progress in the manifest; with several processes the first writes it last
            manifest["shards"] = _shard_entries(plan, [i for i in range(len(plan)) if i <= shard or i not in missing])
            _write_json_atomic(os.path.join(cache_dir, MANIFEST_NAME), manifest)
        logger.info("teacher cache: shard %d/%d written (%d entries)", shard + 1, len(plan), rows)
        if on_shard_written is not None:
            on_shard_written(shard)
    state.wait_for_everyone()
    if state.is_main_process:
        absent = [i for i, span in enumerate(plan) if not _shard_on_disk(cache_dir, i, span)]
        if absent:
            raise TeacherCacheError(f"{cache_dir}: shards {absent} are missing after the build")
        manifest.update(shards=_shard_entries(plan, range(len(plan))), status="complete",
                        completed=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_json_atomic(os.path.join(cache_dir, MANIFEST_NAME), manifest)
    state.wait_for_everyone()
    return load_teacher_cache(cache_dir)


def _process_state():
    """accelerate's view of the processes (one, or those ``torchrun`` started). On a machine without a GPU it
    must be told so (``cpu=True``), or each torchrun process would believe it is alone. The processes wait
    for each other at the end of the build, after unequal shares of teacher passes: the timeout is long."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


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


def _num_classes(teachers, reading, spec, augmentation, seed, image_column) -> int:
    """The teachers' number of classes, from one forward pass on the first image."""
    from .data import decode_image

    image = decode_image(reading[0][image_column])
    view = render_view(image, draw_view_params(seed, 0, 0, image.width, image.height, augmentation), spec,
                       augmentation)
    ensemble = Teachers(teachers, spec)
    device = next(ensemble.parameters()).device if next(ensemble.parameters(), None) is not None else "cpu"
    return int(ensemble(view.unsqueeze(0).to(device))[0].shape[-1])


def _teacher_logits(ensemble, views: list[torch.Tensor], device) -> torch.Tensor:
    outs = ensemble(torch.stack(views).to(device))
    return (outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)).float().cpu()


def _pooled(spatial: torch.Tensor, grid: int | None) -> torch.Tensor:
    if grid is None or (spatial.shape[-2] <= grid and spatial.shape[-1] <= grid):
        return spatial
    return torch.nn.functional.adaptive_avg_pool2d(spatial.float(), (min(grid, spatial.shape[-2]),
                                                                     min(grid, spatial.shape[-1])))


def _feature_shapes(teachers, reading, spec, augmentation, seed, image_column, targets, grid) -> list[dict]:
    """Per teacher, the shape of each stored target (``{"summary": [D], "spatial": [D, h, w]}``), from one forward
    pass on the first image."""
    from .data import decode_image

    image = decode_image(reading[0][image_column])
    view = render_view(image, draw_view_params(seed, 0, 0, image.width, image.height, augmentation), spec,
                       augmentation)
    ensemble = Teachers(teachers, spec)
    device = next(ensemble.parameters()).device if next(ensemble.parameters(), None) is not None else "cpu"
    shapes = []
    for summary, spatial in ensemble.backbone_features(view.unsqueeze(0).to(device)):
        found = {"summary": list(summary.shape[1:]), "spatial": list(_pooled(spatial, grid).shape[1:])}
        shapes.append({t: found[t] for t in targets})
    return shapes


def _teacher_features(ensemble, views: list[torch.Tensor], device, shapes: list[dict], grid: int | None,
                      dtype: str) -> dict:
    """Each teacher's stored feature columns for a batch of views: ``summary_<i>`` [B, D], ``spatial_<i>``
    [B, D*h*w] (pooled to ``grid`` as in :func:`_feature_shapes`), in the stored dtype."""
    outs = ensemble.backbone_features(torch.stack(views).to(device))
    cols = {}
    for i, (summary, spatial) in enumerate(outs):
        if "summary" in shapes[i]:
            cols[f"summary_{i}"] = summary.float().cpu().numpy().astype(dtype)
        if "spatial" in shapes[i]:
            pooled = _pooled(spatial, grid)
            cols[f"spatial_{i}"] = pooled.float().cpu().reshape(len(views), -1).numpy().astype(dtype)
    return cols


def _views(reading, indices: list[int], epoch_of: list[int], seed: int, spec, augmentation, image_column,
           label_column, cols: dict) -> list[torch.Tensor]:
    """Rendered views of samples ``indices`` (one Arrow read), their columns appended to ``cols``.

    An unreadable image is refused, naming its file: a teacher cache needs every image."""
    from .data import BadImageError, decode_image

    rows = reading[list(indices)]
    labels = rows[label_column] if label_column is not None else [-1] * len(indices)  # -1: unlabelled
    views = []
    for index, epoch, value, label in zip(indices, epoch_of, rows[image_column], labels):
        try:
            image = decode_image(value)
        except BadImageError as err:
            raise TeacherCacheError(f"sample {index}: {err}. A teacher cache needs every image: fix or remove "
                                    "it") from None
        params = draw_view_params(seed, epoch, index, image.width, image.height, augmentation)
        views.append(render_view(image, params, spec, augmentation))
        for key, v in (("index", index), ("epoch", epoch), ("label", int(label)), ("crop_top", params.top),
                       ("crop_left", params.left), ("crop_height", params.height), ("crop_width", params.width),
                       ("flip", params.flip)):
            cols[key].append(v)
    return views


def _shard_rows(ensemble, reading, start, stop, n, batch_size, seed, spec, augmentation, image_column, label_column,
                device, outputs=None) -> dict:
    """Entries ``start:stop`` (sample ``g % n`` of epoch ``g // n``): views and the teachers' logits (or the
    columns ``outputs(views)`` gives)."""
    cols: dict[str, list] = {key: [] for key in _VIEW_COLUMNS}
    parts = []
    for b0 in range(start, stop, batch_size):
        entries = [divmod(g, n) for g in range(b0, min(b0 + batch_size, stop))]
        views = _views(reading, [i for _, i in entries], [e for e, _ in entries], seed, spec, augmentation,
                       image_column, label_column, cols)
        parts.append(outputs(views) if outputs is not None else {"logits": _teacher_logits(ensemble, views, device)})
    out = {key: np.asarray(v) for key, v in cols.items()}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else np.concatenate(values)
    return out


def _mixed_shard_rows(ensemble, reading, start, stop, n, batch_size, seed, spec, augmentation, image_column,
                      label_column, device, mixer, order) -> dict:
    """Entries ``start:stop`` of a mixed cache: position ``g % n`` of epoch ``g // n``'s order, batch by batch,
    each batch mixed as training mixes it; the logits are the teachers' on the mixed views."""
    cols: dict[str, list] = {key: [] for key in (*_VIEW_COLUMNS, "position", "mix_lam", "mix_partner", "mix_box")}
    logits = []
    g = start
    while g < stop:
        epoch, position = divmod(g, n)
        count = min(batch_size, n - position)  # batches restart at every epoch
        indices = [int(i) for i in order.permutation(epoch)[position:position + count]]
        x = torch.stack(_views(reading, indices, [epoch] * count, seed, spec, augmentation, image_column,
                               label_column, cols))
        params = mixer.params(epoch, position // batch_size, x.shape)
        for i in range(count):
            cols["position"].append(position + i)
            cols["mix_lam"].append(params.lam[i])
            cols["mix_partner"].append(position + params.partner[i])
            box = params.boxes[i] if params.boxes else None
            cols["mix_box"].append(list(box) if box is not None else [-1, -1, -1, -1])
        logits.append(_teacher_logits(ensemble, list(mixer.apply(x, params)), device))
        g += count
    return {**{key: np.asarray(v) for key, v in cols.items()}, "logits": torch.cat(logits)}


_VIEW_COLUMNS = ("index", "epoch", "label", "crop_top", "crop_left", "crop_height", "crop_width", "flip")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class TeacherCache:
    """A complete teacher cache on disk (memory-mapped Arrow shards). Use :func:`load_teacher_cache`."""

    def __init__(self, cache_dir: str, manifest: dict):
        from datasets import Dataset, concatenate_datasets

        self.cache_dir = cache_dir
        self.manifest = manifest
        self.config = manifest["config"]
        self.outputs: str = self.config.get("outputs", "logits")  # or "features", per teacher
        self.feature_shapes: list[dict] | None = manifest.get("feature_shapes")
        self.feature_targets: list[str] = self.config.get("feature_targets", [])
        self.num_classes: int | None = int(manifest["num_classes"]) if manifest.get("num_classes") else None
        self.top_k: int | None = self.config["top_k"]
        self.stored_epochs: int = int(self.config["stored_epochs"])
        self.num_samples: int = int(self.config["dataset"]["num_rows"])
        self.augmentation: str = self.config["transform"]["augmentation"]
        self.mixed: bool = "mixing" in self.config  # entries in each epoch's order, logits of mixed views
        self.student_spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in self.config["student_spec"].items()})
        shards = [Dataset.from_file(os.path.join(cache_dir, s["file"])) for s in manifest["shards"]]
        data = shards[0] if len(shards) == 1 else concatenate_datasets(shards)
        if len(data) != manifest["num_entries"]:
            raise TeacherCacheError(f"{cache_dir}: the shards hold {len(data)} entries, the manifest says "
                                    f"{manifest['num_entries']}")
        self.data = data.with_format("numpy", dtype=None)  # keep float64 (mixing lambdas): replay is exact
        self._columns: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        what = (f"features={self.feature_targets}, teachers={len(self.feature_shapes)}" if self.outputs == "features"
                else f"classes={self.num_classes}, top_k={self.top_k}")
        return (f"TeacherCache({self.cache_dir!r}, samples={self.num_samples}, epochs={self.stored_epochs}, "
                f"{what}, augmentation={self.augmentation!r})")

    def features_of(self, row: dict) -> dict[str, torch.Tensor]:
        """A feature cache row's features as float32 tensors: ``{"<teacher index>/summary": [D],
        "<teacher index>/spatial": [D, h, w]}``."""
        out = {}
        for i, shapes in enumerate(self.feature_shapes or []):
            for target, shape in shapes.items():
                out[f"{i}/{target}"] = torch.from_numpy(
                    np.asarray(row[f"{target}_{i}"], dtype=np.float32).reshape(shape))
        return out

    def _epoch_columns(self, e: int) -> dict[str, np.ndarray]:
        """One stored epoch's columns as arrays, read once: per-row Arrow formatting costs ~1 ms a row."""
        if self._columns is None or self._columns[0] != e:
            n = self.num_samples
            self._columns = (e, dict(self.data[e * n:(e + 1) * n]))
        return self._columns[1]

    def labels_outside_top_k(self) -> int:
        """How many stored entries keep a top-k that does not contain the image's label (0 for full logits)."""
        if not self.top_k:
            return 0
        columns = self.data.select_columns(["topk_indices", "label"])[:]
        indices, labels = np.asarray(columns["topk_indices"]), np.asarray(columns["label"])
        return int((indices != labels[:, None]).all(axis=1).sum())

    def cache_epoch(self, epoch: int) -> int:
        """The stored epoch that serves training epoch ``epoch`` (wraps around)."""
        return int(epoch) % self.stored_epochs

    def entry(self, epoch: int, key: int) -> dict:
        """The stored row for training epoch ``epoch`` of sample ``key`` (numpy values); of position ``key``
        in the epoch's order for a mixed cache."""
        key = int(key)
        if not 0 <= key < self.num_samples:
            raise IndexError(f"{key} out of range for a cache of {self.num_samples} samples")
        e = self.cache_epoch(epoch)
        columns = self._epoch_columns(e)
        row = {name: values[key] for name, values in columns.items()}
        field = "position" if self.mixed else "index"
        if int(row[field]) != key or int(row["epoch"]) != e:
            raise TeacherCacheError(f"{self.cache_dir}: corrupt cache: row for (epoch {e}, {field} {key}) holds "
                                    f"(epoch {int(row['epoch'])}, {field} {int(row[field])})")
        return row

    @staticmethod
    def params_of(row: dict) -> ViewParams:
        return ViewParams(int(row["crop_top"]), int(row["crop_left"]), int(row["crop_height"]),
                          int(row["crop_width"]), bool(row["flip"]))

    def params(self, epoch: int, index: int) -> ViewParams:
        return self.params_of(self.entry(epoch, index))

    def logits_of(self, row: dict) -> torch.Tensor:
        """Float32 ``[C]`` teacher logits of a row (rebuilt with :func:`rebuild_logits` for top-k)."""
        if self.top_k:
            return rebuild_logits(torch.from_numpy(np.asarray(row["topk_values"], dtype=np.float32)),
                                  torch.from_numpy(np.asarray(row["topk_indices"], dtype=np.int64)),
                                  torch.tensor(float(row["tail_logsumexp"]), dtype=torch.float32), self.num_classes)
        return torch.from_numpy(np.array(row["logits"], dtype=np.float32))

    def logits(self, epoch: int, index: int) -> torch.Tensor:
        return self.logits_of(self.entry(epoch, index))

    def render(self, image, params: ViewParams) -> torch.Tensor:
        """Replay a stored view of a PIL image (the exact pixels the teacher saw)."""
        return render_view(image, params, self.student_spec, self.augmentation)

    def check(self, *, dataset=None, student_spec: InputSpec | None = None,
              teachers: nn.Module | Sequence[nn.Module] | None = None, teacher_id=None, teacher_revision=None,
              augmentation: str | None = None, seed: int | None = None, top_k: int | None = None,
              image_column: str | None = None, label_column: str | None = None, mixing=None,
              batch_size: int | None = None, outputs: str | None = None,
              feature_targets: Sequence[str] | None = None) -> None:
        """Raise :class:`TeacherCacheError` listing every difference from what is given (``None``: not checked)."""
        given: dict[str, Any] = {}
        if dataset is not None:
            given["dataset"] = {"fingerprint": getattr(dataset, "_fingerprint", None), "num_rows": len(dataset)}
        if image_column is not None:
            given.setdefault("dataset", {})["image_column"] = image_column
        if label_column is not None:
            given.setdefault("dataset", {})["label_column"] = label_column
        if student_spec is not None:
            given["student_spec"] = student_spec.to_dict()
        if teachers is not None:
            teachers = list(teachers) if isinstance(teachers, (list, tuple, nn.ModuleList)) else [teachers]
            given["teachers"] = _teacher_entries(teachers)
        if teacher_id is not None:
            given["teacher_id"] = _as_id_list(teacher_id)
        if teacher_revision is not None:
            given["teacher_revision"] = teacher_revision
        if augmentation is not None:
            given.setdefault("transform", {})["augmentation"] = augmentation
        if seed is not None and self.augmentation != "none":
            given.setdefault("transform", {})["seed"] = int(seed)
        if top_k is not None:
            given["top_k"] = int(top_k) or None
        if outputs is not None and outputs != self.outputs:
            given["outputs"] = outputs
        if feature_targets is not None and not set(feature_targets) <= set(self.feature_targets):
            given["feature_targets"] = list(feature_targets)
        if mixing is not None:
            wanted = mixing.to_dict() if mixing.enabled else None
            stored = {k: v for k, v in self.config["mixing"].items() if k in (wanted or {})} if self.mixed else None
            if stored != wanted:
                given["mixing"] = wanted if wanted is not None else "off"
            elif self.mixed:  # batches and their mixing are the cache's: the same batch size and seed
                if batch_size is not None:
                    given["batch_size"] = int(batch_size)
                if seed is not None:
                    given.setdefault("mixing", {})["seed"] = int(seed)
        diff = _differences({**self.config, "mixing": self.config.get("mixing", "off"), "outputs": self.outputs},
                            given)
        if diff:
            raise TeacherCacheError(
                f"the teacher cache in {self.cache_dir} does not match what it is used with:\n  - "
                + "\n  - ".join(diff)
                + "\nRebuild it (build_teacher_cache / hf-distill cache-teacher) for these inputs."
            )


def load_teacher_cache(cache_dir: str | os.PathLike, *, dataset=None, student_spec: InputSpec | None = None,
                       teachers: nn.Module | Sequence[nn.Module] | None = None, teacher_id=None,
                       teacher_revision: str | None = None, augmentation: str | None = None, seed: int | None = None,
                       top_k: int | None = None) -> TeacherCache:
    """Open a complete cache; refuse a partial one and any mismatch with the given inputs (``None``: unchecked).

    ``teachers`` checks the weight fingerprints (and names / input specs), ``dataset`` its
    fingerprint and length, ``student_spec`` the student input spec.
    """
    cache_dir = os.fspath(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise TeacherCacheError(f"no teacher cache in {cache_dir} (no {MANIFEST_NAME}); build it with "
                                "build_teacher_cache / hf-distill cache-teacher")
    if manifest.get("status") != "complete":
        raise TeacherCacheError(
            f"the teacher cache in {cache_dir} is partial ({len(manifest.get('shards', []))} of "
            f"{manifest.get('num_shards')} shards): its build was interrupted. Run build_teacher_cache "
            "(hf-distill cache-teacher) again with the same inputs to resume it."
        )
    cache = TeacherCache(cache_dir, manifest)
    cache.check(dataset=dataset, student_spec=student_spec, teachers=teachers, teacher_id=teacher_id,
                teacher_revision=teacher_revision, augmentation=augmentation, seed=seed, top_k=top_k)
    return cache


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------


class TeacherCacheDataset(torch.utils.data.Dataset):
    """Map-style training data: ``{"pixel_values", "labels", "teacher_logits"}`` from a teacher cache.

    ``pixel_values`` is the view the teacher saw at the current epoch (replayed from the stored
    parameters) and ``teacher_logits`` its cached logits. ``set_epoch`` selects the epoch
    (``epoch % stored_epochs``); see the module doc for who calls it.

    A *mixed* cache (built with mixup / CutMix) is read by position in the stored epoch's order
    (``ordered_by_epoch``: the trainer reads it sequentially), and each item also carries where it
    sits (``mix_epoch``, ``mix_position``) and its stored mixing (``mix_lam``, ``mix_partner``,
    ``mix_box``): the trainer mixes the unmixed views exactly as the teacher saw them mixed, and
    ``teacher_logits`` are those of the mixed view.
    """

    def __init__(self, dataset, cache: TeacherCache, student_spec: InputSpec, image_column: str = "image",
                 label_column: str = "label"):
        from .data import without_image_decoding

        label_column = _label_column_of(dataset, label_column)
        _check_raw_dataset(dataset, image_column, label_column)
        cache.check(dataset=dataset, student_spec=student_spec, image_column=image_column, label_column=label_column)
        self.dataset = dataset
        self._reading = without_image_decoding(dataset, image_column)
        self.cache = cache
        self.student_spec = student_spec
        self.image_column, self.label_column = image_column, label_column
        self.epoch = 0
        self.ordered_by_epoch = cache.mixed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, keys) -> list[dict[str, Any]]:
        """Items by sample index, or by position in the epoch's order for a mixed cache (one Arrow read each)."""
        from .data import decode_image

        rows = [self.cache.entry(self.epoch, int(k)) for k in keys]
        indices = [int(row["index"]) for row in rows]
        batch = self._reading[indices]
        labels = batch[self.label_column] if self.label_column is not None else [None] * len(indices)
        out = []
        for index, row, value, label in zip(indices, rows, batch[self.image_column], labels):
            item = {"pixel_values": self.cache.render(decode_image(value), self.cache.params_of(row))}
            if label is not None:
                label = int(label)
                if int(row["label"]) != label:
                    raise TeacherCacheError(
                        f"sample {index}: the dataset's label is {label}, the cache's {int(row['label'])}")
                item["labels"] = label
            if self.cache.outputs == "features":
                item.update({f"teacher_features/{k}": v for k, v in self.cache.features_of(row).items()})
            else:
                item["teacher_logits"] = self.cache.logits_of(row)
            if self.cache.mixed:
                item.update(mix_epoch=self.cache.cache_epoch(self.epoch), mix_position=int(row["position"]),
                            mix_lam=float(row["mix_lam"]), mix_partner=int(row["mix_partner"]),
                            mix_box=[int(v) for v in row["mix_box"]])
            out.append(item)
        return out


def with_teacher_cache(dataset, cache: TeacherCache | str | os.PathLike, student_spec: InputSpec,
                       image_column: str = "image", label_column: str = "label") -> TeacherCacheDataset:
    """The raw dataset as training data that carries cached teacher logits (``train_dataset=``).

    ``cache`` is a :class:`TeacherCache` or its folder; it must have been built from this dataset
    and this student input spec. Items carry ``teacher_logits``, or for a feature cache
    ``teacher_features/<teacher index>/<summary|spatial>``. The trainer sets the epoch itself.
    """
    label_column = _label_column_of(dataset, label_column)
    _check_raw_dataset(dataset, image_column, label_column)  # a stream is refused before the cache is opened
    if not isinstance(cache, TeacherCache):
        cache = load_teacher_cache(cache)
    return TeacherCacheDataset(dataset, cache, student_spec, image_column, label_column)


class TeacherCacheCallback(SetEpochCallback):
    """Sets the training epoch on a :class:`TeacherCacheDataset` at every ``on_epoch_begin``
    (the trainer adds it by itself; kept for code that adds it by hand)."""
