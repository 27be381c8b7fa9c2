"""``hf-distill train``: loading the data, the student and the teachers the arguments name, building
the :class:`~hf_distill.trainer.DistillationTrainer` and running it (also what ``search`` and
``cache-teacher`` load with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Sequence

from .parsing import UsageError, parse_train_args


def load_splits(data_args, seed: int, cache_dir: str | None = None):
    """(train, eval) raw datasets exactly as every command sees them (same split, same subset).

    ``--max_train_samples`` / ``--max_eval_samples`` keep a random subset (shuffled with the
    seed first: folders and many datasets are sorted by class)."""
    from ..data import load_image_dataset, split_train_eval

    if not data_args.dataset_name:
        raise UsageError("--dataset_name is required (a Hub dataset, a folder, or sklearn-digits)")
    dsd = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir,
                             streaming=data_args.streaming)
    try:
        if getattr(data_args, "knn_dataset_name", None) and data_args.train_split in dsd:
            # evaluation is on the k-NN dataset (load_knn_dataset): every training image trains
            train, evaluation = dsd[data_args.train_split], dsd[data_args.train_split]
        else:
            train, evaluation = split_train_eval(dsd, data_args.train_split, data_args.eval_split,
                                                 data_args.eval_fraction, seed, data_args.label_column_name)
    except ValueError as err:
        raise UsageError(str(err).replace("(eval_split)", "(--eval_split)")) from None
    if data_args.streaming and not getattr(data_args, "knn_dataset_name", None):
        # evaluation reads its split whole (its size known): exact metrics over any number of processes
        from ..data import load_image_split

        name = next(k for k, v in dsd.items() if v is evaluation)
        evaluation = load_image_split(data_args.dataset_name, name, data_args.dataset_config_name, cache_dir)
    for split in (train, evaluation):
        columns = split.column_names or list((split.features or {}).keys())
        if data_args.image_column_name not in columns:
            raise UsageError(f"--image_column_name: no column '{data_args.image_column_name}' in the dataset; "
                             f"its columns are {columns}")
    if data_args.streaming:  # the Trainer shuffles map-style data; a stream is shuffled here (reshuffled per epoch)
        from ..data import STREAM_SHUFFLE_BUFFER

        train = train.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    if data_args.max_train_samples:
        train = _random_subset(train, data_args.max_train_samples, seed)
    if data_args.max_eval_samples:
        evaluation = _random_subset(evaluation, data_args.max_eval_samples, seed)
    return train, evaluation


def _random_subset(dataset, n: int, seed: int):
    from ..data import is_stream

    if is_stream(dataset):  # already shuffled: its first n
        return dataset.take(n)
    if n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def dataset_classes(train, label_column: str) -> tuple[int, list[str] | None]:
    """(number of classes, class names or None) of the training split's label column."""
    from ..data import is_stream as data_is_stream
    from ..data import label_names

    columns = train.column_names or list((train.features or {}).keys())
    if label_column not in columns:
        raise UsageError(f"--label_column_name: no column '{label_column}' in the dataset; its columns are "
                         f"{columns}")
    names = label_names(train, label_column)
    if names:
        return len(names), names
    if data_is_stream(train):
        raise UsageError(f"--streaming: the label column '{label_column}' does not name its classes (a ClassLabel), "
                         "and a stream cannot be read ahead to count them")
    values = set(train[label_column])
    if not all(isinstance(v, int) or (hasattr(v, "is_integer") and float(v).is_integer()) for v in values):
        raise UsageError(f"--label_column_name {label_column}: expected class ids (integers), got values such as "
                         f"{sorted(map(str, values))[:3]}")
    return int(max(values)) + 1, None


def load_student(model_args, train, label_column: str, backbone: bool = False):
    """The student named in the arguments, with the dataset's classes (or, for feature distillation, as a
    backbone: no classes, no labels needed) and the requested input size."""
    from ..models import input_spec, load_model, set_input_spec

    if not model_args.student_model_name_or_path:
        raise UsageError("--student_model_name_or_path is required")
    num_labels, names = (None, None) if backbone else dataset_classes(train, label_column)
    student_kw = {"in_chans": model_args.in_chans} if model_args.in_chans else {}
    hw = model_args.image_hw
    square = hw is not None and hw[0] == hw[1]
    with _flag_for_pretrained("--no_student_pretrained"):
        # a square image_size builds fixed-size timm students for that size (img_size) and refuses, in one line,
        # a student that cannot take it; a non-square one is recorded as the student's input
        student = load_model(
            model_args.student_model_name_or_path, num_labels=num_labels, pretrained=model_args.student_pretrained,
            revision=model_args.student_revision, cache_dir=model_args.cache_dir, label_names=names,
            backbone=backbone, image_size=hw[0] if square else None, **student_kw,
        )
    if hw is not None and not square:
        set_input_spec(student, dataclasses.replace(input_spec(student), image_size=hw))
    return student


