"""SFTN: student-friendly teacher networks (Park & Cha, 2021). docs/methods.md.

Here the model being trained is the *teacher*. After each of its stages ``i < K`` a *student
branch* is attached: a transform layer ``T_i`` (shapes adapted automatically) then a fresh
copy of the student's stages ``i+1..K`` and head, giving logits ``z_R^i``::

    L = lam_T CE(z_t, y) + lam_KL sum_i T^2 KL(softmax_T(z_t) || softmax_T(z_R^i)) + lam_CE sum_i CE(z_R^i, y)

Teacher and branches train together; the branches are never saved with the teacher, which is
then an ordinary teacher for any method (``teacher_model_name_or_path``). Teacher and
student are split into the same number of stages (the smaller of the two counts; the model
with more stages is regrouped evenly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..losses import soft_kl
from ..models.taps import NCHW, NHWC, TOKENS, resize_map, to_nchw
from .base import DistillationMethod, Layers, StepOutputs


@dataclass
class SFTNArguments:
    sftn_student_model: Optional[str] = field(
        default=None,
        metadata={"help": "SFTN: the student architecture the teacher is made friendly to (timm name, "
                  "transformers config/repo, or local path); built with random init."},
    )
    sftn_lambda_teacher: float = field(default=1.0, metadata={"help": "SFTN: weight of the teacher's CE (1)."})
    sftn_lambda_kl: float = field(default=1.0, metadata={"help": "SFTN: weight of the branch KL terms (1)."})
    sftn_lambda_ce: float = field(default=1.0, metadata={"help": "SFTN: weight of the branch CE terms (1)."})
    sftn_distill_method: Optional[str] = field(
        default=None,
        metadata={"help": "CLI: after the SFTN teacher phase, distill `sftn_student_model` from it with this "
                  "method (e.g. kd, fitnets) into OUTPUT_DIR/student."},
    )


def _channels(shape, layout) -> int:
    return shape[-1] if layout in (NHWC, TOKENS) else shape[1]


def _grid(shape, layout, prefix) -> tuple[int, int]:
    if layout == NCHW:
        return shape[-2], shape[-1]
    if layout == NHWC:
        return shape[1], shape[2]
    n = shape[1] - prefix
    side = int(round(n ** 0.5))
    return side, n // max(side, 1)


class TransformLayer(nn.Module):
    """Maps a teacher stage output to the input the student's next stage expects.

    The student's grid is set at run time from the teacher feature's actual size, in the ratio
    the probe found (images come at any size); a student with a fixed token grid (ViT) keeps it.
    """

    def __init__(self, t_shape, t_layout, t_prefix, s_shape, s_layout, s_prefix, s_fixed_size: bool = False,
                 t_grid=None, s_grid=None):
        super().__init__()
        self.t_layout, self.t_prefix, self.s_layout, self.s_prefix = t_layout, t_prefix, s_layout, s_prefix
        self.size = tuple(s_grid) if s_grid is not None else _grid(s_shape, s_layout, s_prefix)
        self.t_grid = tuple(t_grid) if t_grid is not None else None
        t_grid = self.t_grid or _grid(t_shape, t_layout, t_prefix)
        self.fixed = s_fixed_size or s_layout == TOKENS
        self.ratio = (self.size[0] / t_grid[0], self.size[1] / t_grid[1])
        c_t, c_s = _channels(t_shape, t_layout), _channels(s_shape, s_layout)
        if s_layout == TOKENS:
            self.proj = nn.Conv2d(c_t, c_s, 1)
            self.norm = nn.LayerNorm(c_s)
            # the student's class/distillation tokens have no counterpart in a teacher map
            self.prefix = nn.Parameter(torch.zeros(1, s_prefix, c_s)) if s_prefix else None
        else:
            self.proj = nn.Sequential(nn.Conv2d(c_t, c_s, 1, bias=False), nn.BatchNorm2d(c_s), nn.ReLU(inplace=True))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        grid = self.t_grid if self.t_grid and h.ndim == 3 and h.shape[1] - self.t_prefix == \
            self.t_grid[0] * self.t_grid[1] else None
        y = self.proj(to_nchw(h, self.t_layout, self.t_prefix, grid_size=grid))
        if self.fixed:
            size = self.size
        else:
            size = (max(1, round(y.shape[-2] * self.ratio[0])), max(1, round(y.shape[-1] * self.ratio[1])))
        y = resize_map(y, size)
        if self.s_layout == NHWC:
            return y.permute(0, 2, 3, 1)
        if self.s_layout == TOKENS:
            tokens = self.norm(y.flatten(2).transpose(1, 2))
            if self.prefix is not None:
                tokens = torch.cat([self.prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            return tokens
        return y


class StudentBranch(nn.Module):
    """Transform layer + a fresh copy of the student's stages ``start..K-1`` and head."""

    def __init__(self, transform: TransformLayer, student_stages, start: int, stage=None):
        super().__init__()
        self.transform = transform
        if isinstance(student_stages, nn.Module):  # a StagedModel over this branch's own student copy
            self.student = student_stages
        else:  # a MiddleRunner: register its copy of the student, keep the runner as a plain attribute
            self.student = student_stages.model
            self.__dict__["runner"] = student_stages
        self.start = start
        self.stage = stage  # the student stage the branch starts after (its reduction sizes the stand-in input)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from ..models.view import stage_image_size
        from ..models import logits_of

        s = self.transform(h)
        runner = self.__dict__.get("runner")
        if runner is None:
            return logits_of(self.student.forward_from(self.start, s))
        runner.model = self.student  # the registered copy (also after deepcopy / .to())
        return runner.forward_from(self.start, s, stage_image_size(self.stage, s))


