"""What a run's model card reports, gathered from the trainer: the run record, metrics, timing."""

from __future__ import annotations

import torch

from ..models.features import backbone_features
from ..cards import CardContext, measure_latency_ms, run_record
from ..models import count_parameters, display_name, forward_images, label_names_of, model_family, short_name


def card_context(trainer, **overrides) -> CardContext:
    """Everything the generated model card reports, from this run of ``trainer``."""
    student, args = trainer.student, trainer.args
    spec = trainer.student_spec
    metrics = card_metrics(trainer.state)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    world = trainer.accelerator.num_processes
    training = {
        "epochs": round(float(trainer.state.epoch or 0.0), 3),  # as trained, not as asked (0 when untrained)
        "steps": trainer.state.global_step,
        "train_batch_size": args.per_device_train_batch_size * world * args.gradient_accumulation_steps,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "precision": precision,
        "num_processes": world,
        "seed": args.seed,
    }
    if args.label_smoothing_factor:
        training["label_smoothing"] = args.label_smoothing_factor
    if getattr(student, "hf_distill_init", None):
        training["initialisation"] = student.hf_distill_init
    teacher_names = [display_name(t) for t in trainer.teachers.models]
    if not teacher_names and trainer.teacher_cache is not None:  # trained from cached outputs: name their teacher
        teacher_names = [short_name(n) for n in trainer.teacher_cache.config.get("teacher_id") or []]
    ctx = CardContext(
        student_name=display_name(student),
        library_name=model_family(student),
        student_params=count_parameters(student),
        method=args.distill_method,
        teacher_names=teacher_names,
        teacher_params=[count_parameters(t) for t in trainer.teachers.models],
        method_paper=trainer.method.paper,
        metrics=metrics,
        dataset=trainer.card_info.get("dataset"),
        license=trainer.card_info.get("license"),
        training=training,
        timing=timing(trainer),
        label_names=label_names_of(student),
        repo_id=args.hub_model_id if args.push_to_hub else trainer.card_info.get("repo_id"),
        image_size=tuple(spec.image_size),
        in_chans=spec.in_chans,
        notes={**trainer.method.card_notes(), **trainer.card_info.get("notes", {})},
        task="image-classification" if trainer.method.student_output == "logits" else "image-feature-extraction",
        **run_record(trainer),
    )
    for key, value in overrides.items():
        setattr(ctx, key, value)
    return ctx

def card_metrics(state) -> dict[str, float]:
    """The last evaluation's metrics (without ``eval_``), as the card reports them."""
    metrics = {}
    for entry in state.log_history:
        for key, value in entry.items():
            if key.startswith("eval_") and isinstance(value, (int, float)) and not key.endswith(
                    ("_runtime", "_per_second", "_loss", "_preparation_time")):
                metrics[key[len("eval_"):]] = float(value)
    return metrics


def timing(trainer) -> dict:
    """Inference time of student and teachers, measured once per run on this machine."""
    if trainer._timing_cache is None:
        spec = trainer.student_spec
        device = next(trainer.student.parameters()).device
        x = torch.zeros(8, spec.in_chans, *spec.image_size, device=device)
        # each model run as training runs it: a classifier's forward, or a backbone's features (a CLIPModel's
        # plain forward would want text too)
        call = backbone_features if trainer.method.student_output == "features" else forward_images
        measured = {"student_ms_per_image": measure_latency_ms(trainer.student, x, call=call), "batch_size": 8,
                    "device": str(device), "image_size": f"{spec.image_size[0]}x{spec.image_size[1]}"}
        if len(trainer.teachers) and not trainer.teachers.sharded:  # a sharded forward needs every process
            # each teacher as training runs it: through its input adapter, in its own dtype
            measured["teacher_ms_per_image"] = sum(
                measure_latency_ms(t, trainer.teachers.prepare_input(i, x), call=call)
                for i, t in enumerate(trainer.teachers.models))
        trainer._timing_cache = measured
    return trainer._timing_cache
