"""Types and ranges of argument values, checked before anything is loaded.

Python keywords are checked as given (``per_device_train_batch_size=32.5`` is refused, an int
for a float is fine); config-file values are also converted the way a YAML user means them
(``"1e-4"`` is a number, ``[32, 32]`` an image size, an unquoted ``no`` that YAML reads as
``False`` is the string ``"no"`` where the argument takes it). Every problem is reported at once,
in one line, named as the user wrote it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import numbers
import types
import typing

_NONE = type(None)


class Mismatch(Exception):
    """A value that does not fit its argument's type; the text says what was expected."""


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict:
    """``{field name: resolved type}`` of a dataclass (annotations may be strings)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: check nothing rather than fail
        hints = {}
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls)}


def _members(hint) -> tuple:
    origin = typing.get_origin(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _enum_values(hint) -> list[str]:
    return [m.value for t in _members(hint) if isinstance(t, type) and issubclass(t, enum.Enum) for m in t]


def describe(hint) -> str:
    """What a type asks for, in words."""
    names = []
    has_enum = bool(_enum_values(hint))
    for t in _members(hint):
        if t is _NONE or (t is str and has_enum):  # `Union[SaveStrategy, str]`: the strings are the choices
            continue
        origin = typing.get_origin(t)
        if origin in (list, tuple):
            inner = typing.get_args(t)
            names.append(f"a list of {_plural(describe(inner[0]))}" if inner else "a list")
        elif t is bool:
            names.append("true or false")
        elif t is int:
            names.append("an integer")
        elif t is float:
            names.append("a number")
        elif t is str:
            names.append("a string")
        elif origin is dict or t is dict:
            names.append("a mapping")
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            names.append("one of " + ", ".join(str(m.value) for m in t))
    return " or ".join(dict.fromkeys(names)) or "a value"


def _plural(text: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(text, text)


def checkable(hint) -> bool:
    """Whether ``coerce`` understands every member of the type (others are left to their owners)."""
    for t in _members(hint):
        origin = typing.get_origin(t)
        if t in (_NONE, bool, int, float, str):
            continue
        if origin in (list, tuple) and all(checkable(a) for a in typing.get_args(t) if a is not Ellipsis):
            continue
        return False
    return True


def coerce(value, hint, lenient: bool = False):
    """``value`` as ``hint`` asks, or :class:`Mismatch`. ``lenient``: also convert as a config file means it
    (numbers written as strings, booleans YAML made of ``no`` / ``yes``, one value for a list)."""
    members = _members(hint)
    if value is None:
        if _NONE in members or hint is typing.Any:
            return None
        raise Mismatch(describe(hint))
    if hint is typing.Any:
        return value
    if isinstance(value, enum.Enum) and any(isinstance(t, type) and isinstance(value, t) for t in members):
        return value
    errors = []
    # exact kinds first: a string stays a string where the type takes strings
    for t in sorted(members, key=lambda t: 0 if _is_kind(value, t) else 1):
        if t is _NONE:
            continue
        try:
            return _coerce_one(value, t, lenient)
        except Mismatch as err:
            errors.append(err)
    raise Mismatch(describe(hint))


def _is_kind(value, t) -> bool:
    origin = typing.get_origin(t) or t
    return isinstance(origin, type) and isinstance(value, origin) and not (origin is int and isinstance(value, bool))


def _coerce_one(value, t, lenient: bool):
    origin = typing.get_origin(t)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(t) or (typing.Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, inner, lenient) for v in value]
        one = coerce(value, inner, lenient)  # Mismatch if not even one element
        # a config's `teacher_model_name_or_path: resnet18` is a list of one; Python code may pass one value
        return [one] if lenient else value
    if origin is dict or t is dict:
        if isinstance(value, dict):
            return value
        raise Mismatch("a mapping")
    if isinstance(t, type) and issubclass(t, enum.Enum):
        values = [m.value for m in t]
        if isinstance(value, bool) and lenient and not value and "no" in values:
            return "no"  # YAML's unquoted `no`
        if isinstance(value, str) and value in values:
            return value
        raise Mismatch(describe(t))
    if t is bool:
        if isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise Mismatch("true or false")
    if t is int:
        if isinstance(value, bool):
            raise Mismatch("an integer")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        if lenient and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise Mismatch("an integer")
    if t is float:
        if isinstance(value, bool):
            raise Mismatch("a number")
        if isinstance(value, numbers.Real):
            return float(value) if not isinstance(value, int) else value
        if lenient and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise Mismatch("a number")
    if t is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return str(value)  # `teacher_revision: 1234`
        raise Mismatch("a string")
    if isinstance(t, type):
        if isinstance(value, t):
            return value
        raise Mismatch(describe(t))
    return value


def show(value) -> str:
    """A value as the user wrote it (YAML spelling for booleans and None)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def type_problems(obj, names=None) -> list[str]:
    """Python keywords whose values do not fit their types, in keyword terms; converts fitting ones
    (an integral float for an int). Types this module does not understand are not checked here."""
    problems = []
    for name, hint in field_types(type(obj)).items():
        if names is not None and name not in names or not checkable(hint):
            continue
        value = getattr(obj, name, None)
        try:
            fixed = coerce(value, hint)
        except Mismatch as err:
            problems.append(f"{name} must be {err}, got {show(value)}")
            continue
        if fixed is not value and type(fixed) is not type(value):
            setattr(obj, name, fixed)
    return problems


