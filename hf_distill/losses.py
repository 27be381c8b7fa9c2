"""Distillation losses as pure functions of tensors (see ``docs/methods.md`` for the formulas)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax_T(z_t) || softmax_T(z_s))`` with batch-mean reduction.

    The ``T^2`` factor keeps gradient magnitudes independent of ``T`` (Hinton et al.).
    Computed in float32 so half-precision logits do not underflow.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def label_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the labels (``label_smoothing`` as ``--label_smoothing_factor``), in float32."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=float(label_smoothing))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    kind: str = "kl",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton KD: ``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_t || p_s)``.

    ``kind="mse"`` replaces the KL term by L2 logit regression (noisy-teacher setting).
    Returns the total and its terms (unweighted) for logging. Without labels the CE term is 0.
    """
    kd = soft_term(student_logits, teacher_logits, kind, temperature)
    if labels is None or alpha == 1.0:
        ce = kd.new_zeros(())
    else:
        ce = label_ce(student_logits, labels, label_smoothing)
    total = (1.0 - alpha) * ce + alpha * kd
    return total, {"loss_ce": ce.detach(), ("loss_kd" if kind == "kl" else "loss_mse"): kd.detach()}


def logit_mse(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """L2 logit regression ``1/2 * ||z_s - z_t||^2``, summed over classes, mean over the batch."""
    diff = student_logits.float() - target_logits.float()
    return 0.5 * diff.pow(2).sum(dim=-1).mean()


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets ``1/2 * ||r(h_s) - h_t||^2``, summed over a sample's features, mean over the batch."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint shapes differ: regressed student {tuple(student_features.shape)} "
            f"vs teacher {tuple(teacher_features.shape)}"
        )
    diff = (student_features.float() - teacher_features.float()).flatten(1)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


def soft_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """The teacher term of KD-style losses: ``"kl"`` (T^2 * KL) or ``"mse"`` (logit regression)."""
    if kind == "kl":
        return soft_kl(student_logits, teacher_logits, temperature)
    if kind == "mse":
        return logit_mse(student_logits, teacher_logits)
    raise ValueError(f"unknown distill_loss '{kind}'")


def perturb_logits(logits: torch.Tensor, std: float, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy teacher (Sau & Balasubramanian, 2016): with probability ``prob`` per sample,
    ``z * (1 + xi)`` with ``xi ~ N(0, std^2)`` elementwise; other samples unchanged."""
    if std == 0.0 or prob == 0.0:
        return logits
    noise = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator) * std
    chosen = torch.rand(logits.shape[0], device=logits.device, generator=generator) < prob
    return torch.where(chosen.unsqueeze(-1), logits * (1.0 + noise), logits)
