"""The one interface every distillation method implements.

A method is a small object: it declares what it needs (class attributes: teacher or not, logits or
backbone features, which arguments it reads) and implements the hooks in ``HOOKS``: it may add
trainable modules (regressors, exits, branches), ask for intermediate features by module name, say
what each point of its schedule trains (:class:`Stage`), turn one step's outputs into a loss plus
named terms to log, and name what it evaluates. The trainer does everything else (devices,
precision, teachers, saving) and never names a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Progress:
    """Where training stands, for schedules (stage-wise training, annealing)."""

    step: int = 0  # optimizer updates done before this one
    max_steps: int = 0
    epoch: float = 0.0
    num_epochs: float = 0.0
    steps_per_epoch: int = 0  # optimizer updates per epoch (0 when unknown, e.g. before training)

    @property
    def fraction(self) -> float:
        """How far training is, 0 at the first step and 1 at the last (whatever max_steps or epochs say)."""
        return min(1.0, self.step / (self.max_steps - 1)) if self.max_steps > 1 else 0.0

    def steps_at_epoch(self, epoch: float) -> float:
        """The step at which ``epoch`` (fractional) begins."""
        if self.steps_per_epoch:
            return epoch * self.steps_per_epoch
        return epoch / self.num_epochs * self.max_steps if self.num_epochs else 0.0


@dataclass(frozen=True)
class Layers:
    """Module names whose outputs a method's loss reads (forward hooks are placed there)."""

    student: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """What training does at one point of a method's schedule (:meth:`DistillationMethod.stage`).

    The defaults train everything with labels and both models' logits; a staged method (FitNets'
    hint stage) narrows them."""

    labels: bool = True  # the batches must carry labels
    student_logits: bool = True  # False: the student's forward stops at its last tapped layer
    teacher_logits: bool = True  # False: the teachers stop at their last tapped layer
    extras: bool = True  # the method's extra modules run (False where the loss has no term for them)
    trainable: frozenset[str] | None = None  # student parameters updated now (None: all of them)
    held_in_eval: tuple[nn.Module, ...] = ()  # student modules kept in eval mode (no BatchNorm updates)
    values: dict[str, float] = field(default_factory=dict)  # scalars to log (schedules' current weights)


@dataclass
class StepOutputs:
    """Everything a method may need to compute one batch's loss."""

    student_logits: torch.Tensor | None  # None when the method asked for features only
    labels: torch.Tensor | None
    # a distillation head's logits (DeiT-style students), which then take every teacher term
    student_dist_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_outputs: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)

    @property
    def teacher_view_logits(self) -> torch.Tensor | None:
        """The logits that learn from the teacher: the distillation head's if there is one, else the student's."""
        return self.student_dist_logits if self.student_dist_logits is not None else self.student_logits


