"""Decoupled knowledge distillation (Zhao et al., CVPR 2022). See docs/methods.md.

    L = CE(z_s, y) + ramp * T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD)

TCKD compares teacher and student on (target, rest); NCKD on the non-target classes. Classic KD
weighs NCKD by ``1 - p_t[y]``, which is small exactly where the teacher is confident; DKD gives it a
weight of its own. ``ramp`` grows linearly from 0 to 1 over ``dkd_warmup_epochs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import dkd_terms
from .base import DistillationMethod, Progress, Stage, StepOutputs


@dataclass
class DKDArguments:
    dkd_alpha: float = field(default=1.0, metadata={"help": "DKD: weight of the target-class term TCKD (1.0)."})
    dkd_beta: float = field(default=8.0, metadata={"help": "DKD: weight of the non-target-class term NCKD (8.0; the "
                                                             "paper uses 0.5-2 on ImageNet)."})
    dkd_warmup_epochs: float = field(
        default=20.0, metadata={"help": "DKD: the DKD term's weight ramps linearly from 0 to 1 over this many epochs "
                                        "(20; 0 disables the ramp)."})


class DecoupledKD(DistillationMethod):
    name = "dkd"
    arguments = DKDArguments
    uses_alpha = False
    # beta is 8 on CIFAR-100 and 0.5 on ImageNet in the paper: a log range over both
    search_space = {"temperature": {"low": 1.0, "high": 8.0}, "dkd_beta": {"low": 0.5, "high": 8.0, "log": True}}
    alpha_instead = "its terms are weighed by dkd_alpha (TCKD) and dkd_beta (NCKD), next to the label CE"
    mixes = False
    epoch_arguments = ("dkd_warmup_epochs",)
    no_mixing = "DKD splits the teacher's knowledge at each image's one label, which a mixed image does not have"
    paper = ("Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)", "https://arxiv.org/abs/2203.08679")
    title = "Decoupled knowledge distillation (DKD)"
    description = ("The teacher's knowledge is split into a target-class term (TCKD) and a non-target-class term "
                   "(NCKD), each with its own weight, added to the label cross-entropy after a linear warm-up.")

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        if min(args.dkd_alpha, args.dkd_beta, args.dkd_warmup_epochs) < 0:
            raise ValueError("dkd_alpha, dkd_beta and dkd_warmup_epochs must be >= 0")
        if args.distill_loss != "kl":
            raise ValueError(f"distill_method='dkd' is a KL objective; distill_loss '{args.distill_loss}' does not apply")

    def ramp(self, progress: Progress) -> float:
        """The warm-up factor ``min(1, epochs trained / dkd_warmup_epochs)``, per step."""
        warmup = self.args.dkd_warmup_epochs
        if not warmup:
            return 1.0
        steps = progress.steps_at_epoch(warmup)
        if steps > 0:
            return min(1.0, progress.step / steps)
        return min(1.0, progress.epoch / warmup)

    def loss(self, out: StepOutputs):
        a = self.args
        ce = self.ce(out.student_logits, out.labels)
        tckd, nckd = dkd_terms(out.teacher_view_logits, out.teacher_logits, out.labels, a.temperature,
                               a.logit_standardization)
        total = ce + self.ramp(out.progress) * (a.dkd_alpha * tckd + a.dkd_beta * nckd)
        return total, {"loss_ce": ce.detach(), "loss_tckd": tckd.detach(), "loss_nckd": nckd.detach()}

    def stage(self, progress):
        return Stage(values={"dkd_ramp": self.ramp(progress)})

    def check_teacher_cache(self, cache) -> None:
        super().check_teacher_cache(cache)
        if cache.top_k:
            missing = cache.labels_outside_top_k()
            if missing:
                raise ValueError(f"distill_method='dkd' needs the teacher's logit of each image's label; this cache keeps "
                                 f"the top {cache.top_k}, and the label is outside them for {missing} entries: rebuild "
                                 "it without --top_k or with a larger one")

    def hyperparameters(self):
        a = self.args
        return {"temperature": a.temperature, "dkd_alpha": a.dkd_alpha, "dkd_beta": a.dkd_beta,
                "dkd_warmup_epochs": a.dkd_warmup_epochs, "label_ce_weight": 1.0, **super().hyperparameters()}
