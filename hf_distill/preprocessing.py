"""One preprocessing truth per model: what a student is trained and evaluated with is what its export declares.

A student is evaluated on images *squashed* to its input size (no crop, aspect ratio not kept),
normalised with its mean/std. Its export says exactly that in its own library's terms:

* timm: ``crop_pct=1.0, crop_mode="squash"`` and the real ``input_size`` / ``interpolation`` /
  ``mean`` / ``std`` in ``pretrained_cfg``, so ``resolve_model_data_config`` + ``create_transform``
  rebuild the very transform (:func:`timm_data_config`);
* transformers: an image processor resizing to ``{"height", "width"}`` (:func:`export_processor`);
  the run applies that processor object itself, so ``AutoImageProcessor`` / ``pipeline`` see the
  same pixels (transformers resizes tensors, not PIL images).

A teacher's accuracy reported as *its* accuracy is measured with *its own* preprocessing
(:func:`own_transform`, :func:`own_accuracy`) on the raw evaluation images, which
:func:`hf_distill.data.with_image_transform` records on the dataset it returns (:func:`raw_images_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .models import InputSpec, call_model, input_spec, is_timm_model, is_transformers_model

__all__ = ["ImageSource", "describe", "export_processor", "own_accuracy", "own_transform", "raw_images_of",
           "student_transform", "timm_data_config"]

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL / transformers resample codes


def timm_data_config(spec: InputSpec) -> dict:
    """The timm data config that reproduces the run's squash-resize exactly (for ``save_for_hf``)."""
    return {"input_size": (spec.in_chans, *spec.image_size), "mean": tuple(spec.mean), "std": tuple(spec.std),
            "crop_pct": 1.0, "crop_mode": "squash", "interpolation": spec.interpolation}


def _squashes_to(processor: Any, spec: InputSpec) -> bool:
    """Whether a transformers image processor resizes to exactly ``spec.image_size`` with the spec's statistics."""
    size = getattr(processor, "size", None)
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if size is None or (get("height"), get("width")) != tuple(spec.image_size):
        return False
    if getattr(processor, "do_center_crop", False) or not getattr(processor, "do_resize", True):
        return False
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return (mean is not None and std is not None and tuple(float(v) for v in mean) == tuple(spec.mean)
            and tuple(float(v) for v in std) == tuple(spec.std))


def export_processor(model: nn.Module):
    """The image processor a transformers student is evaluated with and exported with: its own when that
    already squashes to its input size, else a plain resize-and-normalise one (ViT's) that does."""
    from transformers import ViTImageProcessor

    spec = input_spec(model)
    own = getattr(model, "hf_distill_image_processor", None)
    if own is not None and _squashes_to(own, spec):
        return own
    return ViTImageProcessor(do_resize=True, size={"height": spec.image_size[0], "width": spec.image_size[1]},
                             resample=_RESAMPLE.get(spec.interpolation, 2), image_mean=list(spec.mean),
                             image_std=list(spec.std))


def _mode(spec: InputSpec) -> str:
    return "L" if spec.in_chans == 1 else "RGB"


def _processor_transform(processor, mode: str) -> Callable:
    return lambda image: processor(images=image.convert(mode), return_tensors="pt")["pixel_values"][0]


def student_transform(model: nn.Module, training: bool = False, augmentation: str = "none") -> Callable:
    """PIL image -> tensor, as the student's export will preprocess it (training with ``augmentation="timm"``:
    timm's training transform at the same size and statistics)."""
    from .data import build_transform

    spec = input_spec(model)
    if training and augmentation == "timm":
        return build_transform(spec, training, augmentation)
    if augmentation not in ("none", "timm"):
        raise ValueError(f"train_augmentation must be 'none' or 'timm', got '{augmentation}'")
    if is_transformers_model(model):
        return _processor_transform(export_processor(model), _mode(spec))
    if is_timm_model(model):
        import timm.data

        tf = timm.data.create_transform(**timm_data_config(spec), is_training=False)
        return lambda image: tf(image.convert(_mode(spec)))
    return build_transform(spec)


