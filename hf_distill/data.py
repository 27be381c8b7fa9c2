"""Image datasets in the Hugging Face convention (``pixel_values`` + ``labels``).

Sources: a Hub dataset, a folder saved with ``save_to_disk``, an ``imagefolder`` tree, or the
embedded ``sklearn-digits`` data (offline). Preprocessing comes from the student's own data
config (:func:`hf_distill.models.input_spec`) and is applied lazily with ``datasets``
transforms; the trainer re-normalises for the teacher on the fly.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

from .models import InputSpec

logger = logging.getLogger(__name__)

MIX_KEYS = ("mix_epoch", "mix_position", "mix_lam", "mix_partner", "mix_box")

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


def load_image_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None,
                       streaming: bool = False):
    """A ``DatasetDict`` from a Hub name, a ``save_to_disk`` folder, an image folder or ``sklearn-digits``.

    ``streaming=True`` gives an ``IterableDatasetDict``: Hub datasets and image folders are read as
    they are iterated (``load_dataset(..., streaming=True)``), in-memory ones in ``STREAM_SHARDS`` shards.
    """
    import datasets

    if name == DIGITS:
        data = digits_dataset()
        return _as_stream(data) if streaming else data
    if os.path.isdir(name):
        # a local folder: nothing is downloaded, so no download / generation progress bars
        with _quiet_datasets():
            if os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(
                os.path.join(name, "dataset_info.json")
            ):
                ds = datasets.load_from_disk(name)
                ds = ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict(train=ds)
                return _as_stream(ds) if streaming else ds
            return datasets.load_dataset("imagefolder", data_dir=name, cache_dir=cache_dir, streaming=streaming)
    local = _missing_folder_message(name)
    if local and _written_as_path(name):  # `./my_imagez`, `data/train_imgs`: never a Hub dataset
        raise FileNotFoundError(local)
    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir, streaming=streaming)
    except Exception as err:  # not on the Hub (or offline): a mistyped local folder is the likelier mistake
        if local:
            raise FileNotFoundError(f"{local}; nor could the Hub dataset '{name}' be loaded "
                                    f"({type(err).__name__})") from err
        raise


def _written_as_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.strip("/").count("/") > 1


def _missing_folder_message(name: str) -> str | None:
    """A dataset name that is no folder, but close to one that exists (or written as a path): the closest
    folders. None when nothing local resembles it (a Hub dataset, then)."""
    import difflib
    from pathlib import Path

    path = Path(os.path.expanduser(name.rstrip("/")))
    parent = path.parent
    if not parent.is_dir():
        return f"no folder '{name}' (nor its parent folder '{parent}')" if _written_as_path(name) else None
    siblings = sorted(str(p) if str(parent) != "." else p.name for p in parent.iterdir() if p.is_dir())
    close = difflib.get_close_matches(str(path) if str(parent) != "." else path.name, siblings, n=3, cutoff=0.75)
    if close:
        return f"no folder '{name}' (did you mean {' or '.join(close)}?)"
    return f"no folder '{name}'" if _written_as_path(name) else None


def load_image_split(name: str, split: str, config_name: str | None = None, cache_dir: str | None = None):
    """One split as a map-style ``Dataset`` (a Hub dataset downloads that split only)."""
    import datasets

    if name == DIGITS or os.path.isdir(name):
        return load_image_dataset(name, config_name, cache_dir)[split]
    return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)


STREAM_SHUFFLE_BUFFER = 10_000  # examples held to shuffle a stream (the command line shuffles training streams)
STREAM_SHARDS = 4  # shards of an in-memory dataset read as a stream: several processes read their own


def _as_stream(dsd):
    import datasets

    return datasets.IterableDatasetDict({k: v.to_iterable_dataset(num_shards=STREAM_SHARDS) for k, v in dsd.items()})


def _quiet_datasets():
    import datasets

    from .models import progress_bars_off

    return progress_bars_off(datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                             datasets.enable_progress_bars)


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
    if is_stream(train):
        raise ValueError(f"a stream has no held-out part: name an evaluation split (eval_split), one of {list(dsd)}")
    # held out at random, with every class in the same proportion when the labels are a ClassLabel
    stratify = label_column if hasattr(train.features.get(label_column), "names") else None
    parts = train.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column=stratify)
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


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names its file (or says it has none)."""


# Unreadable images met in this process: {file or description: error}. Training and evaluation skip
# them with a warning (once per image); the CLI reports the count at the end.
SKIPPED_IMAGES: dict[str, str] = {}


def without_image_decoding(dataset, image_column: str = "image"):
    """The dataset with its image column left undecoded (``{"path", "bytes"}``), so that decoding
    happens in :func:`decode_image`, where an unreadable file can be named. Cheap: only the feature
    type changes."""
    from datasets import Image

    feature = dataset.features.get(image_column) if getattr(dataset, "features", None) else None
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def decode_image(value):
    """A loaded PIL image from a ``datasets`` image value: a PIL image, or ``{"path", "bytes"}``.

    Raises :class:`BadImageError` naming the file when it cannot be read.
    """
    import io

    from PIL import Image as PILImage

    if isinstance(value, PILImage.Image):
        return value
    if not isinstance(value, dict):
        raise BadImageError(f"expected an image, got a value of type {type(value).__name__}")
    path = value.get("path")
    where = f"'{path}'" if path else "an image stored in the dataset (no file path)"
    try:
        if value.get("bytes") is not None:
            image = PILImage.open(io.BytesIO(value["bytes"]))
        elif path:
            image = PILImage.open(path)
        else:
            raise BadImageError("an image value with neither bytes nor a path")
        image.load()  # decode now: truncated files fail here, not later in a worker
        return image
    except BadImageError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise BadImageError(f"cannot read {where}: {err}") from err


