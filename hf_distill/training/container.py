"""``DistillationModel``: what the Trainer optimises — the student plus the method's extra trainable modules."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..models.features import backbone_features, feature_shapes
from ..models import call_model, distillation_heads, is_transformers_model
from ..models.taps import FeatureTaps, probe_features


class DistillationModel(nn.Module):
    """The student plus the method's extra trainable modules (regressors, exits, branches).

    This is what the Trainer optimises, wraps for data parallel and checkpoints, so the extra
    modules are trained, gradient-synced and resumed exactly like the student. Only
    ``student`` is exported.
    """

    # The Trainer reads ``model.config`` (label smoothing, use_cache); the container has none of its own.
    config = None

    def __init__(self, student: nn.Module, extras: nn.ModuleDict, method, layers: Sequence[str] = (),
                 probe: dict | None = None):
        super().__init__()
        self.student = student
        self.extras = extras
        self._method = method  # plain attributes: not modules, not saved
        self._taps = FeatureTaps(student, layers) if layers else None
        if self._taps is not None and probe and probe.get("student"):
            # known layouts: no recompile after a first compiled step
            self._taps.set_layouts({name: layout for name, (_, layout) in probe["student"].items()})
        self._heads = distillation_heads(student)  # a DeiT-style student: class and distillation heads

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """``--gradient_checkpointing`` / ``--activation_checkpointing``: recompute the student's
        activations in the backward pass (timm ``set_grad_checkpointing``, transformers'
        ``gradient_checkpointing_enable``). Teachers keep no activations anyway (no autograd)."""
        student = self.student
        if is_transformers_model(student):
            if not getattr(student, "supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing: {type(student).__name__} does not support it")
            if hasattr(student, "activation_checkpointing_enable"):
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                        every_n_layers=every_n_layers, offload=offload)
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        elif hasattr(student, "set_grad_checkpointing"):  # timm
            if activation_checkpointing_kwargs or every_n_layers != 1 or offload:
                raise ValueError("gradient_checkpointing_kwargs: timm students take no options "
                                 "(timm's set_grad_checkpointing checkpoints every block)")
            student.set_grad_checkpointing(True)
        else:
            raise ValueError(f"gradient_checkpointing: the student ({type(student).__name__}) is neither a timm nor a "
                             "transformers model, so it has no checkpointing switch; wrap its blocks in "
                             "torch.utils.checkpoint yourself")

    gradient_checkpointing_enable = activation_checkpointing_enable

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, features_only: bool = False,
                extras: bool = True) -> dict[str, Any]:
        """``features_only``: run the student only up to its last tapped layer (logits None); ``extras``: run the
        method's extra modules (a stage whose loss has no term for them skips them)."""
        weight = next(self.student.parameters(), None)
        if weight is not None and weight.is_floating_point() and pixel_values.dtype != weight.dtype:
            pixel_values = pixel_values.to(weight.dtype)  # --bf16_full_eval / --fp16_full_eval cast the student
        heads = {}
        if self._method.student_output == "features":  # backbone features, no class logits
            summary, spatial = backbone_features(self.student, pixel_values)
            logits, features = None, {"summary": summary, "spatial": spatial}
        elif features_only and self._taps is not None:
            logits, features = None, self._taps.run_until_complete(call_model, self.student, pixel_values)
        else:
            if self._heads is not None:
                # training: the class head learns the labels, the distillation head the teacher; evaluation
                # and export predict with their mean, as timm and transformers do
                cls, dist = self._heads(pixel_values)
                logits = cls if self.training else (cls + dist) / 2
                heads = {"cls_head": cls, "dist_head": dist}
            else:
                logits = call_model(self.student, pixel_values)
            features = self._taps.pop() if self._taps is not None else {}
        extra = self._method.forward_modules(self.extras, features) if extras and len(self.extras) else {}
        return {"logits": logits, "features": features, "extra": extra, "heads": heads}


def probe_shapes(method, student: nn.Module, teachers, cache, spec) -> dict:
    """Shapes and layouts of the tapped layers (or the backbone features' widths) that the method's extra modules
    are built from, from one dry forward of each model at the student's input size."""
    layers = method.layers()
    example = torch.zeros(2, spec.in_chans, *spec.image_size)
    if method.student_output == "features":
        teacher_widths = [feature_shapes(t, teachers.prepare_input(i, example))[:2]
                          for i, t in enumerate(teachers.models)]
        if not teacher_widths and cache is not None:  # trained from a feature cache alone
            teacher_widths = [(s.get("summary", [0])[0], s.get("spatial", [0])[0]) for s in cache.feature_shapes]
        return {"student_features": feature_shapes(student, example)[:2], "teacher_features": teacher_widths}
    if not (layers.student or layers.teacher):
        return {}
    probe = {"student": probe_features(student, list(layers.student), example), "teacher": {}}
    if layers.teacher and len(teachers):
        probe["teacher"] = probe_features(teachers.models[0], list(layers.teacher), teachers.adapters[0](example))
        teachers.pop_features()  # the probe's features must not reach the first step
    return probe
