"""Model cards for distilled students: metadata the Hub understands plus a readable report.

:func:`build_model_card` fills ``distilled_model_card.md`` (a Jinja template for
``huggingface_hub.ModelCard.from_template``) from a :class:`CardContext`: what was distilled
from what with which method, every hyperparameter, student-vs-teacher results, parameter
counts and measured inference time, a usage snippet for the student's library, the training
procedure and framework versions. Anything that looks like a Hugging Face token is removed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

__all__ = [
    "CardContext",
    "build_model_card",
    "framework_versions",
    "hub_repo_id",
    "measure_latency_ms",
    "scrub_secrets",
    "template_path",
]

TEMPLATE_NAME = "distilled_model_card.md"

# Licence identifiers the Hub accepts in the ``license`` field (others become ``license: other``).
_HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
    ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
    pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
    llama3.3 llama4 gemma unknown other""".split()
)

_TOKEN_RE = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,})")
_SECRET_KEY_RE = re.compile(r"(token$|secret|password|passwd|api_?key|credential)", re.I)
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BARE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LOCAL_DATASETS = {"sklearn-digits", "imagefolder"}
REDACTED = "<redacted>"


@dataclass
class CardContext:
    """Everything the card reports; only the first four fields are required."""

    student_name: str  # e.g. "resnet18" or "my-org/student"
    library_name: str  # "timm" | "transformers" | "torch"
    student_params: int
    method: str  # "kd", "fitnets", "byot", "sftn", "noisy_teacher", "supervised", ...
    teacher_names: list[str] = field(default_factory=list)  # Hub ids, local paths or architecture names
    teacher_params: list[int] = field(default_factory=list)
    method_paper: tuple[str, str] | None = None  # (title, url)
    hyperparameters: dict = field(default_factory=dict)  # every distillation hyperparameter
    metrics: dict[str, float] = field(default_factory=dict)  # eval metrics without the "eval_" prefix
    dataset: str | None = None  # dataset name (Hub id when it is one)
    license: str | None = None
    training: dict = field(default_factory=dict)  # epochs, train_batch_size, optimizer, learning_rate, ...
    timing: dict = field(default_factory=dict)  # student_ms_per_image, teacher_ms_per_image, device, ...
    label_names: list[str] | None = None
    repo_id: str | None = None  # where the card will be pushed (for the usage snippet)
    image_size: tuple[int, int] | None = None
    in_chans: int = 3
    notes: dict[str, str] = field(default_factory=dict)  # extra facts, rendered as a list
    task: str = "image-classification"  # or "image-feature-extraction" (a feature-distilled backbone)
    # what the method declares (hf_distill.methods): its human name, one sentence, the kind of each metric
    # (regex over metric names -> accuracy / knn / cosine / agreement / divergence); default: the registry's
    method_title: str | None = None
    method_description: str | None = None
    metric_kinds: dict[str, str] | None = None
    eval_split: str | None = None  # the evaluation split's name ("test"), when known
    eval_size: int | None = None  # how many images it holds
    eval_held_out: bool = False  # the evaluation images are a held-out part of the split named eval_split
    preprocessing: str | None = None  # how the evaluation images were preprocessed, in words
    teacher_measurement: str | None = None  # how the teacher's accuracy was measured, in words
    teacher_keys: dict[str, str] = field(default_factory=dict)  # teacher key in metric names -> teacher name
    teacher_cache: str | None = None  # where cached teacher outputs came from, in words


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def scrub_secrets(text: str) -> str:
    """Remove anything that looks like a Hugging Face access token (``hf_...``, ``api_org_...``)."""
    return _TOKEN_RE.sub(REDACTED, text)


def hub_repo_id(name: str | None) -> str | None:
    """``org/name`` when ``name`` looks like a Hub model repo id (``hf-hub:`` prefix allowed), else ``None``.

    Local paths (existing, absolute, relative with ``./``/``~``, ``local-dir:``) and bare
    architecture names (``resnet50``) are not repo ids.
    """
    if not name:
        return None
    name = str(name).strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        if os.path.exists(name):
            return None
    name = name.split("@", 1)[0]  # a pinned revision is not part of the id
    if ".." in name or not _REPO_ID_RE.match(name):
        return None
    return name


