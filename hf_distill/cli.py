"""The ``hf-distill`` command line (also ``python -m hf_distill``).

    hf-distill [train] --config run.yaml [--flag value ...]   distill (flags override the file)
    hf-distill cache-teacher --teacher_cache_dir DIR [...]    teacher outputs computed once (FKD)
    hf-distill search --config run.yaml --n_trials N          hyperparameter search (Optuna, Ray Tune)
    hf-distill layers MODEL [--image-size N]                  candidate hint layers and shapes
    hf-distill demo [--output_dir DIR]                        embedded offline demo

Every field of :class:`ModelArguments`, :class:`DataArguments` and
:class:`DistillationTrainingArguments` is a flag; ``hf-distill train --help`` lists them, the
distillation, model and data flags first. Errors are one line on stderr and a non-zero exit
(``--traceback`` or ``HF_DISTILL_TRACEBACK=1`` shows the Python traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

COMMANDS = {
    "train": "distill a teacher into a student (the default command)",
    "cache-teacher": "run the teacher(s) once over the training data and store their outputs",
    "search": "search hyperparameters (temperature, alpha, learning rate, ...) with Optuna or Ray Tune",
    "layers": "list a model's modules with output shapes (hint-layer candidates)",
    "demo": "the embedded offline demo (digits: teacher, student from scratch, student with KD)",
}

logger = logging.getLogger("hf_distill.cli")


class UsageError(Exception):
    """A mistake in the command line or the config file (exit code 2, like argparse)."""


class ConfigError(UsageError):
    """A mistake in a config file, already named by its keys (not translated to flags)."""


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _parser(extra_dataclasses: Sequence[type] = (), prog: str = "hf-distill train", description: str = ""):
    from transformers import HfArgumentParser, TrainingArguments

    from .arguments import DataArguments, DistillationTrainingArguments, ModelArguments

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, DistillationTrainingArguments, *extra_dataclasses),
        prog=prog,
        usage=f"{prog} [--config FILE] [--flag value ...]",
        description=description or "Distill a teacher into a student (any timm / transformers image classifier). "
        "The distillation, model and data flags come first; the transformers Trainer flags follow.",
        allow_abbrev=False,  # --num_train_epoch must not silently mean --num_train_epochs
    )
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file with any of these arguments; flags on the command line override it.")
    parser.add_argument("--traceback", action="store_true",
                        help="On an error, print the Python traceback (also HF_DISTILL_TRACEBACK=1).")
    from .arguments import METHOD_ARGUMENTS

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    method_fields = [f.name for d in METHOD_ARGUMENTS for f in dataclasses.fields(d)]
    groups = [
        ("distillation", [f.name for f in dataclasses.fields(DistillationTrainingArguments)
                          if f.name not in trainer_fields and f.name not in method_fields]),
        ("method options", method_fields),
        *[(getattr(d, "_cli_group", d.__name__), [f.name for f in dataclasses.fields(d)]) for d in extra_dataclasses],
        ("model", [f.name for f in dataclasses.fields(ModelArguments)]),
        ("data", [f.name for f in dataclasses.fields(DataArguments)]),
        ("training (transformers.TrainingArguments)", sorted(trainer_fields)),
    ]
    _group_help(parser, groups)
    return parser


def _group_help(parser: argparse.ArgumentParser, groups) -> None:
    """Move the flags into titled groups, in this order, ahead of the generic options."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._optionals._group_actions:
        by_dest.setdefault(action.dest, []).append(action)
    new_groups = []
    for title, names in groups:
        group = parser.add_argument_group(title)
        for name in names:
            for action in by_dest.pop(name, []):
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)
        new_groups.append(group)
    rest = [g for g in parser._action_groups if g not in new_groups]
    parser._action_groups[:] = new_groups + rest