def own_transform(model: nn.Module) -> Callable:
    """PIL image -> tensor with the model's *own* preprocessing: a spec set with ``set_input_spec``; else timm's
    data config (its crop included); else its transformers image processor; else its input spec."""
    from .data import build_transform

    spec = input_spec(model)
    if isinstance(getattr(model, "hf_distill_input_spec", None), InputSpec):
        return build_transform(spec)
    if is_timm_model(model):
        import timm.data

        tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
        return lambda image: tf(image.convert(_mode(spec)))
    if is_transformers_model(model):
        processor = getattr(model, "hf_distill_image_processor", None) or export_processor(model)
        return _processor_transform(processor, _mode(spec))
    return build_transform(spec)


def describe(spec: InputSpec) -> str:
    """The evaluation preprocessing in words, for cards."""
    h, w = spec.image_size
    stats = ", ".join(f"{v:.4g}" for v in spec.mean), ", ".join(f"{v:.4g}" for v in spec.std)
    return (f"each image resized to {h}x{w} ({spec.interpolation}, aspect ratio not kept, no crop), "
            f"normalised with mean ({stats[0]}) and std ({stats[1]})")


@dataclass
class ImageSource:
    """The raw images behind a transformed dataset: the dataset before its transform and its columns."""

    dataset: Any
    image_column: str
    label_column: str | None


def raw_images_of(dataset) -> ImageSource | None:
    """The raw images :func:`hf_distill.data.with_image_transform` recorded on ``dataset`` (None otherwise)."""
    return getattr(dataset, "hf_distill_images", None)


@torch.no_grad()
def own_accuracy(model: nn.Module, source: ImageSource, batch_size: int = 64) -> float | None:
    """Top-1 accuracy of a classifier on the raw images with its own preprocessing (None without labels or for a
    stream)."""
    from .data import decode_image, is_stream

    if source.label_column is None or is_stream(source.dataset):
        return None
    tf = own_transform(model)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for start in range(0, len(source.dataset), batch_size):
            rows = source.dataset[start:start + batch_size]
            x = torch.stack([tf(decode_image(v)) for v in rows[source.image_column]])
            logits = call_model(model, x.to(device=device, dtype=dtype))
            labels = torch.as_tensor(rows[source.label_column])
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return correct / total if total else None


def fed_as_own(teacher: nn.Module, student_spec: InputSpec) -> bool:
    """Whether the student's evaluation input (squashed to its size), re-normalised for ``teacher``, is exactly
    the teacher's own preprocessing: then the teacher's accuracy on it is the teacher's own."""
    spec = input_spec(teacher)
    if tuple(spec.image_size) != tuple(student_spec.image_size) or spec.interpolation != student_spec.interpolation:
        return False
    if isinstance(getattr(teacher, "hf_distill_input_spec", None), InputSpec):
        return True  # declared with set_input_spec: a squash to that size
    if is_timm_model(teacher):
        import timm.data

        cfg = timm.data.resolve_model_data_config(teacher)
        return cfg.get("crop_mode") == "squash" and float(cfg.get("crop_pct") or 0.0) == 1.0
    return not is_transformers_model(teacher)  # transformers processors resize tensors, the student's PIL images


def with_own_teacher_accuracy(metrics: dict, teachers, dataset, cache: dict,
                              student_spec: InputSpec | None = None) -> dict:
    """``metrics`` (from the student's evaluation batches) with the teachers' accuracy measured their own way.

    When the raw images behind ``dataset`` are known, ``teacher_accuracy`` (one teacher) or
    ``teacher{i}_accuracy`` (several) is each teacher's top-1 with its own preprocessing, and the accuracy
    on the batches the student saw becomes ``teacher_accuracy_student_input``. ``cache`` keeps the
    results per dataset (the teachers do not change)."""
    source = raw_images_of(dataset)
    if source is None or "teacher_accuracy" not in metrics or not len(teachers):
        return metrics
    if student_spec is not None and all(fed_as_own(t, student_spec) for t in teachers):
        return metrics  # what the teachers were fed is their own preprocessing
    key = (id(source.dataset), len(source.dataset) if hasattr(source.dataset, "__len__") else None)
    if key not in cache:
        cache[key] = [own_accuracy(t, source) for t in teachers]
    own = cache[key]
    if any(a is None for a in own):
        return metrics
    metrics = dict(metrics)
    metrics["teacher_accuracy_student_input"] = metrics.pop("teacher_accuracy")
    if len(own) == 1:
        metrics["teacher_accuracy"] = own[0]
    else:
        metrics.update({f"teacher{i}_accuracy": a for i, a in enumerate(own)})
    return metrics
