"""Classic knowledge distillation (Hinton et al., 2015), its noisy-teacher preset, and plain supervised training."""

from __future__ import annotations

from ..losses import kd_loss
from .base import DistillationMethod, Stage, StepOutputs


class KnowledgeDistillation(DistillationMethod):
    """``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax_T(z_t) || softmax_T(z_s))``.

    ``distill_loss`` swaps the teacher term (``mse`` logit regression, ``hard`` CE against the
    teacher's argmax), ``logit_standardization`` z-scores both logits first. A student with a
    distillation head (DeiT) learns the teacher term on that head and the labels on its class head.
    """

    name = "kd"
    paper = ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "https://arxiv.org/abs/1503.02531")
    title = "Knowledge distillation (KD)"
    description = ("The student learns to match the teacher's temperature-softened class probabilities (a "
                   "KL-divergence term weighed by alpha) together with the cross-entropy on the ground-truth labels.")

    without_labels = "set alpha=1 (the teacher term alone)"

    def stage(self, progress):
        return Stage(labels=self.args.alpha < 1)  # alpha = 1: the teacher term alone, no labels needed

    def loss(self, out: StepOutputs):
        a = self.args
        return kd_loss(out.student_logits, out.teacher_logits, out.labels, a.temperature, a.alpha, a.distill_loss,
                       a.label_smoothing_factor, a.logit_standardization, out.student_dist_logits)

    def hyperparameters(self):
        a = self.args
        return {"temperature": a.temperature, "alpha": a.alpha, "distill_loss": a.distill_loss,
                **super().hyperparameters()}


class NoisyTeacher(KnowledgeDistillation):
    """The noisy-teacher preset (Sau & Balasubramanian, 2016): L2 logit regression on perturbed logits.

    Defaults for arguments left unset: ``distill_loss="mse"``, ``teacher_noise_std=0.2``,
    ``teacher_noise_prob=0.5``; ``alpha`` (0.9) still weighs the regression against label CE.
    """

    name = "noisy_teacher"
    preset = {"distill_loss": "mse", "teacher_noise_std": 0.2, "teacher_noise_prob": 0.5}
    paper = ("Deep Model Compression: Distilling Knowledge from Noisy Teachers (Sau & Balasubramanian, 2016)",
             "https://arxiv.org/abs/1610.09650")
    title = "Noisy teacher distillation"
    description = ("The student regresses the teacher's logits, randomly perturbed during training (a regulariser "
                   "that simulates learning from several teachers), next to the label cross-entropy.")


class FunctionMatching(KnowledgeDistillation):
    """Function matching (Beyer et al., CVPR 2022): KD towards a consistent teacher on aggressively mixed images.

    Defaults for arguments left unset: ``alpha=1`` (the KD term only: no labels needed),
    ``temperature=1``, ``mixup_alpha=1`` (every batch mixed, the teacher seeing the same mixed images).
    Pair it with random crops (``train_augmentation="timm"``) and a long schedule.
    """

    name = "function_matching"
    default_temperature = 1.0
    preset = {"alpha": 1.0, "mixup_alpha": 1.0}
    search_space = {"temperature": {"low": 0.5, "high": 4.0, "log": True}}  # alpha 1: no labels
    paper = ("Knowledge distillation: A good teacher is patient and consistent (Beyer et al., CVPR 2022)",
             "https://arxiv.org/abs/2106.05237")
    title = "Function matching (consistent, patient KD)"
    description = ("The student matches the teacher's class probabilities on aggressively mixed images, the teacher "
                   "seeing exactly the student's mixed image (consistent teaching); mixing is the method.")


class Supervised(DistillationMethod):
    """No teacher: cross-entropy on labels. The baseline every distillation is compared to.

    A student with a distillation head trains both heads on the labels (the prediction is their mean).
    """

    name = "supervised"
    title = "Supervised training (no teacher)"
    description = "Trained on the ground-truth labels only, without a teacher: a baseline for the distilled students."
    needs_teacher = False
    uses_teacher = False
    uses_alpha = False
    alpha_instead = "it trains on the labels alone"
    search_space = {}
    standardizes_logits = False

    def loss(self, out: StepOutputs):
        ce = self.ce(out.student_logits, out.labels)
        if out.student_dist_logits is not None:
            ce = 0.5 * (ce + self.ce(out.student_dist_logits, out.labels))
        return ce, {"loss_ce": ce.detach()}

    def hyperparameters(self):
        return super().hyperparameters()  # mixing, when on: the labels are mixed too
