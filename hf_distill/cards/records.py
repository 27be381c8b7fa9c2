"""What a run measured for its card: inference time (:func:`measure_latency_ms`) and what a trainer adds
besides its arguments and metrics (:func:`run_record`).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn


def measure_latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    repeats: int = 5,
) -> float:
    """Median forward time in milliseconds per image (eval mode, no grad, one warm-up run).

    ``example`` is a batch (or one image without the batch dimension); it is moved to the
    model's device. ``call(model, x)`` defaults to :func:`hf_distill.models.call_model`.
    The model's train/eval mode is restored afterwards.
    """
    if call is None:
        from ..models import call_model as call
    if example.dim() == 3:
        example = example.unsqueeze(0)
    param = next(iter(model.parameters()), None)
    if param is not None:
        example = example.to(param.device)
    batch = max(int(example.shape[0]), 1)
    cuda = example.is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize(example.device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example)  # warm-up (lazy init, cudnn autotune, caches)
            sync()
            times = []
            for _ in range(max(int(repeats), 1)):
                start = time.perf_counter()
                call(model, example)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return max(statistics.median(times) * 1000.0 / batch, 1e-6)


def _unwrapped(dataset):
    """The dataset :func:`hf_distill.data.with_image_transform` made, through the wrappers mixing puts around it."""
    for _ in range(3):
        if dataset is None or hasattr(dataset, "hf_distill_images") or not hasattr(dataset, "dataset"):
            break
        dataset = dataset.dataset
    return dataset


def run_record(trainer) -> dict[str, Any]:
    """What a :class:`~hf_distill.DistillationTrainer` run adds to its card besides its arguments and metrics:
    the method's own declarations, the evaluation split and size, how student and teacher were measured,
    the training augmentation and where cached teacher outputs came from (CardContext fields)."""
    from ..preprocessing import describe, fed_as_own, raw_images_of

    method, metrics = trainer.method, trainer.model_card_metrics()
    record: dict[str, Any] = {"method_title": method.title or None, "method_description": method.description or None,
                              "metric_kinds": dict(method.metric_kinds),
                              "teacher_keys": dict(getattr(method, "teacher_display", {}) or {})}
    evaluation = trainer.eval_dataset
    train = _unwrapped(trainer.train_dataset)
    if evaluation is not None and not isinstance(evaluation, dict):
        split = trainer.card_info.get("eval_split") or getattr(evaluation, "split", None)
        raw = raw_images_of(evaluation)
        if split is None and raw is not None:
            split = getattr(raw.dataset, "split", None)
        record["eval_split"] = str(split) if split else None
        train_split = getattr(getattr(train, "hf_distill_images", None), "dataset", train)
        train_split = getattr(train_split, "split", None)
        # train_test_split keeps the parent's split name: an evaluation "train" split is a held-out part of it
        record["eval_held_out"] = bool(split) and train_split is not None and str(split) == str(train_split)
        record["eval_size"] = len(evaluation) if hasattr(evaluation, "__len__") else None
        if raw is not None:
            record["preprocessing"] = describe(trainer.student_spec)
        teachers = list(trainer.teachers.models)
        if "teacher_accuracy_student_input" in metrics:
            record["teacher_measurement"] = (
                "The teacher's accuracy is measured on the same raw images with its own preprocessing (as its own "
                "library loads it); \"fed the student's input\" is what it scores on the student's evaluation "
                "batches, re-normalised for it: the input it taught from.")
        elif teachers and raw is not None and all(fed_as_own(t, trainer.student_spec) for t in teachers):
            record["teacher_measurement"] = ("The teacher's accuracy is measured on the student's evaluation batches, "
                                             "which are its own preprocessing.")
        elif teachers:
            record["teacher_measurement"] = (
                "The teacher's accuracy is measured on the student's evaluation batches, re-normalised for it (the "
                "raw images were not known to the trainer, so its own preprocessing could not be applied).")
    extra = {}
    cache = trainer.teacher_cache
    augmentation = getattr(train, "hf_distill_augmentation", None)
    if cache is not None:
        augmentation = cache.augmentation
        origin = ", ".join(f"`{n}`" for n in cache.config.get("teacher_id") or []) or "its teacher"
        views = f"{cache.stored_epochs} stored epoch{'s' if cache.stored_epochs != 1 else ''} of views"
        record["teacher_cache"] = (f"`{os.path.basename(os.path.normpath(cache.cache_dir))}`, built from {origin}: "
                                   f"{'top-' + str(cache.top_k) + ' logits' if cache.top_k else 'full outputs'}, "
                                   f"{views} ({'no' if cache.augmentation == 'none' else cache.augmentation} "
                                   "augmentation)"
                                   + (", mixed images" if cache.mixed else ""))
        extra["teacher_outputs"] = "cached (" + record["teacher_cache"] + ")"
    if augmentation is not None:
        extra["train_augmentation"] = augmentation
    record["hyperparameters"] = {**method.hyperparameters(), **extra}
    return record
