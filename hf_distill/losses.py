"""Distillation losses as pure functions of tensors (see ``docs/methods.md`` for the formulas)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each sample's logits as z-scores over the classes,
    ``(z - mean(z)) / (std(z) + eps)`` with the unbiased std, as the authors' code."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            standardize: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax_T(z_t) || softmax_T(z_s))`` with batch-mean reduction.

    The ``T^2`` factor keeps gradient magnitudes independent of ``T`` (Hinton et al.).
    ``standardize`` z-scores both logit vectors first (:func:`standardize_logits`).
    Computed in float32 so half-precision logits do not underflow.
    """
    t = float(temperature)
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def hard_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Hard-label distillation (DeiT): cross-entropy against the teacher's argmax."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``(T^2 * TCKD, T^2 * NCKD)``, each with batch-mean reduction.

    TCKD is the KL between the binary (target, rest) probabilities of teacher and student; NCKD the
    KL between their distributions over the non-target classes (the target masked out of the softmax).
    Classic KD equals ``T^2 * (TCKD + (1 - p_t[y]) * NCKD)`` per sample.
    """
    t = float(temperature)
    zs, zt = student_logits.float(), teacher_logits.float()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    zs, zt = zs / t, zt / t
    target = F.one_hot(labels, zs.shape[-1]).bool()
    log_ps, log_pt = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
    # binary (target, rest) in log space: log p_y and log(1 - p_y), stable for confident logits
    def binary(log_p):
        log_py = log_p[target]
        return torch.stack([log_py, torch.log1p(-log_py.exp().clamp(max=1 - 1e-7))], dim=-1)

    tckd = F.kl_div(binary(log_ps), binary(log_pt), reduction="batchmean", log_target=True)
    # non-target distributions: the target pushed out of the softmax by a large finite offset (as the
    # authors' code), so its probability is exp(-1000) = 0 with no inf/nan reaching the gradients
    log_qs = F.log_softmax(zs - 1000.0 * target, dim=-1)
    log_qt = F.log_softmax(zt - 1000.0 * target, dim=-1)
    nckd = F.kl_div(log_qs, log_qt, reduction="batchmean", log_target=True)
    return tckd * (t * t), nckd * (t * t)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (DIST's ``rho``)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang et al., NeurIPS 2022): ``(T^2 * L_inter, T^2 * L_intra)``.

    With ``P = softmax_T(z)``: inter-class ``1 - mean_i rho(P_s[i], P_t[i])`` (each sample over the
    classes), intra-class ``1 - mean_j rho(P_s[:, j], P_t[:, j])`` (each class over the batch).
    """
    t = float(temperature)
    ps = F.softmax(student_logits.float() / t, dim=-1)
    pt = F.softmax(teacher_logits.float() / t, dim=-1)
    inter = 1.0 - pearson_rows(ps, pt).mean()
    intra = 1.0 - pearson_rows(ps.t(), pt.t()).mean()
    return inter * (t * t), intra * (t * t)


def label_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the labels (``label_smoothing`` as ``--label_smoothing_factor``), in float32.

    ``labels`` are class ids, or soft labels ``[B, C]`` (mixup / CutMix), which carry their smoothing already.
    """
    if labels.is_floating_point():
        return F.cross_entropy(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels, label_smoothing=float(label_smoothing))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    kind: str = "kl",
    label_smoothing: float = 0.0,
    standardize: bool = False,
    teacher_view_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton KD: ``(1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_t || p_s)``.

    ``kind="mse"`` replaces the KL term by L2 logit regression (noisy-teacher setting), ``"hard"``
    by CE against the teacher's argmax (DeiT). ``teacher_view_logits`` (a distillation head's
    logits) takes the teacher term in place of ``student_logits``, which keep the label term; without a
    label term (``alpha=1`` or no labels) both heads learn the teacher (half the term each), since
    both are half of every prediction. Returns the total and its terms (unweighted) for logging.
    Without labels the CE term is 0.
    """
    kd = soft_term(student_logits if teacher_view_logits is None else teacher_view_logits, teacher_logits, kind,
                   temperature, standardize)
    if labels is None or alpha == 1.0:
        if teacher_view_logits is not None:  # no label term: the class head learns the teacher too
            kd = 0.5 * (kd + soft_term(student_logits, teacher_logits, kind, temperature, standardize))
        ce = kd.new_zeros(())
    else:
        ce = label_ce(student_logits, labels, label_smoothing)
    total = (1.0 - alpha) * ce + alpha * kd
    return total, {"loss_ce": ce.detach(), TERM_NAMES[kind]: kd.detach()}


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


DISTILL_LOSSES = ("kl", "mse", "hard")
TERM_NAMES = {"kl": "loss_kd", "mse": "loss_mse", "hard": "loss_hard"}


def soft_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float,
              standardize: bool = False) -> torch.Tensor:
    """The teacher term of KD-style losses: ``"kl"`` (T^2 * KL, optionally on standardised logits),
    ``"mse"`` (logit regression) or ``"hard"`` (CE against the teacher's argmax)."""
    if kind == "kl":
        return soft_kl(student_logits, teacher_logits, temperature, standardize)
    if kind == "mse":
        return logit_mse(student_logits, teacher_logits)
    if kind == "hard":
        return hard_ce(student_logits, teacher_logits)
    raise ValueError(f"unknown distill_loss '{kind}'; valid: {', '.join(DISTILL_LOSSES)}")


def perturb_logits(logits: torch.Tensor, std: float, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy teacher (Sau & Balasubramanian, 2016): with probability ``prob`` per sample,
    ``z * (1 + xi)`` with ``xi ~ N(0, std^2)`` elementwise; other samples unchanged."""
    if std == 0.0 or prob == 0.0:
        return logits
    noise = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator) * std
    chosen = torch.rand(logits.shape[0], device=logits.device, generator=generator) < prob
    return torch.where(chosen.unsqueeze(-1), logits * (1.0 + noise), logits)
