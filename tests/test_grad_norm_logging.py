"""The gradient norm the Trainer logs: without clipping it is computed on logged steps only (as timm's loop
computes none), and what is logged is the norm of that step's gradients."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import PlainClassifier


def _run(make_args, digits_small, monkeypatch, **kw):
    from hf_distill import DistillationTrainer

    train, _ = digits_small
    trainer = DistillationTrainer(model=PlainClassifier(seed=1), teacher_model=PlainClassifier(seed=2),
                                  args=make_args(distill_method="kd", **kw), train_dataset=train)
    norms = []  # (step about to be taken, the norm of the gradients then), computed independently
    original = trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        grads = [p.grad for p in parameters if p.grad is not None]
        norms.append((trainer.state.global_step + 1, math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))))
        return original(parameters, max_norm, *a, **k)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", spy)
    trainer.train()
    logged = {e["step"]: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
    return norms, logged


def test_no_clipping_computes_the_norm_on_logged_steps_only(make_args, digits_small, monkeypatch):
    norms, logged = _run(make_args, digits_small, monkeypatch, max_grad_norm=0.0, max_steps=6, logging_steps=3)
    assert [s for s, _ in norms] == [3, 6]  # not at steps 1, 2, 4, 5
    assert sorted(logged) == [3, 6]
    for step, norm in norms:
        assert logged[step] == pytest.approx(norm, rel=1e-5)


def test_logging_first_step_and_epoch_strategy_still_log_the_norm(make_args, digits_small, monkeypatch):
    norms, logged = _run(make_args, digits_small, monkeypatch, max_grad_norm=0.0, max_steps=4, logging_steps=3,
                         logging_first_step=True)
    assert [s for s, _ in norms] == [1, 3] and sorted(logged) == [1, 3]
    norms, logged = _run(make_args, digits_small, monkeypatch, max_grad_norm=0.0, max_steps=16,
                         logging_strategy="epoch")  # 128 images / 16 = 8 steps an epoch
    assert sorted(logged) == [8, 16]
    by_step = dict(norms)
    for step, value in logged.items():
        assert value == pytest.approx(by_step[step], rel=1e-5)


def test_clipping_still_clips_and_logs_every_logged_step(make_args, digits_small, monkeypatch):
    norms, logged = _run(make_args, digits_small, monkeypatch, max_grad_norm=0.5, max_steps=4, logging_steps=2)
    assert [s for s, _ in norms] == [1, 2, 3, 4]  # the clip needs the norm at every step
    assert sorted(logged) == [2, 4]
    by_step = dict(norms)
    for step, value in logged.items():
        assert value == pytest.approx(by_step[step], rel=1e-5)
