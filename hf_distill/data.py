"""Image datasets in the Hugging Face convention (``pixel_values`` + ``labels``).

Sources: a Hub dataset, a folder saved with ``save_to_disk``, an ``imagefolder`` tree, or the
embedded ``sklearn-digits`` data (offline). Preprocessing comes from the student's own data
config (:func:`hf_distill.models.input_spec`) and is applied lazily with ``datasets``
transforms; the trainer re-normalises for the teacher on the fly.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .models import InputSpec

DIGITS = "sklearn-digits"


def digits_dataset(test_fraction: float = 0.2, seed: int = 0):
    """sklearn's 8x8 handwritten digits (1,797 images, ships with scikit-learn) as a DatasetDict."""
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PILImage.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for img in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    split = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], test=split["test"])


def load_image_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """A ``DatasetDict`` from a Hub name, a ``save_to_disk`` folder, an image folder or ``sklearn-digits``."""
    import datasets

    if name == DIGITS:
        return digits_dataset()
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(
            os.path.join(name, "dataset_info.json")
        ):
            ds = datasets.load_from_disk(name)
            return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict(train=ds)
        return datasets.load_dataset("imagefolder", data_dir=name, cache_dir=cache_dir)
    return datasets.load_dataset(name, config_name, cache_dir=cache_dir)


def split_train_eval(dsd, train_split: str = "train", eval_split: str | None = None, eval_fraction: float = 0.15,
                     seed: int = 0, label_column: str = "label"):
    """(train, eval) datasets: the named eval split, else validation/test, else a held-out part of train."""
    if train_split not in dsd:
        raise ValueError(f"no split '{train_split}' in the dataset; splits: {list(dsd)}")
    train = dsd[train_split]
    if eval_split is not None:
        if eval_split not in dsd:
            raise ValueError(f"no split '{eval_split}' in the dataset; splits: {list(dsd)}")
        return train, dsd[eval_split]
    for candidate in ("validation", "valid", "val", "test"):
        if candidate in dsd and candidate != train_split:
            return train, dsd[candidate]
    parts = train.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def build_transform(spec: InputSpec, training: bool = False, augmentation: str = "none") -> Callable:
    """PIL image -> normalised tensor for a model with input ``spec``."""
    from torchvision import transforms as T

    mode = "L" if spec.in_chans == 1 else "RGB"
    if training and augmentation == "timm":
        import timm.data

        tf = timm.data.create_transform(
            input_size=(spec.in_chans, *spec.image_size), is_training=True, mean=spec.mean, std=spec.std,
            interpolation=spec.interpolation,
        )
    elif augmentation in ("none", "timm"):
        interp = T.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        tf = T.Compose([
            T.Resize(tuple(spec.image_size), interpolation=interp),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ])
    else:
        raise ValueError(f"train_augmentation must be 'none' or 'timm', got '{augmentation}'")
    return lambda image: tf(image.convert(mode))


def with_image_transform(dataset, spec: InputSpec, training: bool = False, augmentation: str = "none",
                         image_column: str = "image", label_column: str = "label"):
    """The dataset, lazily mapped to ``{"pixel_values", "labels"}`` (a ``datasets`` transform)."""
    for col in (image_column, label_column):
        if col not in dataset.column_names:
            raise ValueError(f"column '{col}' not in the dataset; columns: {dataset.column_names}")
    tf = build_transform(spec, training, augmentation)

    def transform(batch):
        return {
            "pixel_values": [tf(img) for img in batch[image_column]],
            "labels": list(batch[label_column]),
        }

    return dataset.with_transform(transform)


def label_names(dataset, label_column: str = "label") -> list[str] | None:
    feature = dataset.features.get(label_column)
    return list(feature.names) if hasattr(feature, "names") else None


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` (accepts ``label`` too) into a batch.

    ``teacher_logits`` (cached soft labels, see :mod:`hf_distill.teacher_cache`) are stacked too.
    """
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
    key = "labels" if "labels" in examples[0] else "label"
    labels = torch.tensor([int(e[key]) for e in examples], dtype=torch.long)
    batch = {"pixel_values": pixel_values, "labels": labels}
    if "teacher_logits" in examples[0]:
        batch["teacher_logits"] = torch.stack([torch.as_tensor(e["teacher_logits"]) for e in examples]).float()
    return batch
