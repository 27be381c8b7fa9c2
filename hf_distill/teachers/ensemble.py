"""Frozen teachers: loading, input adaptation, precision, and running without autograd."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..models.taps import FeatureTaps
from ..models import (
    InputAdapter,
    InputSpec,
    call_model,
    check_image_model,
    declares_input_spec,
    input_spec,
    label_names_of,
    model_name,
    num_classes_of,
    takes_input_size,
)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm statistics and dropout fixed) and no gradients, for good."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_keys(names: list[str]) -> list[str]:
    """Short, unique names for the teachers in logged terms (``loss_summary_<key>``)."""
    keys = []
    for i, name in enumerate(names):
        key = re.sub(r"[^a-z0-9]+", "-", name.lower().split("/")[-1]).strip("-") or f"teacher{i}"
        keys.append(key if key not in keys and names.count(name) == 1 else f"{key}-{i}")
    return keys


class LabelSpaceError(ValueError):
    """Student and teacher predict different classes. ``teacher`` names the teacher, ``student_classes`` /
    ``teacher_classes`` give the counts and ``differences`` the first differing names (index, student, teacher)."""

    def __init__(self, message: str, teacher: str, student_classes: int | None, teacher_classes: int | None,
                 differences: list | None = None):
        super().__init__(message)
        self.teacher, self.student_classes, self.teacher_classes = teacher, student_classes, teacher_classes
        self.differences = differences or []


def check_label_spaces(student: nn.Module, teachers: Sequence[nn.Module]) -> None:
    """Raise :class:`LabelSpaceError` if any teacher predicts a different set of classes than the student."""
    n_student = num_classes_of(student)
    names_student = label_names_of(student)
    for i, teacher in enumerate(teachers):
        who = f"teacher {i} ({model_name(teacher)})" if len(teachers) > 1 else f"teacher ({model_name(teacher)})"
        n_teacher = num_classes_of(teacher)
        if n_student is not None and n_teacher is not None and n_student != n_teacher:
            raise LabelSpaceError(
                f"class-count mismatch: the student ({model_name(student)}) predicts {n_student} classes but the "
                f"{who} predicts {n_teacher}. Load the student with num_labels={n_teacher}, or use a teacher "
                "trained on the same label set.", who, n_student, n_teacher)
        names_teacher = label_names_of(teacher)
        if names_student and names_teacher and list(names_student) != list(names_teacher):
            diff = [(i, s, t) for i, (s, t) in enumerate(zip(names_student, names_teacher)) if s != t][:5]
            raise LabelSpaceError(
                f"label names differ between the student and the {who}; first differences "
                f"(index, student, teacher): {diff}", who, n_student, n_teacher, diff)


class Teachers(nn.Module):
    """One or more frozen teachers that take batches prepared for the student.

    Each teacher gets its own input adapter (re-normalisation, channels, size) so it sees
    what it was trained on. Not a submodule of the trained model: it is never wrapped for
    data parallel, never in the optimizer and never saved with the student.
    """

    def __init__(self, teachers: Sequence[nn.Module], student_spec: InputSpec, layers: Sequence[str] = (),
                 targets: Sequence[InputSpec] | None = None):
        super().__init__()
        for i, t in enumerate(teachers):
            check_image_model(t, f"teacher {i}" if len(teachers) > 1 else "teacher")
        self.models = nn.ModuleList(freeze(t) for t in teachers)
        # each teacher's input: given (rebuilt), or found for the student's batches (teacher_input_spec)
        targets = list(targets) if targets is not None else [teacher_input_spec(t, student_spec) for t in teachers]
        self.adapters = nn.ModuleList(InputAdapter(student_spec, target) for target in targets)
        # Hint features come from the first teacher (the one a method's layer names refer to).
        self._taps = FeatureTaps(self.models[0], layers, detach=True) if layers and len(self.models) else None
        self._features: dict[str, torch.Tensor] = {}
        self.sharded = False  # FSDP2 over the processes (hf_distill.teachers.sharding): every forward is collective
        self.compile_options: dict | None = None  # set by compile(): torch.compile keywords
        self._compiled: dict[tuple[str, int], Any] = {}

    def rebuilt(self, student_spec: InputSpec, layers: Sequence[str] = ()) -> "Teachers":
        """The same teacher models (frozen, placed, sharded, compiled as they are) for another student or other
        tapped layers: this wrapper's hooks are removed, the new adapters follow the old ones' device and dtype."""
        if self._taps is not None:
            self._taps.remove()
        same_size = all(tuple(a.source.image_size) == tuple(student_spec.image_size) for a in self.adapters)
        # a sharded teacher is not run here (its forward needs every process): its input is the one found before
        targets = [a.target for a in self.adapters] if same_size or self.sharded else None
        new = Teachers(list(self.models), student_spec, layers, targets=targets)
        new.sharded = self.sharded
        if self.compile_options is not None:
            new.compile(**self.compile_options)
        for old, adapter in zip(self.adapters, new.adapters):
            buffer = next(old.buffers(), None)
            if buffer is not None:
                adapter.to(device=buffer.device, dtype=buffer.dtype)
        return new

    def compile(self, backend: str = "inductor", mode: str | None = None) -> "Teachers":
        """Compile every teacher's forward for inference (``torch.compile``, lazily at its first call, so after
        the cast to ``teacher_dtype`` and the move to the device). Each compiled call runs in
        ``torch.inference_mode`` and covers the input adapter and the feature taps (the first teacher's
        hints, their early stop included); outputs come back as ordinary tensors. Returns self."""
        if self.sharded:
            raise ValueError("teacher_compile with teacher_sharding='fsdp' is not supported: drop one of them")
        self.compile_options = {"backend": backend, "mode": mode}
        self._compiled = {}
        return self

    def set_layouts(self, layouts: Mapping[str, str]) -> None:
        """Layouts of the tapped layers, known from the trainer's probe: the first compiled forward then has
        nothing to record, so it is not recompiled at the second."""
        if self._taps is not None:
            self._taps.set_layouts(layouts)

    def _run(self, kind: str, i: int, x: torch.Tensor):
        """Teacher ``i`` on a student batch: ``kind`` "logits" -> (float logits, tapped features),
        "until" -> the first teacher's tapped features only, "backbone" -> float (summary, spatial)."""
        if self.compile_options is None:
            with torch.no_grad():
                return self._call(kind, i, x)
        fn = self._compiled.get((kind, i))
        if fn is None:
            fn = self._compiled[(kind, i)] = torch.compile(functools.partial(self._call, kind, i),
                                                          **self.compile_options)
        with torch.inference_mode():
            out = fn(x)
        return _copied(out)  # inference tensors cannot be saved for the student's backward (CUDA graphs reuse theirs)

    def _call(self, kind: str, i: int, x: torch.Tensor):
        model, x = self.models[i], self.prepare_input(i, x)
        if kind == "logits":
            logits = call_model(model, x).float()
            return logits, (self._taps.pop() if i == 0 and self._taps is not None else {})
        if kind == "until":
            return self._taps.run_until_complete(call_model, model, x)
        from ..models.features import backbone_features

        summary, spatial = backbone_features(model, x)
        return summary.float(), spatial.float()

    def describe_inputs(self) -> list[str]:
        """One line per teacher saying what its input adapter does to the student's batches."""
        return [f"teacher {i} ({model_name(t)}): input adapter: {a.describe()}"
                for i, (t, a) in enumerate(zip(self.models, self.adapters))]

    def prepare_input(self, i: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """Teacher ``i``'s input for a student batch: adapted, on the teacher's device, in its dtype."""
        weight = next(self.models[i].parameters(), None)
        device = weight.device if weight is not None else pixel_values.device
        return self.adapters[i](pixel_values.to(device)).to(_dtype_of(self.models[i]))

    def pop_features(self) -> dict[str, torch.Tensor]:
        """The first teacher's tapped features from the last forward (then forgotten)."""
        if self._taps is not None:
            self._taps.clear()
        out, self._features = self._features, {}
        return out

    def train(self, mode: bool = True) -> "Teachers":
        # train() would re-enable dropout and BatchNorm updates in a frozen teacher
        return super().train(False)

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def backbone_features(self, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each teacher's (summary, spatial) backbone features (float32) on a student batch."""
        outs = []
        for i in range(len(self.models)):
            summary, spatial = self._run("backbone", i, pixel_values)
            outs.append((summary.to(pixel_values.device), spatial.to(pixel_values.device)))
        return outs

    @torch.no_grad()
    def features_only(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first teacher's tapped features, running it only as far as the deepest tapped layer."""
        if self.sharded:  # no early stop inside a sharded forward: run it whole, the taps keep what they need
            call_model(self.models[0], self.prepare_input(0, pixel_values))
            features = self._taps.pop()
        else:
            features = self._run("until", 0, pixel_values)
        return {k: v.to(pixel_values.device) for k, v in features.items()}

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, which: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Each teacher's logits (float32) on the batch (only teachers ``which`` when given).

        The first teacher's tapped features are kept for :meth:`pop_features`; when it is not among
        ``which`` it still runs, as far as its deepest tapped layer, since hints always come from it.
        """
        outs = []
        for i in range(len(self.models)):
            if which is not None and i not in which:
                continue
            logits, features = self._run("logits", i, pixel_values)
            outs.append(logits.to(pixel_values.device))
            if i == 0 and self._taps is not None:
                self._features = {k: v.to(pixel_values.device) for k, v in features.items()}
        if self._taps is not None and which is not None and 0 not in which:
            self._features = self.features_only(pixel_values)
        return outs


def _copied(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return type(value)(_copied(v) for v in value)


def teacher_input_spec(teacher: nn.Module, student_spec: InputSpec) -> InputSpec:
    """What a teacher is fed, for batches made for ``student_spec``: a plain module that declares nothing takes
    the student's input as is; a fixed-size teacher is resized to its own size; any other teacher takes the
    student's size when one image of that size runs through it, else (a minimum size, patch divisibility) its own
    size, found with one dry forward."""
    if not declares_input_spec(teacher):
        return student_spec
    spec = input_spec(teacher)
    if spec.fixed_size or tuple(spec.image_size) == tuple(student_spec.image_size):
        return spec
    if takes_input_size(teacher, student_spec.image_size) or \
            takes_input_size(teacher, student_spec.image_size, backbone=True):
        return spec
    return dataclasses.replace(spec, fixed_size=True, source=f"{spec.source}; fed its own size, since it does not "
                               f"take {student_spec.image_size[0]}x{student_spec.image_size[1]}")


def _dtype_of(model: nn.Module) -> torch.dtype:
    weight = next(model.parameters(), None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
