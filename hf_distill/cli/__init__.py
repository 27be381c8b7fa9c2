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

- :mod:`.parsing`: flags and config files into the argument dataclasses, one-line usage errors
- :mod:`.train`: loading data, student and teachers, building the trainer, ``hf-distill train``
- :mod:`.cache`: ``hf-distill cache-teacher``
- :mod:`.search`: ``hf-distill search``
- :mod:`.layers`: ``hf-distill layers``
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Sequence

from .cache import CacheArguments, _cache_teacher_main
from .layers import _layers_main
from .parsing import ConfigError, UsageError, load_config_file, parse_train_args
from .search import SearchArguments, _search_main
from .train import (
    RUN_OUTPUTS,
    _CURRENT_RUN,
    _train_main,
    build_trainer,
    check_output_dir,
    check_teacher_classes,
    clear_previous_run,
    dataset_classes,
    last_checkpoint,
    load_knn_dataset,
    load_knn_split,
    load_splits,
    load_student,
    load_teachers,
    run_training,
)

__all__ = [
    "COMMANDS", "RUN_OUTPUTS", "CacheArguments", "ConfigError", "SearchArguments", "UsageError", "build_trainer",
    "check_output_dir", "check_teacher_classes", "clear_previous_run", "dataset_classes", "last_checkpoint",
    "load_config_file", "load_knn_dataset", "load_knn_split", "load_splits", "load_student", "load_teachers", "main",
    "parse_train_args", "run_training",
]


COMMANDS = {
    "train": "distill a teacher into a student (the default command)",
    "cache-teacher": "run the teacher(s) once over the training data and store their outputs",
    "search": "search hyperparameters (temperature, alpha, learning rate, ...) with Optuna or Ray Tune",
    "layers": "list a model's modules with output shapes (hint-layer candidates)",
    "demo": "the embedded offline demo (digits: teacher, student from scratch, student with KD)",
}

logger = logging.getLogger("hf_distill.cli")


def _demo_main(argv: Sequence[str]) -> int:
    from ..demo import main as demo_main

    return demo_main(argv)


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
    from ..arguments import DataArguments, DistillationTrainingArguments, ModelArguments

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