def load_config_file(path: str | Path, flag: str = "--config") -> dict:
    """A config file's arguments as a dict (YAML or JSON, chosen by extension)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror or err}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise UsageError(f"{flag} {path}: not valid {'YAML' if path.suffix.lower() != '.json' else 'JSON'}: "
                         f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path}: expected a mapping of argument names to values")
    return data


def _parse(parser, argv: Sequence[str]):
    """Dataclasses from flags and an optional ``--config`` file; returns (groups, given names)."""
    import difflib

    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    valid = {a.dest for a in parser._actions}
    given = {a.split("=", 1)[0][2:] for a in argv if a.startswith("--")}
    if known.config:
        config = load_config_file(known.config)
        unknown = sorted(set(config) - valid)
        if unknown:
            hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
            detail = ", ".join(f"{k}" + (f" (did you mean {v[0]}?)" if v else "") for k, v in hints.items())
            raise UsageError(f"{known.config}: unknown argument(s): {detail}")
        parser.set_defaults(**_config_values(parser, config, known.config))
        given |= set(config)
    flags = {o for a in parser._actions for o in a.option_strings}
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in flags:
            raise UsageError(f"unknown flag {name}" + _closest_flag(name, flags) + f"; `{parser.prog} --help` lists them")

    def refuse(message):  # argparse's own errors (a flag's value of the wrong type): one line, not usage + exit
        kinds = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}
        m = re.match(r"argument (--\w+)\S*: invalid (\w+) value: (.*)", message)
        if m and m.group(2) in kinds:
            message = f"{m.group(1)} must be {kinds[m.group(2)]}, got {m.group(3)}"
        else:  # `--a/--a-alias: ...`: the flag as documented
            message = re.sub(r"^argument (--\w+)/\S+:", r"\1:", message)
        raise UsageError(message)

    parser.error = refuse
    try:
        *groups, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # an argument value the dataclasses refuse
        raise UsageError(str(err)) from None
    if rest:
        raise UsageError(f"unrecognised arguments: {' '.join(rest)}")
    return groups, given


def _closest_flag(name: str, flags) -> str:
    """`` (did you mean --temperature?)`` for ``--temp``: flags it begins first, then similar spellings."""
    import difflib

    longer = sorted((f for f in flags if f.startswith(name) and f != name), key=len)
    close = longer[:3] or difflib.get_close_matches(name, [f for f in flags if f != "--help"], n=1)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _config_values(parser, config: dict, path: str) -> dict:
    """A config file's values converted to their arguments' types (as the flags would be), or one line naming
    every key whose value does not fit."""
    from .argument_checks import Mismatch, coerce, field_types, show

    hints = {}
    for dtype in parser.dataclass_types:
        hints.update(field_types(dtype))
    actions = {a.dest: a for a in parser._actions}
    values, problems = {}, []
    for key, value in config.items():
        hint, action = hints.get(key), actions.get(key)
        if key == "search_space" and isinstance(value, dict):  # an inline mapping (see _search_main)
            values[key] = value
            continue
        if hint is None:
            values[key] = value
            continue
        try:
            converted = coerce(value, hint, lenient=True)
        except Mismatch as err:
            yaml_bool = isinstance(value, bool) and path.lower().endswith((".yaml", ".yml"))
            note = " (YAML reads an unquoted yes/no/on/off as true/false: quote the value)" if yaml_bool else ""
            problems.append(f"{key}: expected {err}, got {show(value)}{note}")
            continue
        choices = getattr(action, "choices", None)
        if choices and converted is not None:
            for v in converted if isinstance(converted, list) else [converted]:
                if v not in choices:
                    problems.append(f"{key}: {show(v)} is not one of {', '.join(map(str, choices))}")
        values[key] = converted
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return values


def parse_train_args(argv: Sequence[str]):
    """(model_args, data_args, training_args) from flags and an optional ``--config`` file."""
    (model_args, data_args, training_args, _), given = _parse(_parser(), argv)
    _cli_defaults(training_args, given)
    return model_args, data_args, training_args


def _cli_defaults(training_args, given: set[str]) -> None:
    """Defaults that suit a command line better than the Trainer's own."""
    if "per_device_eval_batch_size" not in given:
        # evaluation keeps no activations for backward: the training batch size always fits (transformers: 8)
        training_args.per_device_eval_batch_size = training_args.per_device_train_batch_size
    if "disable_tqdm" not in given and not sys.stderr.isatty():
        # progress bars in a log file are cursor codes; print one line per log and per epoch instead
        training_args.disable_tqdm = True


# ---------------------------------------------------------------------------------------------
# Loading data and models
# ---------------------------------------------------------------------------------------------


