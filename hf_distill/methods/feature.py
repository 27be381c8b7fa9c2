"""Label-free feature distillation from foundation-model teachers (RADIO-style). See docs/methods.md.

The student's backbone features (:func:`hf_distill.models.features.backbone_features`: a summary vector
and a spatial map) go through one trainable adaptor per teacher and target; each prediction is
compared with that teacher's feature, standardised per channel with statistics from the first
batches so that no teacher dominates:

    summary:  1 - cos(a(s), t)
    spatial:  the student's map resized to the teacher's grid, then per location
              0.9 * (1 - cos) + 0.1 * smooth_L1, averaged over locations
    L = sum over teachers w_t * (feature_summary_weight * summary + feature_spatial_weight * spatial)

No labels are used anywhere; evaluation reports the cosine to each teacher and, with a labelled
split, DINO's k-NN accuracy of student and teachers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..models.features import (
    FeatureAdaptor,
    RunningStandardizer,
    per_sample_cosine,
    spatial_loss,
    summary_loss,
    targets_of,
)
from ..teachers.ensemble import teacher_keys
from .base import DistillationMethod, Stage, StepOutputs


@dataclass
class FeatureArguments:
    feature_targets: Optional[list[str]] = field(
        default=None, metadata={"help": "feature: which teacher features to learn, `summary` (class token / pooled "
                                        "output) and/or `spatial` (patch tokens on their grid, or a CNN map). "
                                        "Default: both."})
    feature_teacher_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "feature: one weight per teacher (default 1 each)."})
    feature_summary_weight: float = field(default=1.0, metadata={"help": "feature: weight of the summary terms (1)."})
    feature_spatial_weight: float = field(default=1.0, metadata={"help": "feature: weight of the spatial terms (1)."})
    feature_standardize_batches: int = field(
        default=10, metadata={"help": "feature: each teacher's features are standardised per channel with a mean and "
                                      "std estimated on the first N training batches, then fixed and kept in "
                                      "checkpoints (10; 0 turns standardisation off)."})
    feature_adaptor_mult: int = field(
        default=4, metadata={"help": "feature: hidden width of each adaptor MLP, as a multiple of the student's "
                                     "feature width (4)."})
    feature_export_adaptors: bool = field(
        default=False, metadata={"help": "feature: save_model also writes the adaptors and the standardisation, so "
                                         "hf_distill.models.features.FeatureStudent.from_pretrained(OUT) gives features in "
                                         "each teacher's space. Default: the student backbone only."})


class FeatureDistillation(DistillationMethod):
    name = "feature"
    arguments = FeatureArguments
    student_output = "features"
    teacher_output = "features"
    uses_alpha = False
    search_space = {"feature_spatial_weight": {"low": 0.25, "high": 4.0, "log": True}}
    alpha_instead = "its terms are weighed by feature_summary_weight, feature_spatial_weight and " \
                    "feature_teacher_weights"
    standardizes_logits = False
    paper = ("AM-RADIO: Agglomerative Vision Foundation Model - Reduce All Domains Into One (Ranzinger et al., "
             "CVPR 2024)", "https://arxiv.org/abs/2312.06709")
    title = "Label-free feature distillation (RADIO-style)"
    description = ("The student backbone learns to reproduce the teachers' features (summary vector and/or spatial "
                   "map) through small trained adaptors, without labels; the export is the backbone.")
    metric_kinds = {r"feature_cosine(_.+)?": "cosine", r"(teacher_)?knn_accuracy(_.+)?": "knn"}

    def __init__(self, args):
        super().__init__(args)
        self.targets = targets_of(args.feature_targets) if args.distill_method == self.name else []
        self.keys: list[str] = []
        self._cached_teachers: list[str] = []  # the teachers of a feature cache, when no teacher is loaded

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        targets_of(args.feature_targets)
        if min(args.feature_summary_weight, args.feature_spatial_weight) < 0 or args.feature_standardize_batches < 0:
            raise ValueError("feature_summary_weight, feature_spatial_weight and feature_standardize_batches must be "
                             ">= 0")
        if args.feature_teacher_weights is not None and len(args.feature_teacher_weights) != len(args.teacher_names) \
                and args.teacher_names:
            raise ValueError(f"feature_teacher_weights has {len(args.feature_teacher_weights)} values for "
                             f"{len(args.teacher_names)} teachers")
        if args.distill_loss != "kl" or args.teacher_noise_std:
            raise ValueError("distill_method='feature' learns features: distill_loss and teacher noise do not apply")

    def stage(self, progress):
        return Stage(labels=False)

    def check_teacher_cache(self, cache) -> None:
        """A feature cache must hold every target this run learns; its teachers name the terms when no teacher
        is loaded."""
        missing = [t for t in self.targets if t not in cache.feature_targets]
        if missing:
            raise ValueError(f"the feature cache in {cache.cache_dir} holds {cache.feature_targets}, not {missing}: "
                             f"rebuild it with those targets, or train on feature_targets={cache.feature_targets}")
        self._cached_teachers = list(cache.config["teacher_id"])

    def setup(self, student, teachers) -> None:
        from ..models import display_name, short_name

        best = str(self.args.metric_for_best_model or "")
        if not teachers and best.removeprefix("eval_").startswith("feature_cosine"):
            raise ValueError(f"metric_for_best_model='{best}' compares the student with the teachers on the evaluation "
                             "set, and none is given (trained from a feature cache): pass teacher_model= as well, or "
                             "knn_train_dataset= with metric_for_best_model='knn_accuracy'")
        names = [display_name(t) for t in teachers] or [short_name(n) for n in self._cached_teachers]
        self.keys = teacher_keys(names)
        self.teacher_display = dict(zip(self.keys, names))  # the key in metric names -> the teacher's name
        weights = self.args.feature_teacher_weights
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"feature_teacher_weights has {len(weights)} values for {len(names)} teachers")
        self.weights = list(weights) if weights is not None else [1.0] * len(names)

    def build_modules(self, student, teachers, probe):
        """One adaptor per teacher and target, built from the widths the probe found, and the standardisers."""
        modules = nn.ModuleDict()
        s_summary, s_spatial = probe["student_features"]
        mult, warmup = self.args.feature_adaptor_mult, self.args.feature_standardize_batches
        for key, (t_summary, t_spatial) in zip(self.keys, probe["teacher_features"]):
            widths = {"summary": (s_summary, t_summary), "spatial": (s_spatial, t_spatial)}
            for target in self.targets:
                modules[f"{key}/{target}"] = FeatureAdaptor(*widths[target], mult)
                if warmup:
                    modules[f"{key}/{target}_stats"] = RunningStandardizer(widths[target][1], warmup)
        # the standardisers are extra modules (checkpointed, synced from rank 0 by DDP); the loss uses them directly
        self._stats = {name[:-len("_stats")]: m for name, m in modules.items() if name.endswith("_stats")}
        return modules

    def forward_modules(self, modules, features):
        # adaptors run inside the wrapped forward, so data parallel syncs their gradients
        return {f"{key}/{target}": modules[f"{key}/{target}"](features[target])
                for key in self.keys for target in self.targets}

    def _target(self, out: StepOutputs, name: str, update: bool) -> torch.Tensor:
        """A teacher feature (``key/target``; the teacher source names them ``index/target``), standardised per
        channel (the statistics still learning on the first batches)."""
        key, target = name.split("/")
        t = out.teacher_features[f"{self.keys.index(key)}/{target}"].float()
        stats = getattr(self, "_stats", {}).get(name)
        if stats is None:
            return t
        if update:
            stats.update(t)
        return stats.standardize(t)

    def loss(self, out: StepOutputs):
        total, terms = 0.0, {}
        for key, weight in zip(self.keys, self.weights):
            for target in self.targets:
                name = f"{key}/{target}"
                pred, t = out.extra_outputs[name], self._target(out, name, update=True)
                if target == "summary":
                    value = summary_loss(pred, t)
                    total = total + weight * self.args.feature_summary_weight * value
                else:
                    value = spatial_loss(pred, t)
                    total = total + weight * self.args.feature_spatial_weight * value
                terms[f"loss_{target}_{key}"] = value.detach()
        return total, terms

    def evaluate(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """Per-sample cosine of each adapted student feature with its (standardised) teacher feature, and their
        mean (``feature_cosine``); nothing without teachers (trained from a feature cache alone)."""
        if not out.teacher_features:
            return {}
        values = {f"feature_cosine_{target}_{key}": per_sample_cosine(out.extra_outputs[f"{key}/{target}"],
                                                                      self._target(out, f"{key}/{target}", False))
                  for key in self.keys for target in self.targets}
        values["feature_cosine"] = torch.stack([v.float() for v in values.values()]).mean(0)
        return values

    def save(self, student, extras, output_dir) -> None:
        if self.args.feature_export_adaptors:
            from ..models.features import save_adaptors

            save_adaptors(extras, self.keys, self.targets, output_dir)

    def card_notes(self) -> dict[str, str]:
        return {"Feature distillation": f"the student reproduces the {' and '.join(self.targets)} features of "
                + ", ".join(f"`{self.teacher_display.get(k, k)}`" for k in self.keys) + " through trained adaptors, without labels; the exported "
                "model is the student backbone" + (" (adaptors exported too)" if self.args.feature_export_adaptors
                                                   else "")}

    def hyperparameters(self):
        a = self.args
        return {"feature_targets": self.targets, "feature_teacher_weights": self.weights,
                "feature_summary_weight": a.feature_summary_weight, "feature_spatial_weight": a.feature_spatial_weight,
                "feature_standardize_batches": a.feature_standardize_batches,
                "feature_adaptor_mult": a.feature_adaptor_mult, "losses": "summary 1 - cos; spatial 0.9 (1 - cos) + "
                "0.1 smooth L1 on the teacher's grid", **super().hyperparameters()}