class DistillationMethod:
    """Base class; subclasses set ``name`` and implement :meth:`loss`.

    ``arguments`` is an optional dataclass whose fields join
    :class:`~hf_distill.DistillationTrainingArguments` (so a new method adds its own
    arguments in its own file).
    """

    name: ClassVar[str]
    arguments: ClassVar[type | None] = None
    also_uses: ClassVar[tuple[str, ...]] = ()  # arguments of another method's dataclass this one reads too
    needs_teacher: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True  # run a teacher when one is given (BYOT: optional)
    default_temperature: ClassVar[float] = 4.0
    preset: ClassVar[dict] = {}  # defaults for shared arguments the user left unset (None)
    paper: ClassVar[tuple[str, str] | None] = None  # (title, url) for model cards
    # model cards: the method's human name and one sentence on what it does (an instance may refine them
    # in setup, e.g. BYOT with a teacher)
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # the kind of each evaluation metric the method reports (regular expression over the name without
    # "eval_" -> kind), first match wins: accuracy, knn, cosine, agreement, divergence
    metric_kinds: ClassVar[dict[str, str]] = {
        r"(teacher\d*_|teacher_|exit\d+_|ensemble_|\w+_head_)?accuracy(_student_input)?": "accuracy",
        r"teacher_agreement": "agreement",
        r"teacher_kl": "divergence",
    }
    uses_alpha: ClassVar[bool] = True  # False: refuse an alpha given by the user, saying what weighs the terms
    alpha_instead: ClassVar[str] = ""
    standardizes_logits: ClassVar[bool] = True  # logit_standardization reaches its KL teacher term
    mixes: ClassVar[bool] = True  # trains on mixup/CutMix batches (soft labels); False: ``no_mixing`` says why
    no_mixing: ClassVar[str] = ""
    # what the models give the loss: class logits, or backbone features (summary vector + spatial map,
    # hf_distill.models.features.backbone_features); with "features", what the method evaluates is the metrics
    student_output: ClassVar[str] = "logits"
    teacher_output: ClassVar[str] = "logits"
    # arguments counted in epochs (schedules): a stream must then have a known length to measure epochs in
    epoch_arguments: ClassVar[tuple[str, ...]] = ()
    # what hyperparameter_search tunes by default besides the learning rate (hf_distill.search format)
    search_space: ClassVar[dict] = {"temperature": {"low": 1.0, "high": 8.0}, "alpha": {"low": 0.1, "high": 1.0}}

    def __init__(self, args):
        self.args = args

    # class declarations a new method may set
    without_labels: ClassVar[str] = ""  # how to train this method on unlabelled batches, if it can (error hint)

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The label term's cross-entropy, with ``--label_smoothing_factor`` (a helper, not a hook)."""
        from ..losses import label_ce

        return label_ce(logits, labels, self.args.label_smoothing_factor)

    # --- the hooks (HOOKS): set-up ----------------------------------------------------------
    @classmethod
    def validate(cls, args) -> None:
        """Raise ``ValueError`` for argument values this method cannot use."""

    def setup(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        """Called first, with the models (e.g. to resolve ``auto`` layer choices)."""

    def layers(self) -> Layers:
        """Student and teacher modules whose outputs the loss needs (forward hooks are placed there)."""
        return Layers()

    def build_modules(self, student: nn.Module, teachers: list[nn.Module], probe: dict) -> nn.ModuleDict:
        """Extra trainable modules, trained with the student and never exported with it.

        ``probe`` holds the feature shapes found by one dry forward pass
        (``probe["student"][layer]``, ``probe["teacher"][layer]``).
        """
        return nn.ModuleDict()

    # --- training -----------------------------------------------------------------------
    def stage(self, progress: Progress) -> Stage:
        """What training does at this point of the method's schedule (see :class:`Stage`); asked once per
        step, before the forward, and for evaluation."""
        return Stage()

    def forward_modules(self, modules: nn.ModuleDict, student_features: dict) -> dict[str, Any]:
        """Run the extra modules on the student's features, inside the wrapped forward.

        Runs under the data-parallel wrapper so the extra modules' gradients are reduced.
        """
        return {}

    def loss(self, out: StepOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        """What the method evaluates besides the student's logits, per example: a ``[batch, classes]`` tensor
        is scored as ``{name}_accuracy`` (exits, branches); a ``[batch]`` tensor is averaged as ``{name}``
        (e.g. the cosine to each teacher)."""
        return {}

    def save(self, student: nn.Module, extras: nn.ModuleDict, output_dir: str) -> None:
        """Write method-specific files next to the saved student (only when asked to export them)."""

    def check_teacher_cache(self, cache) -> None:
        """Raise ``ValueError`` when this run cannot read what ``cache`` (a teacher-output cache) stores.

        The default serves full logits and top-k logits (rebuilt with their tail), except where
        ``logit_standardization`` needs every logit."""
        if cache.top_k and self.args.logit_standardization:
            raise ValueError(f"logit_standardization needs the teacher's full logits; this cache keeps only the top "
                             f"{cache.top_k}: rebuild it without --top_k")

    def card_notes(self) -> dict[str, str]:
        """Facts for the model card's notes (e.g. which student an SFTN teacher was made for)."""
        return {}

    @classmethod
    def metric_kind(cls, name: str) -> str | None:
        """The kind of an evaluation metric (``eval_`` prefix allowed), or None for one the method does not
        declare (the card lists those as other metrics)."""
        import re

        name = name[len("eval_"):] if name.startswith("eval_") else name
        return next((kind for pattern, kind in cls.metric_kinds.items() if re.fullmatch(pattern, name)), None)

    def hyperparameters(self) -> dict[str, Any]:
        """The arguments that define this run of the method, for model cards.

        Subclasses return their own merged with these: the settings every method shares that shaped the run
        (mixup / CutMix, teacher noise, logit standardisation, the teacher ensemble)."""
        a, params = self.args, {}
        mixing = a.mixing
        if mixing.enabled:  # timm's Mixup arguments, each batch mixed before student and teacher see it
            params.update(mixup_alpha=mixing.mixup_alpha, cutmix_alpha=mixing.cutmix_alpha)
            if mixing.cutmix_minmax is not None:
                params["cutmix_minmax"] = list(mixing.cutmix_minmax)
            params.update(mixup_prob=mixing.mixup_prob, mixup_mode=mixing.mixup_mode)
            if mixing.mixup_alpha > 0 and (mixing.cutmix_alpha > 0 or mixing.cutmix_minmax is not None):
                params["mixup_switch_prob"] = mixing.mixup_switch_prob
        if a.teacher_noise_prob and a.teacher_noise_std:
            params.update(teacher_noise_std=a.teacher_noise_std, teacher_noise_prob=a.teacher_noise_prob)
        if a.logit_standardization:
            params["logit_standardization"] = True
        if len(a.teacher_names) > 1:
            params["teacher_ensemble"] = a.teacher_ensemble
        return params


# The hooks a method may override (each is overridden by at least two methods; tests/test_method_interface.py)
HOOKS = ("validate", "setup", "layers", "build_modules", "stage", "forward_modules", "loss", "evaluate", "save",
         "check_teacher_cache", "card_notes", "hyperparameters")