def load_teachers(model_args, training_args, backbone: bool = False):
    from ..models import load_model

    with _flag_for_pretrained("--no_teacher_pretrained"):
        return [
            load_model(name, pretrained=model_args.teacher_pretrained, revision=training_args.teacher_revision,
                       cache_dir=model_args.cache_dir, backbone=backbone)
            for name in training_args.teacher_names
        ]


@contextlib.contextmanager
def _flag_for_pretrained(flag: str):
    """load_model's advice speaks Python (``pretrained=False``); on the command line it is a flag."""
    from ..models import ModelLoadError

    try:
        yield
    except ModelLoadError as err:
        raise ModelLoadError(str(err).replace("pretrained=False", flag)) from err


def load_knn_dataset(data_args, seed: int, cache_dir: str | None = None):
    """``--knn_dataset_name``: (memory, evaluation) splits of a separate labelled dataset for k-NN evaluation; the
    memory is ``--knn_split`` (default train), the evaluation its validation / test split or a held-out part."""
    from ..data import load_image_dataset, split_train_eval

    name = data_args.knn_dataset_name
    memory_split = data_args.knn_split or "train"
    label = data_args.knn_label_column_name or data_args.label_column_name
    image = data_args.knn_image_column_name or data_args.image_column_name
    dsd = load_image_dataset(name, data_args.knn_dataset_config_name, cache_dir)
    if memory_split not in dsd:
        raise UsageError(f"--knn_split: no split '{memory_split}' in --knn_dataset_name {name}; splits: {list(dsd)}")
    try:
        memory, evaluation = split_train_eval(dsd, memory_split, None, data_args.eval_fraction, seed, label)
    except ValueError as err:
        raise UsageError(f"--knn_dataset_name {name}: {err}") from None
    for column, flag in ((image, "--knn_image_column_name"), (label, "--knn_label_column_name")):
        if column not in memory.column_names:
            raise UsageError(f"{flag}: no column '{column}' in --knn_dataset_name {name}; its columns are "
                             f"{memory.column_names} (the k-NN memory needs images and labels)")
    if data_args.knn_max_samples:
        memory = _random_subset(memory, data_args.knn_max_samples, seed)
    if data_args.max_eval_samples:
        evaluation = _random_subset(evaluation, data_args.max_eval_samples, seed)
    return memory, evaluation


def load_knn_split(data_args, seed: int, cache_dir: str | None = None):
    """The labelled split whose features are the k-NN memory (feature distillation), or None."""
    from ..data import load_image_dataset, load_image_split

    if data_args.knn_dataset_name:
        return load_knn_dataset(data_args, seed, cache_dir)[0]
    if not data_args.knn_split:
        return None
    if data_args.streaming:  # that split alone, whole (the memory is read in full at each evaluation)
        try:
            split = load_image_split(data_args.dataset_name, data_args.knn_split, data_args.dataset_config_name,
                                     cache_dir)
        except (KeyError, ValueError) as err:
            raise UsageError(f"--knn_split: {err}") from None
    else:
        dsd = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir)
        if data_args.knn_split not in dsd:
            raise UsageError(f"--knn_split: no split '{data_args.knn_split}' in the dataset; splits: {list(dsd)}")
        split = dsd[data_args.knn_split]
    if data_args.label_column_name not in split.column_names:
        raise UsageError(f"--knn_split {data_args.knn_split} has no label column '{data_args.label_column_name}' "
                         f"(columns {split.column_names}): the k-NN memory needs labels")
    return _random_subset(split, data_args.knn_max_samples, seed) if data_args.knn_max_samples else split


def check_teacher_classes(student, teachers, data_args) -> None:
    """The label-space check, with advice a command-line user can follow."""
    from ..models import num_classes_of
    from ..teachers import LabelSpaceError, check_label_spaces

    try:
        check_label_spaces(student, teachers)
    except LabelSpaceError as err:
        if err.differences:
            raise UsageError(
                f"the {err.teacher} names its classes differently from --dataset_name {data_args.dataset_name} "
                f"(column '{data_args.label_column_name}'); first differences (index, dataset, teacher): "
                f"{err.differences}. Use a teacher trained on this dataset's classes, in the same order.") from None
        raise UsageError(
            f"the {err.teacher} predicts {err.teacher_classes} classes but --dataset_name {data_args.dataset_name} has "
            f"{num_classes_of(student)} (column '{data_args.label_column_name}'). Use a teacher trained on this "
            "dataset's classes (train one with --distill_method supervised), or check --dataset_name and "
            "--label_column_name.") from None


