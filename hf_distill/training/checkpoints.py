"""Checkpoints apart from exports.

A checkpoint (``Trainer._save_checkpoint``) holds what resumes training: the whole student, in its own
library's format, and the method's extra modules (``distill_modules.safetensors``). An export
(``save_model``) holds what the user ships: the student as the method trained it to be used (for
label-free feature distillation, the backbone without a classifier it never trained), its model
card and the run's arguments; extra modules only where the method is asked to export them.
"""

from __future__ import annotations

import os

import safetensors.torch
import torch
from torch import nn

from ..models.features import export_backbone
from ..models import load_native_weights, save_native

EXTRA_MODULES_NAME = "distill_modules.safetensors"


def shipped_student(student: nn.Module, method) -> nn.Module:
    """The model an export holds: the backbone alone when the method trains backbone features."""
    return export_backbone(student) if method.student_output == "features" else student


def write_student(trainer, output_dir: str, state_dict: dict | None, checkpoint: bool) -> None:
    """The student in its library's format (whole in a checkpoint, as shipped in an export), the method's files,
    the processor, the arguments and the model card."""
    os.makedirs(output_dir, exist_ok=True)
    student = trainer.student
    shipped = student if checkpoint else shipped_student(student, trainer.method)
    save_native(shipped, output_dir, state_dict=_student_state(state_dict) if shipped is student else None)
    trainer.method.save(student, trainer.extra_modules, output_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))  # pickles without tokens
    trainer.create_model_card(output_dir=output_dir)


def _student_state(state_dict: dict | None) -> dict | None:
    if state_dict is None:
        return None
    return {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}


def write_extras(extras: nn.ModuleDict, folder: str) -> None:
    """The method's extra modules, next to the checkpoint's student (never in an export)."""
    if len(extras):
        state = {k: v.detach().contiguous() for k, v in extras.state_dict().items()}
        safetensors.torch.save_file(state, os.path.join(folder, EXTRA_MODULES_NAME))


def restore(container, folder: str, method_name: str) -> None:
    """Load a checkpoint into the trained container: the whole student and the method's extra modules."""
    load_native_weights(container.student, folder)
    if not len(container.extras):
        return
    path = os.path.join(folder, EXTRA_MODULES_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {folder} has no {EXTRA_MODULES_NAME}: it was not written by a "
                                f"'{method_name}' run, so its extra modules cannot be restored")
    container.extras.load_state_dict(safetensors.torch.load_file(path))