def _hub_dataset_id(name: str | None) -> str | None:
    """A dataset name usable in ``datasets:`` metadata: ``org/name`` or a legacy bare name, not a local path."""
    if not name or name in _LOCAL_DATASETS or os.path.exists(name):
        return None
    if ".." in name:
        return None
    return name if (_REPO_ID_RE.match(name) or _BARE_NAME_RE.match(name)) else None


def template_path() -> str:
    """The card template: packaged ``hf_distill/templates/`` first, else ``<repo>/model_cards/``."""
    try:
        resource = importlib.resources.files("hf_distill").joinpath("templates", TEMPLATE_NAME)
        if resource.is_file():
            return str(resource)
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    path = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {TEMPLATE_NAME} not found (looked in hf_distill/templates and {path.parent})"
        )
    return str(path)


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a distilled model depends on (missing ones are left out)."""
    versions = {}
    for label, dists in (
        ("hf_distill", ("hf_distill", "hf-distill")),
        ("torch", ("torch",)),
        ("timm", ("timm",)),
        ("transformers", ("transformers",)),
        ("accelerate", ("accelerate",)),
        ("datasets", ("datasets",)),
        ("huggingface_hub", ("huggingface_hub", "huggingface-hub")),
    ):
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if "hf_distill" not in versions:
        try:
            from . import __version__

            versions["hf_distill"] = __version__
        except ImportError:  # pragma: no cover
            pass
    return versions


def measure_latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    repeats: int = 5,
) -> float:
    """Median forward time in milliseconds per image (eval mode, no grad, one warm-up run).

    ``example`` is a batch (or one image without the batch dimension); it is moved to the
    model's device. ``call(model, x)`` defaults to :func:`hf_distill.models.call_model`.
    The model's train/eval mode is restored afterwards.
    """
    if call is None:
        from .models import call_model as call
    if example.dim() == 3:
        example = example.unsqueeze(0)
    param = next(iter(model.parameters()), None)
    if param is not None:
        example = example.to(param.device)
    batch = max(int(example.shape[0]), 1)
    cuda = example.is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize(example.device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example)  # warm-up (lazy init, cudnn autotune, caches)
            sync()
            times = []
            for _ in range(max(int(repeats), 1)):
                start = time.perf_counter()
                call(model, example)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return max(statistics.median(times) * 1000.0 / batch, 1e-6)


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
    from .methods import METHODS, DistillationMethod

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
    from .models import short_name

    return short_name(name)


# ---------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------


def _dataset_type(ctx: CardContext, dataset_id: str | None) -> str:
    """model-index ``dataset.type``: the Hub id, else what the data is (never a local path)."""
    if dataset_id:
        return dataset_id
    name = str(ctx.dataset)
    return "imagefolder" if os.path.exists(name) or os.sep in name or name.startswith(("~", ".")) else name


def _card_data(ctx: CardContext, teachers_hub: list[str], dataset_id: str | None, model_name: str) -> ModelCardData:
    library = ctx.library_name if ctx.library_name in ("timm", "transformers") else "pytorch"
    tags = ["knowledge-distillation", ctx.method, ctx.task]
    if ctx.library_name == "timm":
        tags.append("timm")
    tags.append("hf-distill")
    license_, license_name = None, None
    if ctx.license:
        lic = ctx.license.strip().lower()
        if lic in _HUB_LICENSES:
            license_ = lic
        else:
            license_, license_name = "other", re.sub(r"[^a-z0-9.-]+", "-", lic).strip("-") or "other"
    eval_results = None
    features = ctx.task != "image-classification"
    acc = ctx.metrics.get("knn_accuracy" if features else "accuracy")
    if ctx.dataset and isinstance(acc, (int, float)) and not math.isnan(float(acc)):
        eval_results = [
            EvalResult(
                task_type=ctx.task,
                task_name="Image Feature Extraction" if features else "Image Classification",
                dataset_type=_dataset_type(ctx, dataset_id),
                dataset_name=_dataset_label(ctx.dataset),
                dataset_split=ctx.eval_split,
                metric_type="accuracy",
                metric_name="k-NN top-1 accuracy (k=20)" if features else "Top-1 accuracy",
                metric_value=float(acc),
            )
        ]
    extra = {"license_name": license_name} if license_name else {}
    return ModelCardData(
        library_name=library,
        base_model=(teachers_hub[0] if len(teachers_hub) == 1 else teachers_hub) or None,
        datasets=[dataset_id] if dataset_id else None,
        license=license_,
        tags=tags,
        pipeline_tag=ctx.task,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        **extra,
    )


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


def _usage(ctx: CardContext) -> tuple[str, str, str, str]:
    """(intro, code, extra intro, extra code) for the student's library."""
    repo = ctx.repo_id
    mode = "L" if ctx.in_chans == 1 else "RGB"
    if ctx.task != "image-classification" and ctx.library_name in ("timm", "transformers"):
        return _feature_usage(ctx, repo, mode)
    if ctx.library_name == "timm":
        ref = f"hf-hub:{repo}" if repo else "local-dir:/path/to/this/folder"
        intro = ("Load the student with [timm](https://github.com/huggingface/pytorch-image-models)"
                 + ("" if repo else " from the folder that holds this card") + ":")
        code = f"""import timm
import torch
from PIL import Image

model = timm.create_model("{ref}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)

image = Image.open("image.jpg").convert("{mode}")
with torch.no_grad():
    probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)
labels = model.pretrained_cfg.get("label_names")
top = probabilities.topk(min(5, probabilities.shape[-1]))
for p, i in zip(top.values[0].tolist(), top.indices[0].tolist()):
    print(labels[i] if labels else i, round(p, 4))"""
        return intro, code, "", ""
    if ctx.library_name == "transformers":
        ref = repo or "/path/to/this/folder"
        where = "" if repo else " (from the folder that holds this card)"
        intro = "With the 🤗 Transformers pipeline" + where + ":"
        code = f"""from transformers import pipeline

classifier = pipeline("image-classification", model="{ref}")
print(classifier("image.jpg"))"""
        extra = f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{ref}")
