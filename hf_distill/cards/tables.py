"""The card's tables (results against the teachers, size and inference time) and how values are
written in them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .context import _SECRET_KEY_RE, REDACTED, CardContext, hub_repo_id


def _fmt(value: Any) -> str:
    """A markdown-table-safe rendering of a value."""
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_fmt(v) for v in value) if value else "-"
    elif isinstance(value, dict):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_kv(key: str, value: Any) -> str:
    """Like :func:`_fmt`, with sizes such as ``(224, 224)`` shown as ``224x224``."""
    if "size" in str(key) and isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value)
    return _fmt(value)


def _fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _fmt_acc(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return _fmt(v)
    return f"{v * 100:.2f}%" if 0.0 <= v <= 1.0 else f"{v:.4g}"


def _fmt_ms(v: Any) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "-"


def _safe_items(d: dict) -> list[tuple[str, str]]:
    """(key, rendered value) pairs; string values of secret-looking keys (``hub_token``, ...) are redacted."""
    out = []
    for k, v in d.items():
        secret = isinstance(v, str) and bool(v) and _SECRET_KEY_RE.search(str(k)) is not None
        out.append((str(k), REDACTED if secret else _fmt_kv(k, v)))
    return out


def _link(name: str) -> str:
    repo = hub_repo_id(name)
    return f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{name}`"


def _method_info(ctx: CardContext) -> tuple[str, str, tuple[str, str] | None, dict[str, str]]:
    """(human name, one sentence, paper, metric kinds) as the method declares them, unless the context says."""
    from ..methods import METHODS, DistillationMethod

    method = METHODS.get(ctx.method)
    title = ctx.method_title or getattr(method, "title", "") or ctx.method
    description = ctx.method_description or getattr(method, "description", "") or \
        f"Distilled with the `{ctx.method}` method of hf_distill."
    paper = ctx.method_paper or getattr(method, "paper", None)
    kinds = ctx.metric_kinds if ctx.metric_kinds is not None else \
        getattr(method, "metric_kinds", DistillationMethod.metric_kinds)
    return title, description, paper, kinds


def _kind_of(name: str, kinds: dict[str, str]) -> str | None:
    return next((kind for pattern, kind in kinds.items() if re.fullmatch(pattern, name)), None)


def _dataset_label(name: str) -> str:
    """A dataset for people: a local folder by its last part, a Hub id as it is."""
    from ..models import short_name

    return short_name(name)


# What each kind of metric is called in its table, and how its values are written.
_KIND_TABLES = (
    ("accuracy", "Top-1 accuracy", "Model"),
    ("knn", "k-NN top-1 accuracy (k=20, cosine, summary features)", "Model"),
    ("cosine", "Cosine similarity to the teacher's standardised features", "Teacher and target"),
    ("agreement", "Top-1 agreement (share of images where student and teacher predict the same class)",
     "Comparison"),
    ("divergence", "KL(teacher ‖ student) at temperature 1, mean per image", "Comparison"),
)


def _teacher_named(ctx: CardContext, index: int | None = None, key: str | None = None) -> str:
    """A teacher as every part of the card names it: ``Teacher (`name`)`` or ``Teacher 2 (`name`)``."""
    names = ctx.teacher_names
    if key is not None:
        name = ctx.teacher_keys.get(key, key)
        index = names.index(name) if name in names else None
        if index is None:
            return f"Teacher (`{name}`)"
    if index is not None and index < len(names):
        return f"Teacher {index + 1} (`{names[index]}`)" if len(names) > 1 else f"Teacher (`{names[index]}`)"
    if len(names) == 1:
        return f"Teacher (`{names[0]}`)"
    return "Teachers (ensemble)" if names else "Teacher"


def _metric_label(ctx: CardContext, name: str) -> str:
    """The row label of a metric in its table."""
    student = f"**Student** (`{ctx.student_name}`)"
    if name in ("accuracy", "knn_accuracy"):
        return student
    if name == "teacher_accuracy":
        return _teacher_named(ctx)
    if name == "teacher_accuracy_student_input":
        return f"{_teacher_named(ctx)}, fed the student's input"
    match = re.fullmatch(r"teacher(\d+)_accuracy", name)
    if match:
        return _teacher_named(ctx, index=int(match.group(1)))
    match = re.fullmatch(r"exit(\d+)_accuracy", name)
    if match:
        return f"Exit {int(match.group(1))} (early-exit classifier)"
    if name == "ensemble_accuracy":
        return "Ensemble of all exits"
    match = re.fullmatch(r"branch(\d+)_accuracy", name)
    if match:
        return f"Student branch {int(match.group(1))}"
    match = re.fullmatch(r"(\w+)_head_accuracy", name)
    if match:
        return f"Student, {match.group(1).replace('_', ' ')} head"
    if name.startswith("teacher_knn_accuracy"):
        key = name[len("teacher_knn_accuracy"):].lstrip("_")
        return _teacher_named(ctx, key=key) if key else _teacher_named(ctx)
    if name == "feature_cosine":
        return "Mean over teachers and targets"
    match = re.fullmatch(r"feature_cosine_(summary|spatial)_(.+)", name)
    if match:
        return f"{_teacher_named(ctx, key=match.group(2))}, {match.group(1)} features"
    if name == "teacher_agreement":
        return f"Student and {_teacher_named(ctx)}"
    if name == "teacher_kl":
        return f"{_teacher_named(ctx)} to student"
    return f"`{name}`"


def _metric_value(kind: str, value: Any) -> str:
    if kind in ("accuracy", "knn", "agreement"):
        return _fmt_acc(value)
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return _fmt(value)


def _results(ctx: CardContext, kinds: dict[str, str]) -> tuple[list[dict], list[str], list]:
    """Tables of results, one per kind of metric (each row: label, value, the metric's name in the run's
    record), sentences about them, and the metrics the method does not declare."""
    by_kind: dict[str, list[str]] = {}
    other = []
    for name in ctx.metrics:
        kind = _kind_of(name, kinds)
        if kind is None:
            other.append((name, _fmt(ctx.metrics[name])))
        else:
            by_kind.setdefault(kind, []).append(name)
    tables = []
    for kind, header, first in _KIND_TABLES:
        names = by_kind.pop(kind, [])
        rows = []
        for name in sorted(names, key=_row_order):
            value = _metric_value(kind, ctx.metrics[name])
            bold = name in ("accuracy", "knn_accuracy")
            rows.append((_metric_label(ctx, name), f"**{value}**" if bold else value, f"`eval_{name}`"))
        if rows:
            tables.append({"kind": kind, "header": header, "first": first, "rows": rows})
    for kind, names in by_kind.items():  # a kind the card has no table for
        other.extend((name, _fmt(ctx.metrics[name])) for name in names)
    lines = []
    student, teacher = ctx.metrics.get("accuracy"), ctx.metrics.get("teacher_accuracy")
    if isinstance(student, (int, float)) and isinstance(teacher, (int, float)):
        gap = (float(student) - float(teacher)) * (100 if 0 <= student <= 1 and 0 <= teacher <= 1 else 1)
        lines.append(f"The student is {abs(gap):.2f} points {'above' if gap >= 0 else 'below'} the teacher "
                     f"({_fmt_acc(student)} vs {_fmt_acc(teacher)}).")
    if ctx.teacher_measurement and any(re.fullmatch(r"teacher\d*_accuracy(_student_input)?", n) for n in ctx.metrics):
        lines.append(ctx.teacher_measurement)
    return tables, lines, other


def _row_order(name: str) -> tuple:
    """Student first, then teachers, then exits / branches / heads in their numeric order."""
    rank = 0 if name in ("accuracy", "knn_accuracy", "feature_cosine", "teacher_agreement", "teacher_kl") else \
        1 if name.startswith("teacher") else 2
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return rank, numbers, name


def _times(ratio: float, more: str, less: str) -> str:
    """``2.19x fewer`` when ratio >= 1, else ``3.10x more`` (a comparison always read the right way round)."""
    if round(ratio, 2) == 1.0 or round(1 / ratio, 2) == 1.0:
        return ""
    return f"{ratio:.2f}x {more}" if ratio >= 1 else f"{1 / ratio:.2f}x {less}"


def _size(ctx: CardContext) -> tuple[list, list]:
    t = dict(ctx.timing)
    s_ms, t_ms = t.pop("student_ms_per_image", None), t.pop("teacher_ms_per_image", None)
    rows = [(f"Student (`{ctx.student_name}`)", _fmt_params(ctx.student_params), _fmt_ms(s_ms))]
    teacher_total = sum(p for p in ctx.teacher_params if p) if ctx.teacher_params else 0
    n = len(ctx.teacher_names)
    for i, name in enumerate(ctx.teacher_names):
        params = ctx.teacher_params[i] if i < len(ctx.teacher_params) else None
        rows.append((_teacher_named(ctx, index=i), _fmt_params(params), _fmt_ms(t_ms) if n == 1 else "-"))
    if n > 1:
        rows.append(("Teachers (all)", _fmt_params(teacher_total), _fmt_ms(t_ms)))
    elif n == 0 and t_ms is not None:
        rows.append(("Teacher", _fmt_params(teacher_total or None), _fmt_ms(t_ms)))
    lines = []
    whom = f"the teacher{'s together' if n > 1 else ''}"
    if teacher_total and ctx.student_params:
        times = _times(teacher_total / ctx.student_params, "fewer", "more")
        lines.append(f"**Compression:** the student has {times} parameters than {whom}." if times else
                     f"**Compression:** the student has about as many parameters as {whom}.")
    try:
        times = _times(float(t_ms) / float(s_ms), "faster", "slower")
        lines.append(f"**Speed:** the student's inference is {times} than {whom}." if times else
                     f"**Speed:** the student's inference is about as fast as {whom}'s.")
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    if ctx.teacher_cache and not teacher_total:
        lines.append("The teacher was not loaded for this run: its outputs were read from a cache "
                     f"({ctx.teacher_cache}).")
    conditions = [f"{k.replace('_', ' ')}: {_fmt_kv(k, v)}" for k, v in t.items() if v is not None]
    if s_ms is not None or t_ms is not None:
        lines.append("Inference time is the median of several forward passes in eval mode without gradients"
                     + (f" ({'; '.join(conditions)})." if conditions else "."))
    elif conditions:
        lines.append("Timing conditions: " + "; ".join(conditions) + ".")
    return rows, lines
