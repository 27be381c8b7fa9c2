"""What the trainer is made of: the trained container, the training data's set-up, evaluation, checkpoints and
the model card's record. ``hf_distill.trainer.DistillationTrainer`` puts them together."""

from .container import DistillationModel

__all__ = ["DistillationModel"]
