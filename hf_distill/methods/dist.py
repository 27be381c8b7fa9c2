"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022). See docs/methods.md.

    L = dist_ce_weight * CE(z_s, y) + dist_weight * T^2 * (dist_beta * L_inter + dist_gamma * L_intra)

It matches the *relations* of the teacher's probabilities (Pearson correlation per sample across
the classes, and per class across the batch) instead of the probabilities themselves, which
tolerates a teacher much stronger than the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import dist_terms
from .base import DistillationMethod, Stage, StepOutputs


@dataclass
class DISTArguments:
    dist_beta: float = field(default=1.0, metadata={"help": "DIST: weight of the inter-class relation term (1.0)."})
    dist_gamma: float = field(default=1.0, metadata={"help": "DIST: weight of the intra-class relation term (1.0)."})
    dist_weight: float = field(default=2.0, metadata={"help": "DIST: weight of the whole DIST term (2.0, as the "
                                                               "paper's ImageNet recipe)."})
    dist_ce_weight: float = field(default=1.0, metadata={"help": "DIST: weight of the label cross-entropy (1.0; 0 "
                                                                  "trains without labels)."})


class DIST(DistillationMethod):
    name = "dist"
    arguments = DISTArguments
    default_temperature = 1.0
    uses_alpha = False
    search_space = {"temperature": {"low": 1.0, "high": 4.0}, "dist_weight": {"low": 0.5, "high": 4.0, "log": True}}
    alpha_instead = "its terms are weighed by dist_weight (the DIST term) and dist_ce_weight (the label CE)"
    standardizes_logits = False  # Pearson correlations are already blind to each row's offset
    paper = ("Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022)",
             "https://arxiv.org/abs/2205.10536")
    title = "DIST (relational distillation from a stronger teacher)"
    description = ("The student matches the relations of the teacher's class probabilities (Pearson correlation "
                   "across classes per image and across images per class) rather than the probabilities themselves.")

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        if min(args.dist_beta, args.dist_gamma, args.dist_weight, args.dist_ce_weight) < 0:
            raise ValueError("dist_beta, dist_gamma, dist_weight and dist_ce_weight must be >= 0")
        if args.distill_loss != "kl":
            raise ValueError(f"distill_method='dist' has its own teacher term; distill_loss '{args.distill_loss}' "
                             "does not apply")

    without_labels = "set dist_ce_weight=0 (the teacher terms alone)"

    def stage(self, progress):
        return Stage(labels=self.args.dist_ce_weight > 0)

    def loss(self, out: StepOutputs):
        a = self.args
        inter, intra = dist_terms(out.teacher_view_logits, out.teacher_logits, a.temperature)
        if a.dist_ce_weight == 0 and out.student_dist_logits is not None:
            # no label term: the class head learns the teacher too (it is half of every prediction)
            cls_inter, cls_intra = dist_terms(out.student_logits, out.teacher_logits, a.temperature)
            inter, intra = 0.5 * (inter + cls_inter), 0.5 * (intra + cls_intra)
        total = a.dist_weight * (a.dist_beta * inter + a.dist_gamma * intra)
        terms = {"loss_inter": inter.detach(), "loss_intra": intra.detach()}
        if a.dist_ce_weight > 0:
            ce = self.ce(out.student_logits, out.labels)
            total = total + a.dist_ce_weight * ce
            terms["loss_ce"] = ce.detach()
        return total, terms

    def check_teacher_cache(self, cache) -> None:
        if cache.top_k:
            raise ValueError(f"distill_method='dist' correlates the teacher's full probability vectors; this cache "
                             f"keeps only the top {cache.top_k} logits: rebuild it without --top_k")

    def hyperparameters(self):
        a = self.args
        return {"temperature": a.temperature, "dist_beta": a.dist_beta, "dist_gamma": a.dist_gamma,
                "dist_weight": a.dist_weight, "dist_ce_weight": a.dist_ce_weight, **super().hyperparameters()}
