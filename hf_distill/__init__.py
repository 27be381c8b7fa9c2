"""hf_distill: knowledge distillation for timm and Hugging Face vision models."""

from .arguments import DataArguments, DistillationTrainingArguments, ModelArguments
from .methods import METHODS, DistillationMethod
from .models import InputSpec, load_model, set_input_spec
from .trainer import DistillationModel, DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "DataArguments",
    "DistillationMethod",
    "DistillationModel",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "InputSpec",
    "METHODS",
    "ModelArguments",
    "load_model",
    "set_input_spec",
]
