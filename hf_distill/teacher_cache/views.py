"""Views of an image for a teacher cache: parameters drawn from ``(seed, epoch, index)``, replayed exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..models import InputSpec

AUGMENTATIONS = ("none", "timm")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
HFLIP_PROB = 0.5


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
        from ..data import build_transform

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
