"""``hf-distill cache-teacher``: the teachers' outputs computed once over the training data and stored."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .parsing import UsageError, _parse, _parser
from .train import check_teacher_classes, load_splits, load_student, load_teachers


@dataclasses.dataclass
class CacheArguments:
    _cli_group = "teacher cache"

    cache_epochs: int = dataclasses.field(
        default=1, metadata={"help": "Epochs of views to store (random views differ per epoch; 'none' needs 1)."})
    top_k: int = dataclasses.field(default=0, metadata={"help": "Keep only the top-k logits (0: all)."})
    cache_batch_size: int = dataclasses.field(
        default=0, metadata={"help": "Teacher batch size (default: per_device_train_batch_size, which makes "
                             "cached training bit-identical to live-teacher training where the views are "
                             "deterministic, train_augmentation none)."})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "Rebuild a cache built from other inputs."})
    feature_grid: int = dataclasses.field(
        default=0, metadata={"help": "--distill_method feature: average-pool each teacher's spatial map to at most "
                             "this many cells a side before storing it (0: the whole map)."})
    feature_dtype: str = dataclasses.field(
        default="float16", metadata={"help": "--distill_method feature: storage precision of the features "
                                     "(float16: half the disk, relative rounding ~5e-4; float32: exact).",
                                     "choices": ["float16", "float32"]})


def _cache_teacher_main(argv: Sequence[str]) -> int:
    """``hf-distill cache-teacher``: run the teacher(s) once over the training data, store soft labels (or, for
    ``--distill_method feature``, their backbone features)."""
    from ..models.features import targets_of
    from ..methods import get_method
    from ..models import input_spec
    from ..teacher_cache import build_teacher_cache

    parser = _parser((CacheArguments,), prog="hf-distill cache-teacher",
                     description="Compute the teacher's outputs once and store them in --teacher_cache_dir: logits, "
                     "or with --distill_method feature the teachers' backbone features.")
    (model_args, data_args, args, cache_args, _), _given = _parse(parser, argv)
    if not args.teacher_cache_dir or not args.teacher_names:
        raise UsageError("--teacher_cache_dir and --teacher_model_name_or_path are required")
    if data_args.streaming:
        raise UsageError("--streaming: a teacher-output cache is replayed by index; cache a dataset loaded whole")
    features = get_method(args.distill_method).teacher_output == "features"
    train, _ = load_splits(data_args, args.seed, model_args.cache_dir)
    student = load_student(model_args, train, data_args.label_column_name, backbone=features)
    teachers = load_teachers(model_args, args, backbone=features)
    if not features:
        check_teacher_classes(student, teachers, data_args)
    extra = {}
    if features:
        extra = dict(outputs="features", feature_targets=targets_of(args.feature_targets),
                     feature_grid=cache_args.feature_grid or None, feature_dtype=cache_args.feature_dtype)
    cache = build_teacher_cache(
        teachers, train, input_spec(student), args.teacher_cache_dir,
        epochs=cache_args.cache_epochs, augmentation=data_args.train_augmentation, top_k=cache_args.top_k or None,
        batch_size=cache_args.cache_batch_size or args.per_device_train_batch_size,
        seed=args.data_seed if args.data_seed is not None else args.seed, mixing=args.mixing,
        teacher_id=args.teacher_names, teacher_revision=args.teacher_revision,
        image_column=data_args.image_column_name, label_column=data_args.label_column_name,
        overwrite=cache_args.overwrite, teacher_compile=args.teacher_compile_options, **extra,
    )
    print(f"teacher cache ready in {args.teacher_cache_dir} ({cache})")
    return 0