def last_checkpoint(folder) -> str | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (transformers' ``get_last_checkpoint``, skipping one
    whose save was cut short: the Trainer writes ``trainer_state.json`` last)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name)))
    complete = [p for _, p in steps if (p / "trainer_state.json").exists()]
    return str(complete[-1]) if complete else None


def check_output_dir(training_args, print_fn=print) -> None:
    """The run folder as transformers' example scripts treat it: an unfinished run (checkpoints, no saved model) is
    resumed from its last checkpoint, saying so; ``--resume_from_checkpoint true|last`` means that checkpoint; a
    saved model is not trained over unless ``--overwrite_output_dir`` (which then replaces the whole run)."""
    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        found = last_checkpoint(out)
        if found is None:
            raise UsageError(f"--resume_from_checkpoint {resume}: --output_dir {out} holds no complete checkpoint-* "
                             "folder to resume from")
        training_args.resume_from_checkpoint = found
        return
    if resume:
        if not os.path.isdir(resume):
            import difflib

            near = [str(p) for p in Path(resume).parent.glob("checkpoint-*")] if Path(resume).parent.is_dir() else []
            close = difflib.get_close_matches(resume, near, n=1, cutoff=0.5)
            raise UsageError(f"--resume_from_checkpoint {resume}: no such folder"
                             + (f" (did you mean {close[0]}?)" if close else "")
                             + "; `--resume_from_checkpoint last` takes the newest checkpoint of --output_dir")
        return
    if training_args.overwrite_output_dir or not out.is_dir():
        return
    saved = [n for n in ("config.json", "model.safetensors", "pytorch_model.bin") if (out / n).exists()]
    if saved:
        raise UsageError(f"--output_dir {out} already holds a saved model ({', '.join(saved)}); training would replace "
                         "it. Choose another --output_dir, add --overwrite_output_dir, or continue a run with "
                         "--resume_from_checkpoint.")
    found = last_checkpoint(out)
    if found:
        training_args.resume_from_checkpoint = found
        print_fn(f"--output_dir {out} holds an unfinished run: resuming from {found}, as transformers' example "
                 "scripts do (--overwrite_output_dir starts again from scratch; --resume_from_checkpoint PATH picks "
                 "another checkpoint)")


RUN_OUTPUTS = ("runs", "student")  # folders a run writes besides its checkpoints: logs, SFTN's phase 2


def clear_previous_run(trainer, training_args, print_fn=print) -> None:
    """``--overwrite_output_dir``: remove the previous run's files, checkpoints and logs from ``--output_dir``, so
    none of it is mixed with the new run or resumed from later (other folders in it are left alone)."""
    import shutil

    out = Path(training_args.output_dir)
    if not training_args.overwrite_output_dir or training_args.resume_from_checkpoint or not out.is_dir():
        return
    old = [p for p in out.iterdir()
           if p.is_file() or (p.is_dir() and (p.name in RUN_OUTPUTS or p.name.startswith("checkpoint-")))]
    if old and trainer.is_world_process_zero():
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print_fn(f"--overwrite_output_dir: removed the previous run from {out} ({len(old)} files and folders)")
    trainer.accelerator.wait_for_everyone()


_CURRENT_RUN: dict = {}  # what a Ctrl-C needs to say how to continue


