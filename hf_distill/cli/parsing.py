"""Parsing the command line: flags and config files (YAML / JSON) into the argument dataclasses, with
one-line usage errors (:class:`UsageError`) naming the flag or the config key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
    """A mistake in the command line or the config file (exit code 2, like argparse)."""


class ConfigError(UsageError):
    """A mistake in a config file, already named by its keys (not translated to flags)."""


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _parser(extra_dataclasses: Sequence[type] = (), prog: str = "hf-distill train", description: str = ""):
    from transformers import HfArgumentParser, TrainingArguments

    from ..arguments import DataArguments, DistillationTrainingArguments, ModelArguments

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
    from ..arguments import METHOD_ARGUMENTS

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
    from ..argument_checks import Mismatch, coerce, field_types, show

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