def _image_name(value) -> str:
    return str(value.get("path")) if isinstance(value, dict) and value.get("path") else "<in-memory image>"


def with_image_transform(dataset, spec, training: bool = False, augmentation: str = "none",
                         image_column: str = "image", label_column: str | None = "label"):
    """The dataset, lazily mapped to ``{"pixel_values", "labels"}`` (a ``datasets`` transform).

    ``spec`` is the student itself (preferred: the images are then preprocessed exactly as its export
    declares, :func:`hf_distill.preprocessing.student_transform`) or its :class:`InputSpec`.
    ``label_column=None`` (or a dataset without a ``"label"`` column when the default is kept)
    gives unlabelled examples (``pixel_values`` only), e.g. for ``trainer.predict``. An image
    that cannot be read is skipped with a warning naming its file; the batch is one shorter.
    """
    columns = dataset.column_names or list((dataset.features or {}).keys())
    if image_column not in columns:
        raise ValueError(f"column '{image_column}' not in the dataset; columns: {columns}")
    if label_column is not None and label_column not in columns:
        if label_column != "label":
            raise ValueError(f"column '{label_column}' not in the dataset; columns: {columns}")
        label_column = None  # the default name and no such column: an unlabelled dataset
    if isinstance(spec, InputSpec):
        tf = build_transform(spec, training, augmentation)
    else:
        from .preprocessing import student_transform

        tf = student_transform(spec, training, augmentation)

    def transform(batch):
        pixel_values = []
        for value in batch[image_column]:
            try:
                pixel_values.append(tf(decode_image(value)))
            except BadImageError as err:
                name = _image_name(value)
                if name not in SKIPPED_IMAGES:
                    logger.warning("skipping an unreadable image: %s", err)
                SKIPPED_IMAGES[name] = str(err)
                pixel_values.append(None)
        out = {"pixel_values": pixel_values}
        if label_column is not None:
            out["labels"] = list(batch[label_column])
        return out

    from .preprocessing import ImageSource

    dataset = without_image_decoding(dataset, image_column)
    if is_stream(dataset):  # a datasets IterableDataset has no with_transform: a lazy map does the same
        out = dataset.map(transform, batched=True, batch_size=64, remove_columns=columns)
    else:
        out = dataset.with_transform(transform)
    # what the run's record needs: the raw images (a teacher's own preprocessing) and the augmentation (cards)
    out.hf_distill_images = ImageSource(dataset, image_column, label_column)
    out.hf_distill_augmentation = augmentation if training else None
    return out


def is_stream(dataset) -> bool:
    """A ``datasets`` ``IterableDataset`` (``load_dataset(..., streaming=True)``): read in order, no length."""
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, IterableDataset)


def label_names(dataset, label_column: str = "label") -> list[str] | None:
    feature = (dataset.features or {}).get(label_column)
    return list(feature.names) if hasattr(feature, "names") else None


def class_names_for(student, train_dataset=None, teachers=()) -> list[str] | None:
    """Class names for a student that carries none: the training data's ``ClassLabel`` (the column
    :func:`with_image_transform` read), else the first teacher's names, when their count fits the student."""
    from .models import label_names_of, num_classes_of

    if label_names_of(student):
        return None
    n = num_classes_of(student)
    source = getattr(train_dataset, "hf_distill_images", None)
    column = source.label_column if source is not None else "label"
    candidates = []
    if train_dataset is not None and column and getattr(train_dataset, "features", None) is not None:
        candidates.append(label_names(train_dataset, column))
    candidates += [label_names_of(t) for t in teachers]
    for names in candidates:
        if names and (n is None or len(names) == n):
            return [str(name) for name in names]
    return None


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` (accepts ``label`` too; none for unlabelled data) into a batch.

    Examples whose image could not be read (``pixel_values`` None) are dropped. ``teacher_logits``
    (cached soft labels, see :mod:`hf_distill.teacher_cache`) and cached ``teacher_features/...`` are
    stacked too.
    """
    kept = [e for e in examples if e.get("pixel_values") is not None]
    if not kept:
        raise BadImageError(f"none of the {len(examples)} images of a batch could be read; the files are listed "
                            "in the warnings above")
    examples = kept
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
    batch = {"pixel_values": pixel_values}
    key = "labels" if "labels" in examples[0] else "label" if "label" in examples[0] else None
    if key is not None:
        batch["labels"] = torch.tensor([int(e[key]) for e in examples], dtype=torch.long)
    for key in MIX_KEYS:  # where each sample sits in its epoch's order, and stored mixing parameters
        if key in examples[0]:
            batch[key] = torch.as_tensor(np.asarray([e[key] for e in examples]))
    if "teacher_logits" in examples[0]:
        batch["teacher_logits"] = torch.stack([torch.as_tensor(e["teacher_logits"]) for e in examples]).float()
    for key in examples[0]:  # cached teacher features ("teacher_features/<teacher>/<target>")
        if key.startswith("teacher_features/"):
            batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples]).float()
    return batch
