"""Training data from a teacher cache: the stored view of each image replayed, with its cached outputs."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..callbacks import SetEpochCallback
from ..models import InputSpec
from .reading import TeacherCache, load_teacher_cache
from .store import TeacherCacheError, _check_raw_dataset, _label_column_of


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
        from ..data import without_image_decoding

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
        from ..data import decode_image

        rows = self.cache.entries(self.epoch, keys)  # the batch's rows alone, read together
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