model = AutoModelForImageClassification.from_pretrained("{ref}").eval()

image = Image.open("image.jpg").convert("{mode}")
with torch.no_grad():
    logits = model(**processor(images=image, return_tensors="pt")).logits
print(model.config.id2label[logits.argmax(-1).item()])"""
        if ctx.in_chans == 1:
            # pipeline("image-classification") converts every image to RGB: a 1-channel model cannot take it
            return ("With the model class" + where + " (this is a 1-channel model: the image-classification "
                    "pipeline always feeds RGB images, so it cannot run it):"), extra, "", ""
        return intro, code, "Or with the model class directly:", extra
    # plain torch module: the weights only
    fetch = (f'from huggingface_hub import hf_hub_download\n\nweights = hf_hub_download("{repo}", "model.safetensors")'
             if repo else 'weights = "/path/to/this/folder/model.safetensors"')
    size = ctx.image_size or (224, 224)
    intro = ("The student is a plain PyTorch module: build the same architecture "
             f"(`{ctx.student_name}`), then load the weights:")
    code = f"""import torch
from safetensors.torch import load_file
{fetch}

model = ...  # the student architecture, `{ctx.student_name}`
model.load_state_dict(load_file(weights))
model.eval()
with torch.no_grad():
    logits = model(torch.randn(1, {ctx.in_chans}, {size[0]}, {size[1]}))"""
    return intro, code, "", ""


def _feature_usage(ctx: CardContext, repo: str | None, mode: str) -> tuple[str, str, str, str]:
    """Usage of a feature-distilled backbone: its embedding and its feature map."""
    if ctx.library_name == "timm":
        ref = f"hf-hub:{repo}" if repo else "local-dir:/path/to/this/folder"
        code = f"""import timm
import torch
from PIL import Image

model = timm.create_model("{ref}", pretrained=True).eval()  # a backbone: no classifier
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)

x = transform(Image.open("image.jpg").convert("{mode}")).unsqueeze(0)
with torch.no_grad():
    feature_map = model.forward_features(x)                  # spatial features
    embedding = model.forward_head(feature_map, pre_logits=True)  # one vector per image
print(embedding.shape, feature_map.shape)"""
        return "Load the student backbone with timm:", code, "", ""
    ref = repo or "/path/to/this/folder"
    code = f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{ref}")
model = AutoModel.from_pretrained("{ref}").eval()  # the student backbone

inputs = processor(images=Image.open("image.jpg").convert("{mode}"), return_tensors="pt")
with torch.no_grad():
    features = model(**inputs).last_hidden_state
print(features.shape)"""
    return "Load the student backbone with 🤗 Transformers:", code, "", ""