def load_splits(data_args, seed: int, cache_dir: str | None = None):
    """(train, eval) raw datasets exactly as every command sees them (same split, same subset).

    ``--max_train_samples`` / ``--max_eval_samples`` keep a random subset (shuffled with the
    seed first: folders and many datasets are sorted by class)."""
    from .data import load_image_dataset, split_train_eval

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
        from .data import load_image_split

        name = next(k for k, v in dsd.items() if v is evaluation)
        evaluation = load_image_split(data_args.dataset_name, name, data_args.dataset_config_name, cache_dir)
    for split in (train, evaluation):
        columns = split.column_names or list((split.features or {}).keys())
        if data_args.image_column_name not in columns:
            raise UsageError(f"--image_column_name: no column '{data_args.image_column_name}' in the dataset; "
                             f"its columns are {columns}")
    if data_args.streaming:  # the Trainer shuffles map-style data; a stream is shuffled here (reshuffled per epoch)
        from .data import STREAM_SHUFFLE_BUFFER

        train = train.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    if data_args.max_train_samples:
        train = _random_subset(train, data_args.max_train_samples, seed)
    if data_args.max_eval_samples:
        evaluation = _random_subset(evaluation, data_args.max_eval_samples, seed)
    return train, evaluation


def _random_subset(dataset, n: int, seed: int):
    from .data import is_stream

    if is_stream(dataset):  # already shuffled: its first n
        return dataset.take(n)
    if n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def dataset_classes(train, label_column: str) -> tuple[int, list[str] | None]:
    """(number of classes, class names or None) of the training split's label column."""
    from .data import is_stream as data_is_stream
    from .data import label_names

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
    from .models import load_model

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
    from .models import load_model

    with _flag_for_pretrained("--no_teacher_pretrained"):
        return [
            load_model(name, pretrained=model_args.teacher_pretrained, revision=training_args.teacher_revision,
                       cache_dir=model_args.cache_dir, backbone=backbone)
            for name in training_args.teacher_names
        ]


@contextlib.contextmanager
def _flag_for_pretrained(flag: str):
    """load_model's advice speaks Python (``pretrained=False``); on the command line it is a flag."""
    from .models import ModelLoadError

    try:
        yield
    except ModelLoadError as err:
        raise ModelLoadError(str(err).replace("pretrained=False", flag)) from err


def load_knn_dataset(data_args, seed: int, cache_dir: str | None = None):
    """``--knn_dataset_name``: (memory, evaluation) splits of a separate labelled dataset for k-NN evaluation; the
    memory is ``--knn_split`` (default train), the evaluation its validation / test split or a held-out part."""
    from .data import load_image_dataset, split_train_eval

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
    from .data import load_image_dataset, load_image_split

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
    from .models import num_classes_of
    from .teacher import LabelSpaceError, check_label_spaces

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

    from .callbacks import EpochPrinter
    from .data import with_image_transform
    from .methods import get_method
    from .models import input_spec
    from .trainer import DistillationTrainer

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
        from .teacher_cache import with_teacher_cache

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
    from .data import SKIPPED_IMAGES

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
        from .methods.sftn import SFTNArguments

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


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


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
    from .models.features import targets_of
    from .methods import get_method
    from .models import input_spec
    from .teacher_cache import build_teacher_cache

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


@dataclasses.dataclass
class SearchArguments:
    _cli_group = "search"

    n_trials: int = dataclasses.field(default=10, metadata={"help": "Trials to run (each a full training run)."})
    backend: str = dataclasses.field(
        default="optuna", metadata={"help": "Search engine: `optuna` (TPE, pip install 'hf_distill[optuna]') or `ray` "
                                    "(Ray Tune, pip install 'hf_distill[ray]').", "choices": ["optuna", "ray"]})
    search_space: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "A YAML/JSON file mapping arguments to ranges or choices (or a `search_space:` mapping in "
                  "--config), e.g. `temperature: {low: 1, high: 8}`, `learning_rate: {low: 1e-4, high: 1e-2, log: "
                  "true}`, `per_device_train_batch_size: [32, 64]`. Default: the learning rate (x0.1 to x10) and "
                  "the method's own weights."})
    search_metric: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "Evaluation metric to optimise (default: eval_accuracy, or for feature "
                                "distillation eval_knn_accuracy, else eval_feature_cosine; a loss is minimised)."})
    search_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the sampler (Optuna's TPE, Ray Tune's "
                                                                "random search)."})


