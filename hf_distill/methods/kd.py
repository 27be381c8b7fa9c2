"""Classic knowledge distillation (Hinton et al., 2015) and plain supervised training."""

from __future__ import annotations

import torch.nn.functional as F

from ..losses import kd_loss
from .base import DistillationMethod, StepOutputs


class KnowledgeDistillation(DistillationMethod):
    """``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax_T(z_t) || softmax_T(z_s))``."""

    name = "kd"
    paper = ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "https://arxiv.org/abs/1503.02531")

    def loss(self, out: StepOutputs):
        return kd_loss(out.student_logits, out.teacher_logits, out.labels, self.args.temperature, self.args.alpha)

    def hyperparameters(self):
        return {"temperature": self.args.temperature, "alpha": self.args.alpha}


class Supervised(DistillationMethod):
    """No teacher: cross-entropy on labels. The baseline every distillation is compared to."""

    name = "supervised"
    needs_teacher = False

    def loss(self, out: StepOutputs):
        ce = F.cross_entropy(out.student_logits.float(), out.labels)
        return ce, {"loss_ce": ce.detach()}
