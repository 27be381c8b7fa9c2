"""Settings that cannot act as asked in this run: found when the trainer is built, one warning line each, with the fix.

They are legal (so they are not refused) but would silently do less than they say: DKD's warm-up
longer than the run, a spatial feature target on a student map of one position, feature
distillation from a cache that leaves evaluation with nothing to measure.
"""

from __future__ import annotations

import math

import torch


def _run_epochs(args, train_dataset) -> float | None:
    """How many epochs the run trains (None when a max_steps run's dataset has no length)."""
    if args.max_steps is None or args.max_steps <= 0:
        return float(args.num_train_epochs)
    if train_dataset is None or not hasattr(train_dataset, "__len__") or not len(train_dataset):
        return None
    per_step = args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_dataset) / per_step) if not args.dataloader_drop_last else \
        max(1, len(train_dataset) // per_step)
    return args.max_steps / steps_per_epoch


def _dkd_warmup(trainer, train_dataset) -> list[str]:
    args = trainer.args
    warmup = getattr(args, "dkd_warmup_epochs", 0)
    if args.distill_method != "dkd" or not warmup:
        return []
    epochs = _run_epochs(args, train_dataset)
    if epochs is None or epochs >= warmup:
        return []
    return [f"dkd_warmup_epochs={warmup:g} is longer than this run ({epochs:.3g} epochs): the DKD term would end at "
            f"{epochs / warmup:.0%} of its weight; set dkd_warmup_epochs to {epochs:.3g} or less (0: no warm-up)"]


def _grids(trainer) -> tuple[tuple[int, int], list[tuple[str, tuple[int, int]]]]:
    """The student's spatial grid and each teacher's, for the student's input size."""
    from .models.features import feature_shapes
    from .models import display_name, short_name

    spec = trainer.student_spec
    example = torch.zeros(2, spec.in_chans, *spec.image_size)
    student = feature_shapes(trainer.student, example)[2]
    teachers = [(display_name(t), feature_shapes(t, trainer.teachers.prepare_input(i, example))[2])
                for i, t in enumerate(trainer.teachers.models)]
    if not teachers and trainer.teacher_cache is not None:
        ids = trainer.teacher_cache.config.get("teacher_id") or []
        for i, shapes in enumerate(trainer.teacher_cache.feature_shapes or []):
            spatial = shapes.get("spatial")
            if spatial and len(spatial) == 3:
                teachers.append((short_name(ids[i]) if i < len(ids) else f"teacher {i}", tuple(spatial[1:])))
    return tuple(student), teachers


def _spatial_on_one_position(trainer) -> list[str]:
    method = trainer.method
    if method.student_output != "features" or "spatial" not in getattr(method, "targets", []):
        return []
    student, teachers = _grids(trainer)
    if tuple(student) != (1, 1):
        return []
    larger = [(name, grid) for name, grid in teachers if tuple(grid) != (1, 1)]
    return [f"feature_targets 'spatial': the student's feature map is 1x1 at its {trainer.student_spec.image_size[0]}x"
            f"{trainer.student_spec.image_size[1]} input, the teacher `{name}` gives {grid[0]}x{grid[1]}, so one "
            "vector is stretched over the teacher's grid; train at a larger image size (set_input_spec / --image_size) "
            "or use feature_targets=['summary']" for name, grid in larger]


def _feature_eval_without_teacher(trainer, eval_dataset, knn_train_dataset) -> list[str]:
    args = trainer.args
    if trainer.method.student_output != "features" or len(trainer.teachers) or knn_train_dataset is not None:
        return []
    evaluates = eval_dataset is not None or str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
    if not evaluates:
        return []
    return ["feature distillation from a cache with no teacher loaded has nothing to evaluate (the cosine needs the "
            "teacher's live features): pass knn_train_dataset= (CLI --knn_split) for k-NN accuracy, or the teacher "
            "(teacher_model= / --teacher_model_name_or_path)"]


def inert_settings(trainer, train_dataset=None, eval_dataset=None, knn_train_dataset=None) -> list[str]:
    """One line per setting of this run that cannot act as asked, each saying what to change."""
    return [*_dkd_warmup(trainer, train_dataset), *_spatial_on_one_position(trainer),
            *_feature_eval_without_teacher(trainer, eval_dataset, knn_train_dataset)]