class SFTN(DistillationMethod):
    name = "sftn"
    arguments = SFTNArguments
    needs_teacher = False
    uses_teacher = False
    default_temperature = 1.0
    uses_alpha = False
    search_space = {"sftn_lambda_kl": {"low": 0.3, "high": 3.0, "log": True}}
    alpha_instead = "its terms are weighed by sftn_lambda_teacher, sftn_lambda_kl and sftn_lambda_ce"
    standardizes_logits = False
    paper = ("Learning Student-Friendly Teacher Networks for Knowledge Distillation (Park et al., NeurIPS 2021)",
             "https://arxiv.org/abs/2102.07650")
    title = "Student-Friendly Teacher Networks (SFTN), teacher training"
    description = ("A teacher trained together with branches built from the student's stages, so that its "
                   "knowledge is easy for that student to absorb; distill the student from it next.")
    metric_kinds = {r"branch\d+_accuracy": "accuracy", **DistillationMethod.metric_kinds}

    def __init__(self, args):
        super().__init__(args)
        self.stage_names: list[str] = []
        self.student_arch: nn.Module | None = None
        self.k = 0

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        if not args.sftn_student_model:
            raise ValueError("distill_method='sftn' trains a teacher for a student: set sftn_student_model")
        if min(args.sftn_lambda_teacher, args.sftn_lambda_kl, args.sftn_lambda_ce) < 0:
            raise ValueError("SFTN loss weights must be >= 0")
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True  # branch copies hold stages they never run

    def setup(self, teacher, teachers):
        from ..models import input_spec, load_model, num_classes_of, set_input_spec
        from ..models import has_distillation_head

        if has_distillation_head(teacher):
            raise ValueError("sftn trains a teacher; a model with a distillation head (DeiT) is a student")
        self.student_arch = load_model(self.args.sftn_student_model, num_labels=num_classes_of(teacher),
                                       pretrained=False)
        # branches see teacher features, not images: shape the student's stages as they would be at
        # the teacher's input size (a fixed-size student, e.g. a ViT, keeps its own token grid)
        spec, s_spec = input_spec(teacher), input_spec(self.student_arch)
        if not s_spec.fixed_size:
            from dataclasses import replace

            set_input_spec(self.student_arch, replace(s_spec, image_size=spec.image_size))
        from ..models.middle import run_from_middle
        from ..models.view import StagesNotFoundError, model_view

        try:  # stages from what the libraries declare (hf_distill.models.view)
            t_view, s_view = model_view(teacher), model_view(self.student_arch)
            k = min(len(t_view.names()), len(s_view.names()))
            self.stage_names = t_view.names(num_groups=k)
            self.student_stage_names = s_view.names(num_groups=k)
            if k >= 2:  # the branches run the student from its middle: checked now, on a probe
                run_from_middle(self.student_arch, self.student_stage_names)
        except StagesNotFoundError as err:
            raise ValueError(f"sftn: {err}; pick another sftn_student_model") from None
        self.k = k
        if k < 2:
            raise ValueError("sftn needs models with at least 2 stages")

    def layers(self):
        return Layers(student=tuple(self.stage_names[:-1]))  # branch points on the model being trained (the teacher)

    def build_modules(self, teacher, teachers, probe):
        from ..models.middle import run_from_middle
        from ..models.view import model_view
        from ..models import input_spec
        from ..models.taps import probe_features
        from .fitnets import _token_layout

        spec = input_spec(self.student_arch)
        example = torch.zeros(2, spec.in_chans, *spec.image_size)
        s_probe = probe_features(self.student_arch, self.student_stage_names[:-1], example)
        s_view = model_view(self.student_arch)
        branches = nn.ModuleDict()
        for i, layer in enumerate(self.stage_names[:-1]):
            t_shape, t_layout = probe["student"][layer]
            s_name = self.student_stage_names[i]
            s_shape, s_layout = s_probe[s_name]
            t_prefix, t_grid = _token_layout(teacher, layer, t_shape, t_layout)
            s_prefix, s_grid = _token_layout(self.student_arch, s_name, s_shape, s_layout)
            transform = TransformLayer(t_shape, t_layout, t_prefix, s_shape, s_layout, s_prefix, spec.fixed_size,
                                       t_grid=t_grid, s_grid=s_grid)
            copy_ = copy.deepcopy(self.student_arch)
            staged = run_from_middle(copy_, self.student_stage_names)
            branch = StudentBranch(transform, staged, i + 1, s_view.stage(s_name))
            _freeze_unused(branch, probe["student"][layer][0])
            branches[f"branch{i + 1}"] = branch
        return branches

    def forward_modules(self, modules, features):
        return {"branch_logits": [modules[f"branch{i + 1}"](features[layer])
                                  for i, layer in enumerate(self.stage_names[:-1])]}

    def loss(self, out: StepOutputs):
        a = self.args
        z_t, y = out.student_logits, out.labels  # the trained model is the teacher here
        ce_t = self.ce(z_t, y)
        total = a.sftn_lambda_teacher * ce_t
        terms = {"loss_ce_teacher": ce_t.detach()}
        for i, z_r in enumerate(out.extra_outputs["branch_logits"]):
            kl = soft_kl(z_r, z_t, a.temperature)  # gradients reach both the branch and the teacher
            ce = self.ce(z_r, y)
            total = total + a.sftn_lambda_kl * kl + a.sftn_lambda_ce * ce
            terms.update({f"loss_kl_branch{i + 1}": kl.detach(), f"loss_ce_branch{i + 1}": ce.detach()})
        return total, terms

    def evaluate(self, out: StepOutputs):
        return {f"branch{i + 1}": z.float() for i, z in enumerate(out.extra_outputs["branch_logits"])}

    def card_notes(self) -> dict[str, str]:
        return {"SFTN teacher": f"trained with student branches for `{self.args.sftn_student_model}`; "
                "distill a student from it with any method (teacher_model_name_or_path)"}

    def hyperparameters(self):
        a = self.args
        return {"sftn_student_model": a.sftn_student_model, "stages": self.stage_names,
                "sftn_lambda_teacher": a.sftn_lambda_teacher, "sftn_lambda_kl": a.sftn_lambda_kl,
                "sftn_lambda_ce": a.sftn_lambda_ce, "temperature": a.temperature, **super().hyperparameters()}


def _freeze_unused(branch: StudentBranch, t_shape) -> None:
    """Freeze the student-copy parameters the branch never runs (its copy's earlier stages)."""
    x = torch.zeros(t_shape)
    was = branch.training
    branch.eval()
    try:
        with torch.enable_grad():
            out = branch(x).float().sum()
            params = [(n, p) for n, p in branch.named_parameters()]
            grads = torch.autograd.grad(out, [p for _, p in params], allow_unused=True)
    finally:
        branch.train(was)
    for (name, p), g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)
