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

# (display name, one-line description, paper) for the methods hf_distill ships; a method's own
# ``paper`` attribute (hf_distill.methods) or CardContext.method_paper take precedence.
_METHOD_INFO: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    "kd": (
        "Knowledge distillation (KD)",
        "The student learns to match the teacher's temperature-softened class probabilities (a KL-divergence "
        "term) together with the usual cross-entropy on the ground-truth labels.",
        ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "https://arxiv.org/abs/1503.02531"),
    ),
    "fitnets": (
        "FitNets (hint-based distillation)",
        "The student first learns to regress the teacher's intermediate feature maps (hints) through a small "
        "regressor, then is distilled on the teacher's soft targets.",
        ("FitNets: Hints for Thin Deep Nets (Romero et al., 2015)", "https://arxiv.org/abs/1412.6550"),
    ),
    "byot": (
        "Be Your Own Teacher (self-distillation)",
        "Self-distillation: shallow classifiers attached to intermediate stages learn from the network's deepest "
        "classifier (soft targets and features), so the network is its own teacher; every exit can be used "
        "on its own for faster inference.",
        ("Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation "
         "(Zhang et al., 2019)", "https://arxiv.org/abs/1905.08094"),
    ),
    "sftn": (
        "Student-Friendly Teacher Networks (SFTN)",
        "The teacher is first trained together with student branches so that its knowledge is easy for the "
        "student to absorb, then distilled into the student.",
        ("Learning Student-Friendly Teacher Networks for Knowledge Distillation (Park et al., 2021)",
         "https://arxiv.org/abs/2102.07650"),
    ),
    "noisy_teacher": (
        "Noisy teacher distillation",
        "The teacher's logits are perturbed with random noise during distillation, a regulariser that simulates "
        "learning from several teachers.",
        ("Deep Model Compression: Distilling Knowledge from Noisy Teachers (Sau & Balasubramanian, 2016)",
         "https://arxiv.org/abs/1610.09650"),
    ),
    "supervised": (
        "Supervised training (no teacher)",
        "Trained on the ground-truth labels only, without a teacher: a baseline for the distilled students.",
        None,
    ),
}

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


def _method_info(method: str, paper: tuple[str, str] | None) -> tuple[str, str, tuple[str, str] | None]:
    display, description, default_paper = _METHOD_INFO.get(
        method, (method, f"Distilled with the `{method}` method of hf_distill.", None)
    )
    if paper is None:
        try:
            from .methods import METHODS

            paper = getattr(METHODS.get(method), "paper", None)
        except Exception:  # the registry is optional here
            paper = None
    return display, description, paper or default_paper


# ---------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------


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
                dataset_type=dataset_id or ctx.dataset,
                dataset_name=ctx.dataset,
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


def _results(ctx: CardContext, teacher_label: str) -> tuple[list, list, list]:
    m = dict(ctx.metrics)
    rows, lines = [], []
    student = m.pop("accuracy", None)
    if student is not None:
        rows.append((f"**Student** (`{ctx.student_name}`)", f"**{_fmt_acc(student)}**"))
    teacher_keys = sorted(k for k in m if re.fullmatch(r"teacher\d*_accuracy", k))
    for k in teacher_keys:
        idx = k[len("teacher"):-len("_accuracy")]
        name = teacher_label
        if idx and idx.isdigit() and int(idx) < len(ctx.teacher_names):
            name = f"Teacher {int(idx) + 1} (`{ctx.teacher_names[int(idx)]}`)"
        rows.append((name, _fmt_acc(m.pop(k))))
    for k in sorted((k for k in m if re.fullmatch(r"exit\d+_accuracy", k)), key=lambda k: int(k[4:-9])):
        rows.append((f"Exit {int(k[4:-9])} (early-exit classifier)", _fmt_acc(m.pop(k))))
    if "ensemble_accuracy" in m:
        rows.append(("Ensemble of all exits", _fmt_acc(m.pop("ensemble_accuracy"))))
    if "knn_accuracy" in m:
        rows.append((f"**Student** (`{ctx.student_name}`), k-NN top-1 (k=20) of its features",
                     f"**{_fmt_acc(m.pop('knn_accuracy'))}**"))
    for k in sorted(k for k in m if k.startswith("teacher_knn_accuracy")):
        suffix = k[len("teacher_knn_accuracy"):].lstrip("_")
        rows.append((f"{teacher_label if not suffix else f'Teacher `{suffix}`'}, k-NN top-1 of its features",
                     _fmt_acc(m.pop(k))))
    for k in sorted(k for k in m if k.startswith("feature_cosine")):
        what = k[len("feature_cosine"):].lstrip("_").replace("_", " ") or "all teachers and targets"
        rows.append((f"Cosine to the teacher's features ({what})", f"{float(m.pop(k)):.4f}"))
    teacher = ctx.metrics.get("teacher_accuracy")
    if isinstance(student, (int, float)) and isinstance(teacher, (int, float)):
        gap = (float(student) - float(teacher)) * (100 if 0 <= student <= 1 and 0 <= teacher <= 1 else 1)
        lines.append(f"The student is {abs(gap):.2f} points {'above' if gap >= 0 else 'below'} the teacher "
                     f"({_fmt_acc(student)} vs {_fmt_acc(teacher)}).")
    other = [(k, _fmt(v)) for k, v in m.items()]
    return rows, lines, other


