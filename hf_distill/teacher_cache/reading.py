"""Reading a complete teacher cache: its rows, one Arrow read per batch (memory-mapped shards; nothing but the
rows asked for is read into memory), and the checks against what it is used with."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..models import InputSpec
from .store import (
    MANIFEST_NAME,
    TeacherCacheError,
    _as_id_list,
    _differences,
    _read_manifest,
    _teacher_entries,
    rebuild_logits,
)
from .views import ViewParams, render_view


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

    def _rows(self, rows: list[int]) -> dict[str, np.ndarray]:
        """Stored rows ``rows`` (global numbers), column by column: one Arrow read of those rows alone (the
        shards are memory-mapped; nothing else is read into memory)."""
        table = self.data.data.fast_gather(rows)  # datasets' Table: the rows' slices of the memory-mapped shards
        return {name: _as_array(table.column(name)) for name in table.column_names}

    def labels_outside_top_k(self) -> int:
        """How many stored entries keep a top-k that does not contain the image's label (0 for full logits)."""
        if not self.top_k:
            return 0
        outside = 0
        for columns in self.data.select_columns(["topk_indices", "label"]).iter(batch_size=8192):  # a part at a time
            indices, labels = np.asarray(columns["topk_indices"]), np.asarray(columns["label"])
            outside += int((indices != labels[:, None]).all(axis=1).sum())
        return outside

    def cache_epoch(self, epoch: int) -> int:
        """The stored epoch that serves training epoch ``epoch`` (wraps around)."""
        return int(epoch) % self.stored_epochs

    def entry(self, epoch: int, key: int) -> dict:
        """The stored row for training epoch ``epoch`` of sample ``key`` (numpy values); of position ``key``
        in the epoch's order for a mixed cache."""
        return self.entries(epoch, [key])[0]

    def entries(self, epoch: int, keys: Sequence[int]) -> list[dict]:
        """The stored rows of ``keys`` (see :meth:`entry`) for training epoch ``epoch``, read together."""
        keys = [int(k) for k in keys]
        for key in keys:
            if not 0 <= key < self.num_samples:
                raise IndexError(f"{key} out of range for a cache of {self.num_samples} samples")
        e = self.cache_epoch(epoch)
        columns = self._rows([e * self.num_samples + k for k in keys])  # entry g: key g % N of epoch g // N
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(keys))]
        field = "position" if self.mixed else "index"
        for key, row in zip(keys, rows):
            if int(row[field]) != key or int(row["epoch"]) != e:
                raise TeacherCacheError(f"{self.cache_dir}: corrupt cache: row for (epoch {e}, {field} {key}) holds "
                                        f"(epoch {int(row['epoch'])}, {field} {int(row[field])})")
        return rows

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
                f"the teacher cache in {self.cache_dir} does not match what it is used with: " + "; ".join(diff)
                + ". Rebuild it (build_teacher_cache / hf-distill cache-teacher) for these inputs."
            )


def _as_array(column) -> np.ndarray:
    """An Arrow column as numpy: ``[rows]`` for scalars, ``[rows, size]`` for fixed-size lists (as stored)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
    return column.to_numpy(zero_copy_only=False)


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
