"""Prototype fixes for the per-step overheads of the KD step (see results/parity_profile.md).

Not part of the package: each fix below is a proposed change to ``hf_distill/trainer.py``, written here as a
subclass so that the parity benchmarks can time the Trainer with and without it side by side in one run.
``PIECES`` names them; :func:`trainer_class` builds a ``DistillationTrainer`` subclass with the chosen ones.
Pieces marked "measure only" switch off a piece of ``transformers`` / ``accelerate`` machinery to say what
it costs; they are not proposed (they change behaviour, or belong to the library).
"""

from __future__ import annotations

import contextlib

from transformers.trainer_utils import IntervalStrategy

from hf_distill import DistillationTrainer


def grad_norm_logged(trainer) -> bool:
    """Whether the optimisation step being taken ends in a log (``DefaultFlowCallback``'s rule), i.e. whether
    the gradient norm the Trainer computes for the log is read. Called before ``global_step`` moves on."""
    args, state = trainer.args, trainer.state
    step = state.global_step + 1
    if args.logging_strategy == IntervalStrategy.EPOCH:
        return True  # the epoch's last step is logged; which step that is depends on the data: always compute
    if step == 1 and args.logging_first_step:
        return True
    return args.logging_strategy == IntervalStrategy.STEPS and step % state.logging_steps == 0


class _GradNormWhenLogged:
    """Fix 1. ``Trainer._run_epoch`` calls ``_get_grad_norm`` at every optimisation step; without clipping
    (``max_grad_norm=0``) that computes the norm of all gradients (``accelerator.clip_grad_norm_(params, inf)``:
    a ``get_total_norm`` pass over every gradient) only to put it in the log. Computed on logged steps only;
    with clipping the norm comes from the clip and is passed in unchanged."""

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and not grad_norm_logged(self):
            return None  # _maybe_log_save_evaluate reads it only when it logs
        return super()._get_grad_norm(model, grad_norm)


class _NoAutocastWithoutAmp:
    """Fix 2. ``teacher_outputs`` enters ``accelerator.autocast()`` every step; without mixed precision that builds
    an ``AcceleratorState`` and a nullcontext through a generator context manager for nothing."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        accelerator = self.accelerator
        if not accelerator.native_amp:
            accelerator.autocast = lambda autocast_handler=None: contextlib.nullcontext()


class _ProgressOncePerStep:
    """Fix 3. ``self.progress`` (a new ``Progress`` from the state) is built 2-3 times per step
    (``compute_loss``, ``teacher_outputs``, ``training_step``); one per global step is enough."""

    @property
    def progress(self):
        state = self.state
        key = (state.global_step, state.epoch, state.max_steps)
        cached = self.__dict__.get("_progress_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        value = DistillationTrainer.progress.fget(self)
        self.__dict__["_progress_cache"] = (key, value)
        return value


class _NoTermBookkeeping:
    """Measure only: the method's loss terms are dropped, so ``compute_loss`` does no per-term
    ``detach().float()`` / running sums (and ``log`` has no terms to report)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        loss = self.method.loss

        def loss_alone(step):
            return loss(step)[0], {}

        self.method.loss = loss_alone


_SKIP_LOMO = [False]


def _install_lomo_switch():
    import accelerate.optimizer as ao

    if getattr(ao.is_lomo_available, "_switch", False):
        return
    original = ao.is_lomo_available

    def is_lomo_available():
        return False if _SKIP_LOMO[0] else original()

    is_lomo_available._switch = True
    ao.is_lomo_available = is_lomo_available


class _NoLomoCheck:
    """Measure only: accelerate's ``AcceleratedOptimizer.step`` calls ``is_lomo_available()`` twice per step, an
    ``importlib.util.find_spec`` + metadata lookup on ``sys.path`` each time (uncached). Switched off during this
    trainer's ``train()`` only (the other runners of the process keep it)."""

    def train(self, *a, **kw):
        _install_lomo_switch()
        _SKIP_LOMO[0] = True
        try:
            return super().train(*a, **kw)
        finally:
            _SKIP_LOMO[0] = False


class _NoTrainPerStep:
    """Measure only: ``Trainer.training_step`` calls ``model.train()`` every step (a walk over every submodule);
    timm's loop calls ``task.train()`` once per epoch. Skipped here while the container is in training mode."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not model.training:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train = lambda mode=True: model  # instance attribute: shadows nn.Module.train for this call
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del model.train


class _OneParamGroup:
    """Measure only: the Trainer builds two parameter groups (decay / no decay), so the fused AdamW runs twice per
    step; with ``weight_decay=0`` both groups are the same and are merged here."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        groups = optimizer.param_groups
        if len(groups) == 2 and all(g["weight_decay"] == 0.0 for g in groups) and not optimizer.state:
            groups[0]["params"] = groups[0]["params"] + groups[1]["params"]
            del groups[1]
        return optimizer


PIECES = {
    "grad_norm": _GradNormWhenLogged,
    "autocast": _NoAutocastWithoutAmp,
    "progress": _ProgressOncePerStep,
    "terms": _NoTermBookkeeping,
    "lomo": _NoLomoCheck,
    "train": _NoTrainPerStep,
    "groups": _OneParamGroup,
}
PROPOSED = ("grad_norm", "autocast")


def trainer_class(pieces) -> type:
    """A ``DistillationTrainer`` subclass with the given fixes (names of ``PIECES``)."""
    pieces = list(pieces)
    if not pieces:
        return DistillationTrainer
    bases = tuple(PIECES[p] for p in pieces) + (DistillationTrainer,)
    return type("Patched_" + "_".join(pieces), bases, {})