def _search_main(argv: Sequence[str]) -> int:
    """``hf-distill search``: trials of the training run the arguments describe, with the searched values."""
    from .search import SearchSpace, check_backend

    parser = _parser((SearchArguments,), prog="hf-distill search",
                     description="Search hyperparameters (distillation and Trainer arguments) over trials of the run "
                     "the other flags describe; each trial trains a fresh student against the same, once-loaded "
                     "teacher. Writes search_results.json and best.yaml (the run with the best values) to "
                     "--output_dir.")
    (model_args, data_args, training_args, search_args, _), given = _parse(parser, argv)
    _cli_defaults(training_args, given)
    try:
        check_backend(search_args.backend)
    except ImportError as err:
        raise UsageError(f"--backend {search_args.backend}: {err}") from None
    space = search_args.search_space
    if isinstance(space, str):
        space = _inline_or_file(space, "--search_space")
    if space is not None:
        try:
            SearchSpace.from_dict(space, type(training_args))
        except ValueError as err:
            raise UsageError(str(err)) from None
    if search_args.n_trials < 1:
        raise UsageError("--n_trials must be at least 1")
    trainer, train, evaluation = build_trainer(model_args, data_args, training_args, print, model_init=True)
    print(f"searching {search_args.n_trials} trials of {model_args.student_model_name_or_path} with "
          f"{training_args.distill_method} ({search_args.backend}) on {_count(train)}; evaluating on {_count(evaluation)}")
    kwargs = {}
    if search_args.backend == "optuna":
        import optuna

        kwargs["sampler"] = optuna.samplers.TPESampler(seed=search_args.search_seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        kwargs["search_alg"] = BasicVariantGenerator(random_state=search_args.search_seed)
    best = trainer.hyperparameter_search(hp_space=space, n_trials=search_args.n_trials, backend=search_args.backend,
                                         metric=search_args.search_metric, **kwargs)
    trials = trainer.search_trials or [  # Ray Tune: the trials ran in its workers
        {"trial": i, "params": {k: t.config[k] for k in best.hyperparameters}, "objective": t.last_result.get("objective"),
         "metrics": {k: v for k, v in t.last_result.items() if k.startswith("eval_")}}
        for i, t in enumerate(best.run_summary.trials)]
    for t in trials:
        print(f"trial {t['trial']}: objective {_fmt(t['objective'])}  " + "  ".join(
            f"{k}={_fmt(v)}" for k, v in t["params"].items()))
    print(f"best: objective {_fmt(best.objective)}  " + "  ".join(
        f"{k}={_fmt(v)}" for k, v in best.hyperparameters.items()))
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"backend": search_args.backend, "best": {"objective": best.objective,
                                                        "hyperparameters": best.hyperparameters}, "trials": trials}
    (out / "search_results.json").write_text(json.dumps(results, indent=2, default=str))
    best_config = {**_given_values((model_args, data_args, training_args), given), **best.hyperparameters,
                   "output_dir": str(out / "best")}
    import yaml

    (out / "best.yaml").write_text("# the searched run with the best trial's values (hf-distill search)\n"
                                   + yaml.safe_dump(best_config, sort_keys=False))
    print(f"results in {out / 'search_results.json'}; train with the best values: "
          f"hf-distill --config {out / 'best.yaml'}")
    return 0


def _inline_or_file(text: str, flag: str) -> dict:
    """A mapping given inline (YAML / JSON text) or as a file."""
    if not os.path.exists(text) and text.lstrip().startswith("{"):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"{flag}: not valid YAML / JSON: {str(err).splitlines()[0]}") from None
        if isinstance(value, dict):
            return value
    return load_config_file(text, flag)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _given_values(groups, given: set[str]) -> dict:
    """The arguments the user set (config file and flags), as plain values for a config file."""
    import enum

    values = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in given:
                value = getattr(group, f.name)
                if f.name == "report_to" and not value:
                    value = "none"  # as a user writes it (the Trainer turns it into [])
                values[f.name] = value.value if isinstance(value, enum.Enum) else value
    return values


