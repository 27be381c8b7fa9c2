"""The card itself: Hub metadata (model-index, tags, licence) and the rendered template
(:func:`build_model_card`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .context import _HUB_LICENSES, CardContext, _hub_dataset_id, framework_versions, hub_repo_id, scrub_secrets, \
    template_path
from .tables import _dataset_label, _fmt, _fmt_params, _link, _method_info, _results, _safe_items, _size
from .usage import _usage


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
