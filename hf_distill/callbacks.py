"""Trainer callbacks of the command line and the demo."""

from __future__ import annotations

import math
import time
from typing import Callable

from transformers import TrainerCallback


class EpochPrinter(TrainerCallback):
    """One line per epoch (epoch, step, mean logged loss, seconds): a sign of life where progress bars are off.

    ``every`` prints every n-th epoch only (and the last). With ``logging_strategy="epoch"`` the
    line waits for that epoch's log, so the loss it shows is the epoch's own.
    """

    def __init__(self, print_fn: Callable[[str], None] = print, prefix: str = "", every: int = 1):
        self.print_fn, self.prefix, self.every = print_fn, prefix, max(1, int(every))
        self.start = time.time()
        self.losses: list[float] = []
        self.pending = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if self.pending:
                self._line(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) % self.every and state.global_step < state.max_steps:
            return
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "epoch":
            self.pending = True  # the epoch's loss is logged right after this
        else:
            self._line(args, state)

    def _line(self, args, state):
        self.pending = False
        if not state.is_world_process_zero:
            return
        total = getattr(state, "num_train_epochs", None) or args.num_train_epochs
        loss = f", loss {sum(self.losses) / len(self.losses):.4f}" if self.losses else ""
        self.losses = []
        epoch = f"{state.epoch:.0f}" if abs(state.epoch - round(state.epoch)) < 1e-6 else f"{state.epoch:.2f}"
        self.print_fn(f"{self.prefix}epoch {epoch}/{total:g}: step {state.global_step}/{state.max_steps}"
                      f"{loss} ({time.time() - self.start:.0f} s)")


class SetEpochCallback(TrainerCallback):
    """Tells a dataset whose items depend on the epoch (random views of a teacher cache, the epoch order of
    mixed batches) which epoch begins. accelerate forwards ``set_epoch`` to the dataset only when one
    process trains; with several, only a callback reaches it. Dataloader workers receive the epoch when
    they start (each epoch, unless ``dataloader_persistent_workers``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor(float(state.epoch or 0.0) + 1e-6)))
