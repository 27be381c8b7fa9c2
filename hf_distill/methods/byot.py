"""Be Your Own Teacher: self-distillation through exits (Zhang et al., ICCV 2019). docs/methods.md.

Exits attach after the student's sections (its stages, from :mod:`hf_distill.models.stages`, unless
``byot_exits`` names them); the network's own head is the deepest classifier ``K``::

    L = CE(z_K, y) + sum_i [ (1 - a) CE(z_i, y) + a T^2 KL(p_K || p_i) + lam ||F_i - F_K||^2 ]

with ``z_K`` and ``F_K`` detached, ``a = byot_alpha``, ``lam = byot_feature_weight``;
``||.||^2`` is summed over a sample's features and averaged over the batch
(``byot_feature_reduction="mean"`` averages over the features instead). With an external
teacher, the deepest classifier's term becomes KD from it (``alpha``, ``distill_loss``), and
``hint_layers`` add FitNets hints from it (``+ hint_weight * hint loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..models.exits import BOTTLENECKS, ExitHead, ExitSpec, MultiExitModel, deepest_target
from ..losses import kd_loss, soft_kl
from ..models.taps import TOKENS
from .base import DistillationMethod, Layers, StepOutputs
from .fitnets import Hints

FEATURE_REDUCTIONS = ("sum", "mean")


@dataclass
class BYOTArguments:
    byot_exits: Optional[list[str]] = field(
        default=None,
        metadata={"help": "BYOT: module names after which exits attach, or `auto` (the default): after every stage "
                  "but the last."},
    )
    byot_alpha: float = field(
        default=0.3, metadata={"help": "BYOT: weight of the deepest classifier's soft targets for each exit (0.3)."}
    )
    byot_feature_weight: float = field(
        default=0.03, metadata={"help": "BYOT: weight lambda of the feature term ||F_i - F_K||^2 (0.03)."}
    )
    byot_exit_bottleneck: str = field(
        default="sepconv",
        metadata={"help": "BYOT: exit bottleneck for feature maps: 'sepconv' (depthwise-separable, light; default) "
                  "or 'conv' (full 3x3 convolutions, ~7x the parameters).", "choices": list(BOTTLENECKS)},
    )
    byot_feature_reduction: str = field(
        default="sum",
        metadata={"help": "BYOT: ||F_i - F_K||^2 summed over a sample's features ('sum', as the paper) or averaged "
                  "over them ('mean': the term no longer grows with the feature size).",
                  "choices": list(FEATURE_REDUCTIONS)},
    )
    byot_export_exits: bool = field(
        default=False,
        metadata={"help": "BYOT: save_model also writes the exits (MultiExitModel.from_pretrained: early exit, "
                  "ensemble). Default: the plain student only."},
    )


class BeYourOwnTeacher(DistillationMethod):
    name = "byot"
    arguments = BYOTArguments
    also_uses = ("hint_layers", "hint_weight")  # FitNets hints from an external teacher
    needs_teacher = False
    default_temperature = 3.0
    search_space = {"temperature": {"low": 1.0, "high": 6.0}, "byot_alpha": {"low": 0.1, "high": 0.9},
                    "byot_feature_weight": {"low": 0.003, "high": 0.3, "log": True}}
    paper = ("Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self "
             "Distillation (Zhang et al., ICCV 2019)", "https://arxiv.org/abs/1905.08094")
    title = "Be Your Own Teacher (self-distillation)"
    description = ("Shallow classifiers attached after the student's stages learn from its deepest classifier "
                   "(soft targets and features), so the network is its own teacher; every exit can be used on its "
                   "own for faster inference.")
    with_teacher_description = (
        "Shallow classifiers attached after the student's stages learn from its deepest classifier (soft targets "
        "and features), while the deepest classifier itself is distilled from an external teacher (the KD term "
        "below); every exit can be used on its own for faster inference.")

    def __init__(self, args):
        super().__init__(args)
        self.exit_layers: list[str] = []
        self.deepest_layer: str = ""
        self._deepest_layout = "nchw"
        self._prefix = 0
        # FitNets hints from an external teacher, added to the loss with hint_weight
        self.hints = Hints(args.hint_layers, prefix="hint") if args.hint_layers else None

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        if not 0.0 <= args.byot_alpha <= 1.0 or args.byot_feature_weight < 0:
            raise ValueError("byot_alpha must be in [0, 1] and byot_feature_weight >= 0")
        if args.byot_exit_bottleneck not in BOTTLENECKS:
            raise ValueError(f"byot_exit_bottleneck must be one of {BOTTLENECKS}, got '{args.byot_exit_bottleneck}'")
        if args.byot_feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"byot_feature_reduction must be one of {FEATURE_REDUCTIONS}, "
                             f"got '{args.byot_feature_reduction}'")
        if args.hint_layers:
            if args.hint_weight <= 0:
                raise ValueError("byot with hint_layers: set hint_weight > 0 (the weight of the FitNets hint term)")
            if args.hint_epochs:
                raise ValueError("hint_epochs (a FitNets stage 1 of hints only) applies to distill_method='fitnets'; "
                                 "with byot the hints join the loss from the start")

    def setup(self, student, teachers):
        from ..models.middle import run_from_middle
        from ..models.view import StagesNotFoundError, model_view

        exits = self.args.byot_exits or []
        exits = [exits] if isinstance(exits, str) else list(exits)
        auto = exits in ([], ["auto"])
        try:  # training needs the stages' features only (hf_distill.models.view), no split of the model
            stages = model_view(student).names()
        except StagesNotFoundError as err:
            if auto:
                raise ValueError(f"byot: {err}") from None
            stages = list(exits)  # named exits; the last one is the deepest feature
        self.deepest_layer = stages[-1]
        self.exit_layers = stages[:-1] if auto else [e for e in exits if e != self.deepest_layer]
        if not self.exit_layers:
            raise ValueError("byot: the student has a single stage, there is nowhere to attach an exit")
        self.with_teacher = bool(teachers) or bool(self.args.teacher_cache_dir)
        if self.with_teacher:
            self.description = self.with_teacher_description
        if self.args.byot_export_exits:  # early-exit inference runs the student from the middle: check it now
            try:
                self._runner = run_from_middle(student, [*self.exit_layers, self.deepest_layer])
            except StagesNotFoundError as err:
                raise ValueError(f"byot_export_exits: {err}; train without byot_export_exits, or name other "
                                 "byot_exits") from None
        if self.hints is not None:
            if not teachers:
                raise ValueError("byot with hint_layers needs a teacher (teacher_model_name_or_path) for the hints")
            self.hints.setup(student, teachers)

    def layers(self):
        hinted = self.hints.student_layers() if self.hints is not None else []
        deepest = [self.deepest_layer] if self.deepest_layer else []  # (none before setup)
        return Layers(student=tuple(dict.fromkeys([*self.exit_layers, *deepest, *hinted])),
                      teacher=tuple(self.hints.teacher_layers() if self.hints is not None else ()))

    def build_modules(self, student, teachers, probe):
        from ..models import num_classes_of

        from .fitnets import _token_layout

        out_shape, self._deepest_layout = probe["student"][self.deepest_layer]
        self._prefix, self._deepest_grid = _token_layout(student, self.deepest_layer, out_shape, self._deepest_layout)
        n_classes = num_classes_of(student)
        if n_classes is None:
            raise ValueError("byot needs to know the student's number of classes (num_classes / num_labels)")
        exits = nn.ModuleDict()
        shapes = {layer: probe["student"][layer] for layer in self.exit_layers}
        # tokens stay tokens only when every exit has the deepest token count and prefix tokens (ViT); otherwise
        # all compare maps (ConViT adds its class token after the first blocks: 16 tokens, then 1 + 16)
        self._deepest_as_map = self._deepest_layout != TOKENS or any(
            layout != TOKENS or shape[1] != out_shape[1]
            or _token_layout(student, layer, shape, layout)[0] != self._prefix
            for layer, (shape, layout) in shapes.items())
        for i, layer in enumerate(self.exit_layers):
            shape, layout = shapes[layer]
            prefix, grid = _token_layout(student, layer, shape, layout)
            exits[f"exit{i + 1}"] = ExitHead(ExitSpec(layer, shape, layout, out_shape, self._deepest_layout,
                                                      n_classes, prefix, self.args.byot_exit_bottleneck,
                                                      in_grid=grid, out_grid=self._deepest_grid,
                                                      out_prefix=self._prefix, as_map=self._deepest_as_map))
        if self.hints is not None:
            exits.update(self.hints.build(student, teachers, probe))
        return exits

    def forward_modules(self, modules, features):
        logits, feats = [], []
        deepest = deepest_target(features[self.deepest_layer], self._deepest_layout, self._prefix,
                                 as_map=getattr(self, "_deepest_as_map", False), grid=getattr(self, "_deepest_grid", None))
        size = None if deepest.ndim != 4 else deepest.shape[-2:]  # at run time: images come at any size
        for i, layer in enumerate(self.exit_layers):
            z, f = modules[f"exit{i + 1}"](features[layer], size)
            logits.append(z)
            feats.append(f)
        out = {"exit_logits": logits, "exit_features": feats, "deepest_feature": deepest}
        if self.hints is not None:
            out["hints"] = self.hints.forward(modules, features)
        return out

    def loss(self, out: StepOutputs):
        a, T, lam = self.args.byot_alpha, self.args.temperature, self.args.byot_feature_weight
        z_k = out.student_logits
        if out.teacher_logits is not None:  # the deepest classifier also learns from a teacher
            args = self.args
            deep, deep_terms = kd_loss(z_k, out.teacher_logits, out.labels, args.temperature, args.alpha,
                                       args.distill_loss, args.label_smoothing_factor, args.logit_standardization,
                                       out.student_dist_logits)
            terms = {f"{k}_deepest": v for k, v in deep_terms.items()}
        else:
            deep = self.ce(z_k, out.labels)
            terms = {"loss_ce_deepest": deep.detach()}
        total = deep
        target_logits = z_k.detach()
        target_feature = out.extra_outputs["deepest_feature"].detach()
        per_sample_sum = self.args.byot_feature_reduction == "sum"
        for i, (z_i, f_i) in enumerate(zip(out.extra_outputs["exit_logits"], out.extra_outputs["exit_features"])):
            ce = self.ce(z_i, out.labels)
            kl = soft_kl(z_i, target_logits, T)
            sq = (f_i.float() - target_feature.float()).pow(2)
            feat = sq.flatten(1).sum(1).mean() if per_sample_sum else sq.mean()
            total = total + (1 - a) * ce + a * kl + lam * feat
            terms.update({f"loss_ce_exit{i + 1}": ce.detach(), f"loss_kd_exit{i + 1}": kl.detach(),
                          f"loss_feature_exit{i + 1}": feat.detach()})
        if self.hints is not None:
            hint = self.hints.loss(out.extra_outputs["hints"], out.teacher_features)
            total = total + self.args.hint_weight * hint
            terms["loss_hint"] = hint.detach()
        return total, terms

    def evaluate(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """Every exit's logits and the ensemble (mean probability), for per-exit accuracy."""
        exits = out.extra_outputs["exit_logits"]
        named = {f"exit{i + 1}": z.float() for i, z in enumerate(exits)}
        probs = torch.stack([z.float().softmax(-1) for z in [*exits, out.student_logits]]).mean(0)
        named["ensemble"] = probs.log()
        return named

    def save(self, student, extras, output_dir) -> None:
        if self.args.byot_export_exits:
            exits = nn.ModuleList(extras[f"exit{i + 1}"] for i in range(len(self.exit_layers)))
            staged = getattr(self, "_runner", None)
            MultiExitModel(student, exits, [*self.exit_layers, self.deepest_layer], staged=staged).save_pretrained(
                output_dir)

    def hyperparameters(self):
        a = self.args
        return {"exits": self.exit_layers, "deepest_feature": self.deepest_layer, "byot_alpha": a.byot_alpha,
                "byot_feature_weight": a.byot_feature_weight, "byot_feature_reduction": a.byot_feature_reduction,
                "byot_exit_bottleneck": a.byot_exit_bottleneck, "temperature": a.temperature,
                "byot_export_exits": a.byot_export_exits,
                **({"teacher_term": "KD on the deepest classifier", "alpha": a.alpha, "distill_loss": a.distill_loss}
                   if getattr(self, "with_teacher", False) else {}),
                **({"hint_layers": [f"{s}:{t}" for s, t in self.hints.pairs], "hint_weight": a.hint_weight}
                   if self.hints is not None else {}), **super().hyperparameters()}
