"""Regenerate the argument references from the code (`python docs/generate.py`).

docs/arguments.md lists every hf_distill flag (help text and default, as `hf-distill train --help`
shows them); docs/trainer_arguments.md lists what each transformers.TrainingArguments field does
under distillation (hf_distill/trainer_arguments.py). tests/test_docs.py fails when either file
is out of date.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return "-" if value is None else f"`{value}`"


def _rows(fields) -> list[str]:
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in fields:
        text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        rows.append(f"| `--{f.name}` | {_default(f)} | {text} |")
    return rows


def arguments_md() -> str:
    from transformers import TrainingArguments

    from hf_distill.arguments import METHOD_ARGUMENTS, DataArguments, DistillationTrainingArguments, ModelArguments

    trainer = {f.name for f in dataclasses.fields(TrainingArguments)}
    method = {f.name for d in METHOD_ARGUMENTS for f in dataclasses.fields(d)}
    own = [f for f in dataclasses.fields(DistillationTrainingArguments) if f.name not in trainer | method]
    lines = ["# hf_distill arguments", "",
             "Generated from the code by `python docs/generate.py`; the same text as `hf-distill train --help`. "
             "In Python they are fields of `DistillationTrainingArguments` (distillation and method options), "
             "or of the CLI's `ModelArguments` / `DataArguments`. Every `transformers.TrainingArguments` field is "
             "accepted too: [trainer_arguments.md](trainer_arguments.md) says what each one does here.", "",
             "## Distillation", "", *_rows(own), ""]
    for d in METHOD_ARGUMENTS:
        lines += [f"## {d.__name__.replace('Arguments', '')} options", "", *_rows(dataclasses.fields(d)), ""]
    lines += ["## Model (command line)", "", *_rows(dataclasses.fields(ModelArguments)), "",
              "## Data (command line)", "", *_rows(dataclasses.fields(DataArguments)), ""]
    from hf_distill.cli import CacheArguments, SearchArguments

    lines += ["## `hf-distill cache-teacher`", "", *_rows(dataclasses.fields(CacheArguments)), "",
              "## `hf-distill search`", "",
              "The search space format is in [methods.md](methods.md#hyperparameter-search).", "",
              *_rows(dataclasses.fields(SearchArguments)), ""]
    return "\n".join(lines)


def trainer_arguments_md() -> str:
    from hf_distill.trainer_arguments import NO_EFFECT, REFUSED, SUPPORT, WORKS

    lines = ["# transformers.TrainingArguments under distillation", "",
             "Generated from `hf_distill/trainer_arguments.py` by `python docs/generate.py`. Every field works as "
             "transformers documents it, is refused with the reason below when set to anything but its default, "
             "or has no effect here (a warning says so when it is set).", ""]
    for status, title in ((REFUSED, "Refused"), (NO_EFFECT, "No effect"), (WORKS, "Works")):
        lines += [f"## {title}", "", "| field | note |", "|---|---|"]
        lines += [f"| `{name}` | {note.replace('|', '/') or '-'} |" for name, (s, note) in SUPPORT.items()
                  if s == status]
        lines.append("")
    return "\n".join(lines)


FILES = {"arguments.md": arguments_md, "trainer_arguments.md": trainer_arguments_md}

if __name__ == "__main__":
    for name, make in FILES.items():
        (DOCS / name).write_text(make())
        print(f"wrote docs/{name}")
