"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015). See docs/methods.md.

Stage 1 (``hint_epochs`` > 0) trains the student up to its guided layer(s) plus the
regressors on the hint loss only; every later student parameter gets no update and later
BatchNorm layers are held in eval mode, so they are untouched. Stage 2 trains the whole
student with KD, the soft term's weight following ``soft_weight_schedule``, plus
``hint_weight`` times the hint loss (0 by default: the regressors are dropped).

Layouts: feature maps are compared as NCHW; a token sequence facing a feature map is mapped
onto its patch grid (prefix tokens dropped) and then treated as a map; token sequences on
both sides use a linear regressor over channels (token counts must match after dropping
prefix tokens, else both go to grids). Spatial mismatch: the regressed map is resized to the
teacher's size (average pooling when shrinking, bilinear when growing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..losses import TERM_NAMES, hint_loss, soft_term
from ..schedules import SCHEDULES, anneal
from ..models.taps import NHWC, TOKENS, VECTOR, num_prefix_tokens, resize_map, to_nchw
from .base import DistillationMethod, Layers, Progress, Stage, StepOutputs


@dataclass
class FitNetsArguments:
    hint_layers: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "FitNets: `student.module:teacher.module` pairs (names as in named_modules(); "
            "`hf-distill layers MODEL` lists them), or `auto` to pair the middle stages of both models."
        },
    )
    hint_epochs: Optional[float] = field(
        default=None,
        metadata={"help": "FitNets stage 1 length in epochs (hint loss only; the student trains up to its guided "
                  "layers). Default: the first quarter of training when hint_weight is 0 (stage-wise, as the "
                  "paper), else 0 (hints join the loss from the start)."},
    )
    hint_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hint loss after stage 1 (FitNets stage 2, or BYOT with hints); 0 (default): "
                  "stage 2 is KD alone and the regressors stop running."},
    )
    soft_weight_schedule: str = field(
        default="linear",
        metadata={"help": "FitNets stage 2: schedule of the soft-term multiplier from soft_weight_start to "
                  f"soft_weight_end over stage 2, one of {', '.join(SCHEDULES)} (default linear, as the paper)."},
    )
    soft_weight_start: float = field(
        default=4.0, metadata={"help": "FitNets: soft-term multiplier at the start of stage 2 (default 4, the paper)."}
    )
    soft_weight_end: float = field(
        default=1.0, metadata={"help": "FitNets: soft-term multiplier at the last step (default 1, the paper)."}
    )


def parse_hint_layers(value, student: nn.Module | None = None, teacher: nn.Module | None = None) -> list[tuple[str, str]]:
    """``["s:t", ...]`` or ``"auto"`` -> ``[(student_layer, teacher_layer), ...]``."""
    items = [value] if isinstance(value, str) else list(value or [])
    if items == ["auto"]:
        if student is None or teacher is None:
            return []
        from ..models.view import StagesNotFoundError, model_view

        try:  # the middle stage of each, from what the libraries declare (hf_distill.models.view)
            return [(model_view(student).middle(), model_view(teacher).middle())]
        except StagesNotFoundError as err:
            raise ValueError(f"hint_layers='auto': {err}") from None
    pairs = []
    for item in items:
        if item.count(":") != 1:
            raise ValueError(f"hint layer '{item}' must be 'student.module:teacher.module' (or 'auto')")
        s, t = item.split(":")
        pairs.append((s.strip(), t.strip()))
    return pairs


def _token_layout(model, layer, shape, layout) -> tuple[int, tuple[int, int] | None]:
    """Prefix-token count and probe grid of a token layer: the model view's where the layer is one of its
    stages (counted from the model's own output), else ``num_prefix_tokens`` and a square grid."""
    if layout != TOKENS:
        return 0, None
    from ..models.view import StagesNotFoundError, model_view

    try:
        stage = model_view(model).stage(layer)
        if stage.shape[1] == shape[1]:
            return stage.num_prefix_tokens, stage.grid
    except (StagesNotFoundError, KeyError):
        pass
    return num_prefix_tokens(model), None


