"""Which optimisation steps the Trainer logs: what is measured only to be logged is measured on those alone."""

from __future__ import annotations

from transformers.trainer_utils import IntervalStrategy


def logs_this_step(args, state) -> bool:
    """Whether the optimisation step being taken is logged (the rule of the Trainer's DefaultFlowCallback, asked
    before ``global_step`` moves on). An epoch's last step is not known ahead: True with ``logging_strategy="epoch"``."""
    step = state.global_step + 1
    if args.logging_strategy == IntervalStrategy.EPOCH:
        return True
    return (step == 1 and args.logging_first_step) or (
        args.logging_strategy == IntervalStrategy.STEPS and step % state.logging_steps == 0)