def _layers_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-distill layers", allow_abbrev=False,
        description="List a model's stages and modules with output shapes (hint-layer candidates). Stages are "
        "read from what the model's library declares: timm feature_info, transformers hidden states "
        "(output_hidden_states, reshaped_hidden_states for Swin-like models), a stage_modules list on the "
        "model; for other modules, its children by output shape. FitNets hint_layers=auto pairs the middle "
        "stages, BYOT puts exits after every stage but the last, SFTN branches after each.")
    parser.add_argument("model", help="timm name, hf-hub:org/name, local folder or transformers repo id")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels for timm names (default 3)")
    parser.add_argument("--stages-only", action="store_true", help="only the stage outputs")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (not needed for shapes)")
    args = parser.parse_args(argv)
    from .models import input_spec, load_model
    from .models.taps import describe_layers, format_layers

    kw = {"in_chans": args.in_chans} if args.in_chans else {}
    model = load_model(args.model, pretrained=args.pretrained, **kw)
    size = args.image_size or input_spec(model).image_size[0]
    rows = describe_layers(model, image_size=size)
    if args.stages_only:
        rows = [r for r in rows if r.get("stage")]
    print(format_layers(rows))
    from .models.view import StagesNotFoundError, format_stages, model_view

    try:
        print("\n" + format_stages(model_view(model)))
    except StagesNotFoundError as err:
        print(f"\nno stages found: {err}")
    return 0


def _demo_main(argv: Sequence[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def _train_main(argv: Sequence[str]) -> int:
    model_args, data_args, training_args = parse_train_args(argv)
    run_training(model_args, data_args, training_args)
    return 0


def _top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hf-distill [COMMAND] [--flag value ...]", "",
             "Knowledge distillation for timm and Hugging Face vision models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Without a command, `train` runs. `hf-distill COMMAND --help` lists a command's flags",
              "(`hf-distill train --help`: the distillation, model and data flags first, then the Trainer's).", "",
              "examples:",
              "  hf-distill --config examples/kd_digits.yaml --num_train_epochs 30",
              "  hf-distill layers resnet18 --image-size 64 --stages-only",
              "  hf-distill cache-teacher --config run.yaml --teacher_cache_dir cache/",
              "  hf-distill search --config run.yaml --n_trials 20 --backend optuna",
              "  hf-distill demo"]
    return "\n".join(lines)


_HANDLERS = {"train": _train_main, "cache-teacher": _cache_teacher_main, "search": _search_main,
             "layers": _layers_main, "demo": _demo_main}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file or pipe as they happen
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    show_traceback = "--traceback" in argv or os.environ.get("HF_DISTILL_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    try:
        return _HANDLERS[command](argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(_interrupted_line(command, argv), file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one actionable line; --traceback for the rest
        if show_traceback:
            raise
        message = _one_line(err) if isinstance(err, ConfigError) else _cli_message(_one_line(err))
        print(f"hf-distill {command}: error: {message}", file=sys.stderr)
        if not isinstance(err, UsageError):
            print("(run again with --traceback for the details)", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


def _interrupted_line(command: str, argv: Sequence[str]) -> str:
    """What a Ctrl-C left behind and how to continue (a rerun resumes an unfinished run by itself)."""
    import shlex

    out = _CURRENT_RUN.get("output_dir")
    if not out:
        return "hf-distill: interrupted"
    found = last_checkpoint(out)
    again = shlex.join(["hf-distill", *([command] if command != "train" else []), *argv])
    if found:
        return (f"hf-distill: interrupted; the last checkpoint is {found}: run the same command to continue from it "
                f"({again})")
    return (f"hf-distill: interrupted before the first checkpoint in {out} (none saved yet: --save_strategy steps "
            "--save_steps N saves them); the same command starts again from scratch")


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(err, (UsageError, ValueError, RuntimeError, OSError, KeyError)) and len(lines) > 1:
        return " ".join(lines)  # lists of differences stay readable on one line
    return lines[0] if lines else text


def _field_names() -> list[str]:
    from .arguments import DataArguments, DistillationTrainingArguments, ModelArguments

    names = {f.name for d in (ModelArguments, DataArguments, DistillationTrainingArguments, CacheArguments,
                                                        SearchArguments)
             for f in dataclasses.fields(d)}
    return sorted(names, key=len, reverse=True)


def _cli_message(message: str) -> str:
    """Advice phrased for the command line: argument names become their flags (``alpha=0.5`` -> ``--alpha 0.5``)."""
    for name in _field_names():
        message = re.sub(rf"(?<=does not use ){name}\b", f"--{name}", message)
        message = re.sub(rf"(?<![-\w.]){name}=(['\"]?)([^'\"\s,;)]*)\1", rf"--{name} \2", message)
        if "_" in name:
            message = re.sub(rf"(?<![-\w.]){name}\b", f"--{name}", message)
        else:
            message = re.sub(rf"(?<![-\w.]){name} must\b", f"--{name} must", message)
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