def _grid_for(t: torch.Tensor, prefix: int, grid) -> tuple[int, int] | None:
    # the probe's grid when the token count is the probe's (a non-square grid included), else square
    return tuple(grid) if grid is not None and t.shape[1] - prefix == grid[0] * grid[1] else None


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher's hint shape (and brings the hint to a common layout)."""

    def __init__(self, s_shape, s_layout, t_shape, t_layout, s_prefix=0, t_prefix=0):
        super().__init__()
        self.s_layout, self.t_layout, self.s_prefix, self.t_prefix = s_layout, t_layout, s_prefix, t_prefix
        self.s_grid = self.t_grid = None  # token grids at the probe (set by Hints.build from the model views)
        if VECTOR in (s_layout, t_layout):
            if s_layout != t_layout:
                raise ValueError(f"cannot regress a {s_layout} feature {s_shape} onto a {t_layout} hint {t_shape}")
            self.mode = "vector"
            self.proj = nn.Linear(s_shape[-1], t_shape[-1])
            return
        same_tokens = (
            s_layout == TOKENS and t_layout == TOKENS and s_shape[1] - s_prefix == t_shape[1] - t_prefix
        )
        if same_tokens:
            self.mode = "tokens"
            self.proj = nn.Linear(s_shape[-1], t_shape[-1])
            return
        self.mode = "map"
        s_ch = s_shape[-1] if s_layout in (NHWC, TOKENS) else s_shape[1]
        t_ch = t_shape[-1] if t_layout in (NHWC, TOKENS) else t_shape[1]
        # 1x1 conv + BN: the paper's convolutional regressor in its common modern form
        self.proj = nn.Sequential(nn.Conv2d(s_ch, t_ch, 1, bias=False), nn.BatchNorm2d(t_ch))

    def target(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "tokens":
            return t[:, self.t_prefix:]
        if self.mode == "map":
            return to_nchw(t, self.t_layout, self.t_prefix, grid_size=_grid_for(t, self.t_prefix, self.t_grid))
        return t

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """The projected student feature (channels mapped; a map keeps the student's spatial size:
        :meth:`align` brings it to the hint's size once that is known)."""
        if self.mode == "tokens":
            return self.proj(s[:, self.s_prefix:])
        if self.mode == "vector":
            return self.proj(s)
        return self.proj(to_nchw(s, self.s_layout, self.s_prefix, grid_size=_grid_for(s, self.s_prefix, self.s_grid)))

    def align(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred`` resized to the hint's actual spatial size (images come at any size, not only the probe's)."""
        return resize_map(pred, target.shape[-2:]) if self.mode == "map" else pred


class Hints:
    """Hint pairs as a part any method can use: regressors built from the probe, the hint loss.

    FitNets is built on it; BYOT adds it when given ``hint_layers`` and a teacher. Regressors
    are extra modules named ``f"{prefix}{i}"`` (run inside the wrapped forward, so data
    parallel syncs them).
    """

    def __init__(self, hint_layers, prefix: str = ""):
        self.hint_layers = hint_layers
        self.pairs = parse_hint_layers(hint_layers)  # "auto" is resolved in setup
        self.prefix = prefix

    def setup(self, student, teachers) -> None:
        if not self.pairs:
            if not teachers:
                raise ValueError("hint_layers need a teacher to take the hints from")
            self.pairs = parse_hint_layers(self.hint_layers, student, teachers[0])

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.pairs]

    def keys(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(len(self.pairs))]

    def build(self, student, teachers, probe) -> dict[str, nn.Module]:
        regs = {}
        for key, (s, t) in zip(self.keys(), self.pairs):
            (s_shape, s_layout), (t_shape, t_layout) = probe["student"][s], probe["teacher"][t]
            s_prefix, s_grid = _token_layout(student, s, s_shape, s_layout)
            t_prefix, t_grid = _token_layout(teachers[0], t, t_shape, t_layout)
            try:
                regs[key] = HintRegressor(s_shape, s_layout, t_shape, t_layout, s_prefix, t_prefix)
                regs[key].s_grid, regs[key].t_grid = s_grid, t_grid
            except ValueError as err:
                raise ValueError(f"hint pair {s}:{t}: {err}") from None
        return regs

    def forward(self, modules, student_features) -> dict[str, list]:
        return {"regressed": [modules[k](student_features[s]) for k, (s, _) in zip(self.keys(), self.pairs)],
                "regressors": [modules[k] for k in self.keys()]}

    def loss(self, extra_outputs, teacher_features) -> torch.Tensor:
        """Sum over the pairs of the hint loss (docs/methods.md), each regressed feature aligned
        to its hint's actual size first."""
        total = 0.0
        for (_, t), pred, regressor in zip(self.pairs, extra_outputs["regressed"], extra_outputs["regressors"]):
            target = regressor.target(teacher_features[t])
            total = total + hint_loss(regressor.align(pred, target), target)
        return total


class FitNets(DistillationMethod):
    name = "fitnets"
    epoch_arguments = ("hint_epochs",)
    arguments = FitNetsArguments
    paper = ("FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)", "https://arxiv.org/abs/1412.6550")
    title = "FitNets (hint-based distillation)"
    description = ("The student first learns to regress the teacher's intermediate feature maps (hints) through "
                   "small regressors, then is distilled on the teacher's soft targets with a decaying weight.")

    def __init__(self, args):
        super().__init__(args)
        self.hints = Hints(args.hint_layers)
        self.stage1_parameters: set[str] = set()
        self._later_modules: list[nn.Module] = []

    @classmethod
    def validate(cls, args) -> None:
        if args.distill_method != cls.name:
            return
        if not args.hint_layers:
            raise ValueError("distill_method='fitnets' needs hint_layers ('student.module:teacher.module' or 'auto')")
        parse_hint_layers(args.hint_layers)
        if (args.hint_epochs is not None and args.hint_epochs < 0) or args.hint_weight < 0:
            raise ValueError("hint_epochs and hint_weight must be >= 0")
        if args.hint_epochs == 0 and args.hint_weight == 0:
            raise ValueError("distill_method='fitnets' with hint_epochs=0 and hint_weight=0 never uses the hints (it "
                             "would be plain KD): give hint_epochs > 0 (stage-wise, as the paper; the default is a "
                             "quarter of training) or hint_weight > 0 (hints in the loss throughout)")
        if args.soft_weight_schedule not in SCHEDULES:
            raise ValueError(f"soft_weight_schedule must be one of {SCHEDULES}, got '{args.soft_weight_schedule}'")
        stagewise = args.hint_epochs is None and args.hint_weight == 0 or bool(args.hint_epochs)
        if stagewise and args.ddp_static_graph:
            raise ValueError("ddp_static_graph cannot follow FitNets' two stages (stage 1 trains fewer parameters)")
        if (stagewise or args.hint_weight == 0) and args.ddp_find_unused_parameters is None:
            # stage 1 leaves later layers without gradients, stage 2 without hints the regressors: DDP must be told
            args.ddp_find_unused_parameters = True

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.hints.pairs

    def layers(self):
        return Layers(student=tuple(self.hints.student_layers()), teacher=tuple(self.hints.teacher_layers()))

    def setup(self, student, teachers) -> None:
        self.hints.setup(student, teachers)

    def build_modules(self, student, teachers, probe):
        regs = nn.ModuleDict(self.hints.build(student, teachers, probe))
        self.stage1_parameters = self._parameters_feeding(student, self.hints.student_layers(), probe)
        def feeds_guided_layer(prefix: str, module: nn.Module) -> bool:
            own = [f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters(recurse=False)]
            return any(name in self.stage1_parameters for name in own)

        self._later_modules = [
            m for prefix, m in student.named_modules()
            if list(m.parameters(recurse=False)) and not feeds_guided_layer(prefix, m)
        ]
        return regs

    @staticmethod
    def _parameters_feeding(student, layers, probe) -> set[str]:
        """Names of the student parameters the guided layers' outputs depend on (found by autograd)."""
        from ..models import input_spec
        from ..models.taps import FeatureTaps, default_call

        spec = input_spec(student)
        x = torch.zeros(2, spec.in_chans, *spec.image_size)
        was_training = student.training
        student.eval()
        try:
            with FeatureTaps(student, layers) as taps, torch.enable_grad():
                default_call(student, x)
                feats = taps.pop()
                total = sum(f.float().sum() for f in feats.values())
                params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
                grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
        finally:
            student.train(was_training)
        return {n for (n, _), g in zip(params, grads) if g is not None}

    def stage1_steps(self, progress: Progress) -> float:
        """Optimizer steps in stage 1 (``hint_epochs``, or by default a quarter of training without hint_weight)."""
        if self.args.hint_epochs is None:
            return 0.25 * progress.max_steps if self.args.hint_weight == 0 else 0.0
        return progress.steps_at_epoch(self.args.hint_epochs)

    def in_stage1(self, progress: Progress) -> bool:
        if self.args.hint_epochs is not None:
            return progress.epoch < self.args.hint_epochs
        if self.args.hint_weight > 0:
            return False
        return progress.step < 0.25 * progress.max_steps if progress.max_steps else True

    def stage(self, progress):
        """Stage 1: the hints alone train the layers up to the guided one (the student and the teachers stop
        there; no BatchNorm statistics updates past it). Stage 2: KD with the soft weight annealed; the
        regressors run only where the loss has a hint term (hint_weight)."""
        if self.in_stage1(progress):
            return Stage(student_logits=False, teacher_logits=False, trainable=self.stage1_parameters,
                         held_in_eval=tuple(self._later_modules), values={"fitnets_stage": 1, "soft_weight": 0.0})
        return Stage(extras=self.args.hint_weight > 0,
                     values={"fitnets_stage": 2, "soft_weight": self.args.alpha * self.soft_weight(progress)})

    def forward_modules(self, modules, student_features):
        # regressors run inside the wrapped forward, so data parallel syncs their gradients
        return self.hints.forward(modules, student_features)

    def _hint(self, out: StepOutputs) -> torch.Tensor:
        return self.hints.loss(out.extra_outputs, out.teacher_features)

    def soft_weight(self, progress: Progress) -> float:
        """The stage-2 multiplier of the soft term, annealed from start (first stage-2 step) to end (last step)."""
        start = self.stage1_steps(progress)
        span = progress.max_steps - 1 - start
        frac = min(1.0, max(0.0, (progress.step - start) / span)) if span > 0 else 1.0
        return anneal(self.args.soft_weight_schedule, self.args.soft_weight_start, self.args.soft_weight_end, frac)

    def loss(self, out: StepOutputs):
        if self.in_stage1(out.progress):
            hint = self._hint(out)
            return hint, {"loss_hint": hint.detach()}
        alpha = self.args.alpha
        kd = soft_term(out.teacher_view_logits, out.teacher_logits, self.args.distill_loss, self.args.temperature,
                       self.args.logit_standardization)
        ce = self.ce(out.student_logits, out.labels) if alpha < 1 else kd.new_zeros(())
        total = (1 - alpha) * ce + alpha * self.soft_weight(out.progress) * kd
        terms = {"loss_ce": ce.detach(), TERM_NAMES[self.args.distill_loss]: kd.detach()}
        if self.args.hint_weight > 0:
            hint = self._hint(out)
            total = total + self.args.hint_weight * hint
            terms["loss_hint"] = hint.detach()
        return total, terms

    def hyperparameters(self):
        a = self.args
        return {
            "hint_layers": [f"{s}:{t}" for s, t in self.pairs],
            "hint_epochs": a.hint_epochs if a.hint_epochs is not None else
            ("first quarter of training" if a.hint_weight == 0 else 0),
            "hint_weight": a.hint_weight, "temperature": a.temperature, "alpha": a.alpha,
            "soft_weight_schedule": a.soft_weight_schedule, "soft_weight_start": a.soft_weight_start,
            "soft_weight_end": a.soft_weight_end, "distill_loss": a.distill_loss, **super().hyperparameters(),
        }