def _size(ctx: CardContext) -> tuple[list, list]:
    t = dict(ctx.timing)
    s_ms, t_ms = t.pop("student_ms_per_image", None), t.pop("teacher_ms_per_image", None)
    rows = [(f"Student (`{ctx.student_name}`)", _fmt_params(ctx.student_params), _fmt_ms(s_ms))]
    teacher_total = sum(p for p in ctx.teacher_params if p) if ctx.teacher_params else 0
    n = len(ctx.teacher_names)
    for i, name in enumerate(ctx.teacher_names):
        params = ctx.teacher_params[i] if i < len(ctx.teacher_params) else None
        rows.append((f"Teacher{f' {i + 1}' if n > 1 else ''} (`{name}`)", _fmt_params(params),
                     _fmt_ms(t_ms) if n == 1 else "-"))
    if n > 1:
        rows.append(("Teachers (all)", _fmt_params(teacher_total), _fmt_ms(t_ms)))
    elif n == 0 and t_ms is not None:
        rows.append(("Teacher", _fmt_params(teacher_total or None), _fmt_ms(t_ms)))
    lines = []
    if teacher_total and ctx.student_params:
        lines.append(f"**Compression:** the student has {teacher_total / ctx.student_params:.2f}x fewer parameters "
                     f"than the teacher{'s' if n > 1 else ''}.")
    try:
        speedup = float(t_ms) / float(s_ms)
        lines.append(f"**Speed-up:** {speedup:.2f}x faster inference than the teacher{'s' if n > 1 else ''}.")
    except (TypeError, ValueError, ZeroDivisionError):
        pass
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
    display, description, paper = _method_info(ctx.method, ctx.method_paper)
    method_cell = f"[{display}]({paper[1]})" if paper else display

    if len(ctx.teacher_names) == 1:
        teacher_label = f"Teacher (`{ctx.teacher_names[0]}`)"
        teachers_text = _link(ctx.teacher_names[0])
    elif ctx.teacher_names:
        teacher_label = "Teachers (ensemble)"
        teachers_text = "an ensemble of " + ", ".join(_link(t) for t in ctx.teacher_names)
    else:
        teacher_label, teachers_text = "Teacher", ""
    if ctx.method == "supervised":
        summary = f"`{ctx.student_name}` ({ctx.library_name}) trained on the labels only, as a baseline"
    elif teachers_text:
        summary = f"`{ctx.student_name}` ({ctx.library_name}) distilled from {teachers_text} with **{method_cell}**"
    else:
        summary = f"`{ctx.student_name}` ({ctx.library_name}) trained with **{method_cell}**"
    if ctx.dataset:
        summary += f" on {_link(ctx.dataset) if dataset_id and '/' in dataset_id else f'`{ctx.dataset}`'}"
    summary += "."
    if paper:
        summary += f" Method paper: [{paper[0]}]({paper[1]})."

    result_rows, result_lines, other_metrics = _results(ctx, teacher_label)
    size_rows, size_lines = _size(ctx)
    usage_intro, usage_code, usage_extra_intro, usage_extra = _usage(ctx)
    teacher_rows = []
    for i, name in enumerate(ctx.teacher_names):
        label = f"Teacher {i + 1}" if len(ctx.teacher_names) > 1 else "Teacher"
        teacher_rows.append((label, _link(name)))
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
        "dataset_cell": _link(ctx.dataset) if dataset_id and "/" in dataset_id else f"`{ctx.dataset}`",
        "eval_set": f"the evaluation split of `{ctx.dataset}`" if ctx.dataset else "the evaluation set",
        "hyperparameters": _safe_items(ctx.hyperparameters),
        "result_rows": result_rows,
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