# name -> (lowest, whether the lowest is allowed, highest or None, whether the highest is allowed, advice)
RANGES: dict[str, tuple] = {
    "per_device_train_batch_size": (1, True, None, True, ""),
    "per_device_eval_batch_size": (1, True, None, True, ""),
    "gradient_accumulation_steps": (1, True, None, True, ""),
    "learning_rate": (0, True, None, True, ""),
    "weight_decay": (0, True, None, True, ""),
    "warmup_steps": (0, True, None, True, ""),
    "logging_steps": (0, False, None, True, ""),
    "save_steps": (0, False, None, True, ""),
    "eval_steps": (0, False, None, True, ""),
    "dataloader_num_workers": (0, True, None, True, ""),
    "cutmix_alpha": (0, True, None, True, ""),
    "mixup_prob": (0, True, 1, True, ""),
    "mixup_switch_prob": (0, True, 1, True, ""),
    "max_train_samples": (1, True, None, True, "leave it unset to use every image"),
    "max_eval_samples": (1, True, None, True, "leave it unset to use every image"),
    "knn_max_samples": (1, True, None, True, "leave it unset to use every image"),
    "eval_fraction": (0, False, 1, False, ""),
    "in_chans": (1, True, None, True, ""),
    "image_size": (1, True, None, True, "leave it unset for the student's own size"),
}


def range_problems(obj) -> list[str]:
    """Values outside their argument's range, in keyword terms (``RANGES``; lists checked per value)."""
    problems = []
    names = {f.name for f in dataclasses.fields(obj)}
    for name, (low, low_ok, high, high_ok, advice) in RANGES.items():
        if name not in names:
            continue
        value = getattr(obj, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                continue
            bad = v < low or (v == low and not low_ok) or (high is not None and (v > high or (v == high and not high_ok)))
            if bad:
                if high is None:
                    want = f"{'>=' if low_ok else '>'} {low}"
                else:
                    want = f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
                problems.append(f"{name} must be {want}, got {show(v)}" + (f" ({advice})" if advice else ""))
                break
    if "max_steps" in names and "num_train_epochs" in names:
        if obj.max_steps == 0 or obj.max_steps < -1:
            problems.append(f"max_steps must be > 0 (or -1 to train num_train_epochs), got {obj.max_steps}")
        elif obj.max_steps == -1 and isinstance(obj.num_train_epochs, numbers.Real) and not obj.num_train_epochs > 0:
            problems.append(f"num_train_epochs must be > 0, got {show(obj.num_train_epochs)}")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))
