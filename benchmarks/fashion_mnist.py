"""Fashion-MNIST offline, as a ``datasets.DatasetDict`` (``image`` PIL grey, ``label`` ClassLabel).

The images come from the Debian package ``dataset-fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``), which installs the original IDX ``.gz`` files
under ``/usr/share/datasets/fashion-mnist``. The first call builds the DatasetDict and saves it
with ``save_to_disk`` under ``~/.cache/hf_distill_bench/fashion_mnist``; later calls load that.

On a machine with a network the same data is ``datasets.load_dataset("zalando-datasets/fashion_mnist")``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Mean / std of the training pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CACHE_ROOT = Path(os.environ.get("HF_DISTILL_BENCH_CACHE", Path.home() / ".cache" / "hf_distill_bench"))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared dtype and shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    return arr.reshape(shape)


def load_arrays(root: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 [N,28,28], labels int64 [N]), "test": (...)}`` from the IDX files."""
    root = Path(root or DEBIAN_ROOT)
    out = {}
    for split, (img_name, lbl_name) in FILES.items():
        img_path, lbl_path = root / img_name, root / lbl_name
        if not img_path.exists():
            raise FileNotFoundError(
                f"{img_path} not found: install the Debian package `dataset-fashion-mnist` "
                "(apt-get update && apt-get install -y dataset-fashion-mnist) or pass root= the folder "
                "holding the IDX files"
            )
        images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        out[split] = (images, labels)
    return out


def load_fashion_mnist(root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                       rebuild: bool = False):
    """Fashion-MNIST (60,000 train + 10,000 test) as a DatasetDict with ``image`` and ``label``.

    Args:
        root: folder with the four IDX ``.gz`` files (default: the Debian package's folder).
        cache_dir: where the built DatasetDict is saved (default ``~/.cache/hf_distill_bench``).
        rebuild: ignore the saved copy and build it again.
    """
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    folder = Path(cache_dir or CACHE_ROOT) / "fashion_mnist"
    if folder.exists() and not rebuild and root is None:
        return datasets.load_from_disk(str(folder))
    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES)})
    splits = {}
    for split, (images, labels) in load_arrays(root).items():
        pil = [PILImage.fromarray(img, mode="L") for img in images]
        splits[split] = Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)
    dsd = DatasetDict(splits)
    if root is None:
        dsd.save_to_disk(str(folder))
        dsd = datasets.load_from_disk(str(folder))
    return dsd


def stratified_subset(dataset, n: int, seed: int = 0, label_column: str = "label"):
    """``n`` examples with (as near as possible) equal counts per class, chosen by ``seed``."""
    labels = np.asarray(dataset[label_column])
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = n // len(classes)
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    picked = np.concatenate(picked)
    rest = n - len(picked)
    if rest > 0:
        remaining = np.setdiff1d(np.arange(len(labels)), picked)
        picked = np.concatenate([picked, rng.choice(remaining, size=rest, replace=False)])
    return dataset.select(np.sort(picked).tolist())


def to_tensors(dataset, transform=None, image_column: str = "image", label_column: str = "label"):
    """(pixel tensor [N,1,H,W] float32, labels tensor [N]) for the whole dataset, computed once.

    ``transform`` maps a PIL image to a tensor (e.g. ``hf_distill.data.build_transform(spec)``); the
    default scales to [0, 1] and normalises with Fashion-MNIST's mean and std.
    """
    import torch

    if transform is None:
        arr = np.stack([np.asarray(img, dtype=np.uint8) for img in dataset[image_column]])
        x = (torch.from_numpy(arr).float().div_(255.0) - MEAN) / STD
        x = x.unsqueeze(1)
    else:
        x = torch.stack([transform(img) for img in dataset[image_column]])
    y = torch.as_tensor(np.asarray(dataset[label_column]), dtype=torch.long)
    return x.contiguous(), y


if __name__ == "__main__":
    dsd = load_fashion_mnist()
    print(dsd)
    print(dsd["train"].features)
