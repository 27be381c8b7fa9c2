"""The structure that keeps combinations handled once: a small method interface, a trainer that names no method."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from hf_distill.methods import HOOKS, METHODS, DistillationMethod

ROOT = Path(__file__).resolve().parents[1] / "hf_distill"
HELPERS = {"ce", "metric_kind"}  # shared helpers of the base class, never overridden


def _own_methods(cls) -> set[str]:
    return {name for name, value in vars(cls).items() if not name.startswith("_")
            and (inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod)))}


def test_the_interface_is_at_most_twelve_hooks_each_used_by_two_methods():
    assert len(HOOKS) <= 12
    base = _own_methods(DistillationMethod)
    assert set(HOOKS) | HELPERS == base, "every public method of the base class is a hook or a named helper"
    users = {hook: [m.name for m in METHODS.values() if hook in _own_methods(m)] for hook in HOOKS}
    lonely = {hook: names for hook, names in users.items() if len(names) < 2}
    assert not lonely, f"hooks overridden by fewer than two methods: {lonely}"
    for method in METHODS.values():  # a method implements hooks (and its own private helpers), nothing else
        overridden = {name for name in _own_methods(method) if hasattr(DistillationMethod, name)}
        assert overridden <= set(HOOKS), (method.name, overridden - set(HOOKS))
        assert not (_own_methods(method) & HELPERS), method.name


def test_the_trainer_names_no_method_and_asks_no_output_kind():
    source = (ROOT / "trainer.py").read_text()
    code = ast.parse(source)
    strings = {node.value for node in ast.walk(code) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    named = sorted(name for name in METHODS if name in strings)
    assert not named, f"trainer.py names methods: {named}"
    assert not re.search(r"\b(student_output|teacher_output)\b", source), "the output kind is decided outside the trainer"
    assert not re.search(r"from \.methods\.\w+ import|import hf_distill\.methods\.\w+", source)
    for folder in ("training", "teachers"):  # the trainer's parts import no particular method either
        for path in (ROOT / folder).glob("*.py"):
            assert not re.search(r"from \.\.methods\.\w+ import", path.read_text()), path


def test_the_trainer_class_is_under_450_lines():
    code = ast.parse((ROOT / "trainer.py").read_text())
    cls = next(node for node in code.body if isinstance(node, ast.ClassDef) and node.name == "DistillationTrainer")
    assert cls.end_lineno - cls.lineno + 1 < 450
