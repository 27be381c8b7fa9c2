"""Building a teacher cache: the teachers run once over the views (and the mixed batches) and each shard is
written once, by one process, from the plan the coordinator decides (:mod:`.coordinator`)."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..models import InputSpec, model_name
from ..teachers import Teachers
from .coordinator import process_state, shards_to_build
from .reading import TeacherCache, load_teacher_cache
from .store import (
    MANIFEST_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    TeacherCacheError,
    _as_id_list,
    _check_raw_dataset,
    _dataset_entry,
    _differences,
    _features,
    _label_column_of,
    _read_manifest,
    _remove_cache_files,
    _shard_entries,
    _shard_name,
    _shard_on_disk,
    _shard_plan,
    _teacher_entries,
    _topk,
    _write_json_atomic,
    _write_shard,
    default_shard_size,
)
from .views import AUGMENTATIONS, _transform_config, draw_view_params, render_view

logger = logging.getLogger("hf_distill.teacher_cache")


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
    teacher_compile: dict | None = None,
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
            :func:`hf_distill.models.features.backbone_features`, stored per teacher).
        feature_targets: with features, which to store: ``"summary"`` (a vector per image) and/or
            ``"spatial"`` (the teacher's map or patch grid).
        feature_grid: with features, average-pool each spatial map to at most this many cells a side
            (a 16x16 ViT-L grid is 512 KB per view in float16, 8x8 is 128 KB); ``None`` keeps it whole.
            The student then learns the pooled map.
        feature_dtype: ``"float16"`` (half the disk; relative rounding ~5e-4) or ``"float32"`` (exact).
        teacher_compile: ``torch.compile`` keywords (``{"backend": ..., "mode": ...}``) to run the teachers
            compiled, in inference mode (:meth:`hf_distill.teachers.Teachers.compile`); None: eager.

    Returns the complete :class:`TeacherCache`. A build that stops early leaves a manifest with
    status ``"partial"`` and its complete shards; calling again with the same inputs resumes. Under
    ``torchrun`` (several processes), the missing shards are split between the processes, each
    written once; the first process writes the manifest.
    """
    from ..data import without_image_decoding

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
        from ..models.features import targets_of

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
    state = process_state()
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
                f"{cache_dir} holds a teacher cache built from other inputs: " + "; ".join(diff)
                + ". Use another folder, or overwrite=True (CLI: --overwrite) to delete it and rebuild."
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
                      outputs, feature_targets, feature_dtype, mixing, top_k, device, on_shard_written, teacher_compile)


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
           device, on_shard_written, teacher_compile=None) -> "TeacherCache":
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

    missing = shards_to_build(state, cache_dir, plan)  # decided once, by the coordinator, for every process
    if len(missing) < len(plan):
        logger.info("resuming the teacher cache in %s: %d of %d shards to build", cache_dir, len(missing), len(plan))
    mine = missing[state.process_index::state.num_processes]  # each shard written by one process
    ensemble = Teachers(teachers, student_spec)
    ensemble.to(device=device)  # the input adapters (the teachers are placed already)
    if teacher_compile is not None:  # torch.compile keywords (Teachers.compile), e.g. {"backend": "inductor"}
        ensemble.compile(**teacher_compile)
    mixer = None
    if mixing is not None:
        from ..mixing import BatchMixer, EpochOrder

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


def _num_classes(teachers, reading, spec, augmentation, seed, image_column) -> int:
    """The teachers' number of classes, from one forward pass on the first image."""
    from ..data import decode_image

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
    from ..data import decode_image

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
    from ..data import BadImageError, decode_image

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