def build_trainer(model_args, data_args, training_args, print_fn=print, model_init: bool = False):
    """The trainer the arguments describe, with data and models loaded (``model_init``: the student is
    rebuilt per training run, for a search). Returns (trainer, raw train split, raw evaluation split)."""
    from transformers import set_seed

    from ..callbacks import EpochPrinter
    from ..data import with_image_transform
    from ..methods import get_method
    from ..models import input_spec
    from ..trainer import DistillationTrainer

    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: a stream has no length to count epochs in")
    if data_args.streaming and training_args.teacher_cache_dir:
        raise UsageError("--streaming cannot read a teacher-output cache (its entries are replayed by index): drop "
                         "--teacher_cache_dir or --streaming")
    if data_args.streaming and training_args.mixing.enabled:
        raise UsageError("--streaming cannot be mixed (--mixup_alpha / --cutmix_alpha): mixed batches follow a "
                         "per-epoch order of the whole dataset")
    method = get_method(training_args.distill_method)
    if method.needs_teacher and not training_args.teacher_names and not training_args.teacher_cache_dir:
        raise UsageError(f"--distill_method {training_args.distill_method} needs a teacher: "
                         "--teacher_model_name_or_path (or a teacher-output cache, --teacher_cache_dir)")
    features = method.student_output == "features"  # label-free feature distillation: backbones, no labels
    knn_flags = [f"--{n}" for n in ("knn_split", "knn_dataset_name", "knn_max_samples") if getattr(data_args, n)]
    if knn_flags and not features:
        raise UsageError(f"{', '.join(knn_flags)} applies to --distill_method feature (classifiers report "
                         "eval_accuracy)")
    train, evaluation = load_splits(data_args, training_args.seed, model_args.cache_dir)
    set_seed(training_args.seed)  # a randomly initialised student is the same for the same --seed
    student = load_student(model_args, train, data_args.label_column_name, backbone=features)
    spec = input_spec(student)
    columns = {"image_column": data_args.image_column_name, "label_column": data_args.label_column_name}
    eval_columns = columns
    if data_args.knn_dataset_name:  # k-NN memory and evaluation from the separate labelled dataset
        knn, evaluation = load_knn_dataset(data_args, training_args.seed, model_args.cache_dir)
        eval_columns = {"image_column": data_args.knn_image_column_name or data_args.image_column_name,
                        "label_column": data_args.knn_label_column_name or data_args.label_column_name}
    else:
        knn = load_knn_split(data_args, training_args.seed, model_args.cache_dir)
    if training_args.teacher_cache_dir:
        from ..teacher_cache import with_teacher_cache

        # soft labels (and the exact views) come from the cache; a teacher is loaded only if named
        train_dataset = with_teacher_cache(train, training_args.teacher_cache_dir, spec, **columns)
    else:
        train_dataset = with_image_transform(train, student, True, data_args.train_augmentation, **columns)
    teachers = load_teachers(model_args, training_args, backbone=features)
    if not features:
        check_teacher_classes(student, teachers, data_args)
    if model_init:  # the Trainer calls it with the seed set, for each trial
        def fresh_student():
            return load_student(model_args, train, data_args.label_column_name, backbone=features)
    trainer = DistillationTrainer(
        model=None if model_init else student,
        model_init=fresh_student if model_init else None,
        teacher_model=teachers or None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=with_image_transform(evaluation, student, False, **eval_columns),
        callbacks=[EpochPrinter(print_fn)] if training_args.disable_tqdm else None,
        knn_train_dataset=with_image_transform(knn, student, False, **eval_columns) if knn is not None else None,
    )
    trainer.card_info.update(dataset=data_args.dataset_name)
    if trainer.is_world_process_zero():
        for line in trainer.teachers.describe_inputs():  # what each teacher is fed (logged, not shown, in Python)
            print_fn(line)
    return trainer, train, evaluation


def _count(dataset) -> str:
    return f"{len(dataset)} images" if hasattr(dataset, "__len__") else "a stream of images"


def run_training(model_args, data_args, training_args, print_fn=print):
    """Load data and models as the arguments say, distill, evaluate, save the student. Returns metrics."""
    from ..data import SKIPPED_IMAGES

    check_output_dir(training_args, print_fn)
    trainer, train, evaluation = build_trainer(model_args, data_args, training_args, print_fn)
    print_fn(f"training {model_args.student_model_name_or_path} with {training_args.distill_method} on "
             f"{_count(train)} ({data_args.dataset_name}); evaluating on {_count(evaluation)}")
    clear_previous_run(trainer, training_args, print_fn)
    _CURRENT_RUN["output_dir"] = training_args.output_dir
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    print_fn(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
    if SKIPPED_IMAGES:
        print_fn(f"skipped {len(SKIPPED_IMAGES)} unreadable image(s) (named in the warnings above)")
    print_fn(f"model saved to {training_args.output_dir}")
    if training_args.distill_method == "sftn" and training_args.sftn_distill_method:
        # phase 2: distill the student SFTN made its teacher friendly to, from that teacher
        from ..methods.sftn import SFTNArguments

        student_args = dataclasses.replace(
            training_args, distill_method=training_args.sftn_distill_method, temperature=None,
            output_dir=os.path.join(training_args.output_dir, "student"),
            teacher_model_name_or_path=[training_args.output_dir],  # the saved SFTN teacher, reloaded
            resume_from_checkpoint=None, alpha=None,  # alpha: phase 2's method sets its own default
            **{f.name: f.default for f in dataclasses.fields(SFTNArguments)},  # options of phase 1 alone
        )
        student_model_args = dataclasses.replace(
            model_args, student_model_name_or_path=training_args.sftn_student_model, student_pretrained=False)
        print_fn(f"SFTN phase 2: distilling {training_args.sftn_student_model} with "
                 f"{training_args.sftn_distill_method}")
        return run_training(student_model_args, data_args, student_args, print_fn)
    return metrics


def _train_main(argv: Sequence[str]) -> int:
    model_args, data_args, training_args = parse_train_args(argv)
    run_training(model_args, data_args, training_args)
    return 0