def build_model_card(ctx: CardContext) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for a distilled student (tokens scrubbed)."""
    # tolerate Trainer-style metric names ("eval_accuracy")
    ctx = replace(ctx, metrics={(k[5:] if k.startswith("eval_") else k): v for k, v in ctx.metrics.items()})
    teachers_hub = [r for r in (hub_repo_id(t) for t in ctx.teacher_names) if r]
    teachers_hub = list(dict.fromkeys(teachers_hub))
    dataset_id = _hub_dataset_id(ctx.dataset)
    model_name = (ctx.repo_id.split("/")[-1] if ctx.repo_id else ctx.student_name.split("/")[-1].split(":")[-1])
    display, description, paper, kinds = _method_info(ctx)
    method_cell = f"[{display}]({paper[1]})" if paper else display
    dataset_cell = _link(ctx.dataset) if dataset_id and "/" in dataset_id else f"`{_dataset_label(ctx.dataset or '')}`"

    if len(ctx.teacher_names) == 1:
        teachers_text = _link(ctx.teacher_names[0])
    elif ctx.teacher_names:
        teachers_text = "an ensemble of " + ", ".join(_link(t) for t in ctx.teacher_names)
    else:
        teachers_text = ""
    if ctx.method == "supervised":
        summary = f"`{ctx.student_name}` ({ctx.library_name}) trained on the labels only, as a baseline"
    elif teachers_text:
        summary = f"`{ctx.student_name}` ({ctx.library_name}) distilled from {teachers_text} with **{method_cell}**"
    else:
        summary = f"`{ctx.student_name}` ({ctx.library_name}) trained with **{method_cell}**"
    if ctx.dataset:
        summary += f" on {dataset_cell}"
    summary += "."
    if ctx.teacher_cache:
        summary += f" The teacher's outputs were read from a cache: {ctx.teacher_cache}."
    if paper:
        summary += f" Method paper: [{paper[0]}]({paper[1]})."

    result_tables, result_lines, other_metrics = _results(ctx, kinds)
    size_rows, size_lines = _size(ctx)
    usage_intro, usage_code, usage_extra_intro, usage_extra = _usage(ctx)
    teacher_rows = []
    for i, name in enumerate(ctx.teacher_names):
        label = f"Teacher {i + 1}" if len(ctx.teacher_names) > 1 else "Teacher"
        teacher_rows.append((label, _link(name)))
    if ctx.teacher_cache:
        teacher_rows.append(("Teacher outputs", f"read from a cache ({ctx.teacher_cache})"))
    student_cell = f"`{ctx.student_name}` ({ctx.library_name}, {_fmt_params(ctx.student_params)} parameters"
    if ctx.image_size:
        student_cell += f", input {ctx.in_chans}x{ctx.image_size[0]}x{ctx.image_size[1]}"
    student_cell += ")"
    training = _safe_items(ctx.training)
    card = {
        "title": (ctx.repo_id or ctx.student_name) + (f": {display}" if ctx.method != "supervised" else ""),
        "summary": summary,
        "student_cell": student_cell,
        "teacher_rows": teacher_rows,
        "method_cell": method_cell,
        "method_description": description,
        "dataset": ctx.dataset,
        "dataset_cell": dataset_cell,
        "eval_set": _eval_set(ctx, dataset_cell),
        "hyperparameters": _safe_items(ctx.hyperparameters),
        "result_tables": result_tables,
        "result_lines": result_lines,
        "other_metrics": other_metrics,
        "size_rows": size_rows,
        "size_lines": size_lines,
        "usage_intro": usage_intro,
        "usage_code": usage_code,
        "usage_extra_intro": usage_extra_intro,
        "usage_extra": usage_extra,
        "training": training,
        "notes": [(str(k), _fmt(v)) for k, v in ctx.notes.items()],
        "label_names": [str(n) for n in ctx.label_names] if ctx.label_names else None,
        "versions": sorted(framework_versions().items()),
    }
    card_data = _card_data(ctx, teachers_hub, dataset_id, model_name)
    rendered = ModelCard.from_template(card_data, template_path=template_path(), card=card)
    return ModelCard(scrub_secrets(str(rendered)))


def _eval_set(ctx: CardContext, dataset_cell: str) -> str:
    """``the `test` split of `cifar10` (10,000 images); each image resized to ...``: what was evaluated, and how."""
    of = f" of {dataset_cell}" if ctx.dataset else ""
    size = f" ({ctx.eval_size:,} images)" if ctx.eval_size else ""
    if ctx.eval_split and ctx.eval_held_out:
        text = f"a held-out part of the `{ctx.eval_split}` split{of}{size}, not trained on"
    elif ctx.eval_split:
        text = f"the `{ctx.eval_split}` split{of}{size}"
    else:
        text = f"an evaluation set{of}{size}"
    if ctx.preprocessing:
        text += f"; {ctx.preprocessing}, as the exported model's own preprocessing does"
    return text


def _unwrapped(dataset):
    """The dataset :func:`hf_distill.data.with_image_transform` made, through the wrappers mixing puts around it."""
    for _ in range(3):
        if dataset is None or hasattr(dataset, "hf_distill_images") or not hasattr(dataset, "dataset"):
            break
        dataset = dataset.dataset
    return dataset


def run_record(trainer) -> dict[str, Any]:
    """What a :class:`~hf_distill.DistillationTrainer` run adds to its card besides its arguments and metrics:
    the method's own declarations, the evaluation split and size, how student and teacher were measured,
    the training augmentation and where cached teacher outputs came from (CardContext fields)."""
    from .preprocessing import describe, fed_as_own, raw_images_of

    method, metrics = trainer.method, trainer.model_card_metrics()
    record: dict[str, Any] = {"method_title": method.title or None, "method_description": method.description or None,
                              "metric_kinds": dict(method.metric_kinds),
                              "teacher_keys": dict(getattr(method, "teacher_display", {}) or {})}
    evaluation = trainer.eval_dataset
    train = _unwrapped(trainer.train_dataset)
    if evaluation is not None and not isinstance(evaluation, dict):
        split = trainer.card_info.get("eval_split") or getattr(evaluation, "split", None)
        raw = raw_images_of(evaluation)
        if split is None and raw is not None:
            split = getattr(raw.dataset, "split", None)
        record["eval_split"] = str(split) if split else None
        train_split = getattr(getattr(train, "hf_distill_images", None), "dataset", train)
        train_split = getattr(train_split, "split", None)
        # train_test_split keeps the parent's split name: an evaluation "train" split is a held-out part of it
        record["eval_held_out"] = bool(split) and train_split is not None and str(split) == str(train_split)
        record["eval_size"] = len(evaluation) if hasattr(evaluation, "__len__") else None
        if raw is not None:
            record["preprocessing"] = describe(trainer.student_spec)
        teachers = list(trainer.teachers.models)
        if "teacher_accuracy_student_input" in metrics:
            record["teacher_measurement"] = (
                "The teacher's accuracy is measured on the same raw images with its own preprocessing (as its own "
                "library loads it); \"fed the student's input\" is what it scores on the student's evaluation "
                "batches, re-normalised for it: the input it taught from.")
        elif teachers and raw is not None and all(fed_as_own(t, trainer.student_spec) for t in teachers):
            record["teacher_measurement"] = ("The teacher's accuracy is measured on the student's evaluation batches, "
                                             "which are its own preprocessing.")
        elif teachers:
            record["teacher_measurement"] = (
                "The teacher's accuracy is measured on the student's evaluation batches, re-normalised for it (the "
                "raw images were not known to the trainer, so its own preprocessing could not be applied).")
    extra = {}
    cache = trainer.teacher_cache
    augmentation = getattr(train, "hf_distill_augmentation", None)
    if cache is not None:
        augmentation = cache.augmentation
        origin = ", ".join(f"`{n}`" for n in cache.config.get("teacher_id") or []) or "its teacher"
        views = f"{cache.stored_epochs} stored epoch{'s' if cache.stored_epochs != 1 else ''} of views"
        record["teacher_cache"] = (f"`{os.path.basename(os.path.normpath(cache.cache_dir))}`, built from {origin}: "
                                   f"{'top-' + str(cache.top_k) + ' logits' if cache.top_k else 'full outputs'}, "
                                   f"{views} ({'no' if cache.augmentation == 'none' else cache.augmentation} "
                                   "augmentation)"
                                   + (", mixed images" if cache.mixed else ""))
        extra["teacher_outputs"] = "cached (" + record["teacher_cache"] + ")"
    if augmentation is not None:
        extra["train_augmentation"] = augmentation
    record["hyperparameters"] = {**method.hyperparameters(), **extra}
    return record
