"""Logit-level ("decoupling") transfer losses: forward KL, reverse KL, generalized JSD and DKD.

Every loss takes ``student_logits`` and ``teacher_logits`` of shape ``(..., V)`` (any leading shape) and
``labels`` of shape ``(...)``: next-token targets *aligned with positions*, i.e. ``labels[..., t]`` is the token
that ``logits[..., t, :]`` predicts. Hugging Face causal-LM labels are unshifted; turn them into aligned
targets with :func:`kd_plugins.functional.shift_labels` first. Positions whose label is ``ignore_index``
contribute nothing; only DKD reads the label values themselves (the other losses use them as a mask).

Per-token losses are computed in fp32 on ``log_softmax(logits / T)``, scaled by ``T**2`` (Hinton et al. 2015,
so gradient magnitudes do not shrink as ``T`` grows), and reduced with
:func:`kd_plugins.functional.normalize_token_sum`: the sum over valid tokens divided by ``num_items_in_batch``
when given, else by the number of valid tokens. An all-masked batch gives an exact 0 with zero gradients.

Gradients flow to every input that requires them, the teacher's included; detach the teacher logits if it is
frozen. Logits must be finite (a ``-inf`` teacher logit would give ``0 * inf``).

The per-token functions (``_<loss>_per_token``) take flattened rows ``(N, V)`` and labels ``(N,)`` of valid
positions only; :func:`check_loss_options` validates a loss's options and returns its per-token function (the fused
losses' generic engine differentiates it chunk by chunk when a loss has no analytic kernel).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature, normalize_token_sum, valid_mask

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "dkd"]


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Forward KL, ``T**2 * KL(p_T || p_S)``: classic KD (Hinton et al. 2015), mode-covering.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``, same shape.
        labels: ``(...)`` targets aligned with positions (``labels[t]`` is what ``logits[t]`` predicts; see
            :func:`~kd_plugins.functional.shift_labels`); only used as a mask here.
        temperature: softmax temperature ``T > 0``; the loss is multiplied by ``T**2``.
        ignore_index: label value of positions without a target.
        num_items_in_batch: normaliser (target tokens over the whole accumulation step), or None for this
            batch's valid-token count.

    Returns:
        0-dim fp32 tensor.
    """
    return _reduce(
        "forward_kl", student_logits, teacher_logits, labels,
        options={}, temperature=temperature, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Reverse KL, ``T**2 * KL(p_S || p_T)``: mode-seeking (as in MiniLLM / on-policy GKD).

    Arguments, shapes and reduction as in :func:`forward_kl` (``labels`` aligned with positions, used as a
    mask). Returns a 0-dim fp32 tensor.
    """
    return _reduce(
        "reverse_kl", student_logits, teacher_logits, labels,
        options={}, temperature=temperature, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024, GKD), with TRL's semantics.

    ``M = beta * p_T + (1 - beta) * p_S`` and ``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``,
    computed in log space (``log M`` by ``logaddexp``). As in TRL's ``generalized_jsd_loss``, ``beta = 0`` is
    the forward KL ``KL(p_T || p_S)`` and ``beta = 1`` the reverse KL ``KL(p_S || p_T)`` (special cases: the
    mixture form itself tends to 0 at both ends). Unlike TRL the loss is
    multiplied by ``T**2`` (so ``ours == T**2 * TRL`` with ``reduction="batchmean"``).

    Args:
        beta: interpolation in ``[0, 1]``.
        Others as in :func:`forward_kl` (``labels`` aligned with positions, used as a mask).

    Returns:
        0-dim fp32 tensor.
    """
    return _reduce(
        "generalized_jsd", student_logits, teacher_logits, labels,
        options={"beta": beta}, temperature=temperature, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679) for next-token prediction.

    With ``t`` the gold next token (``labels``), ``b = [p_t, 1 - p_t]`` the binary target/non-target
    distribution and ``p_hat`` the non-target distribution renormalised (``p_j / (1 - p_t)``, ``j != t``)::

        TCKD = KL(b^T || b^S)        NCKD = KL(p_hat^T || p_hat^S)
        KL(p^T || p^S) = TCKD + (1 - p_t^T) * NCKD        (classic KD couples NCKD to the teacher's confidence)
        DKD = T**2 * (alpha * TCKD + beta * NCKD)

    So ``dkd(alpha=1, beta=1)`` differs from :func:`forward_kl` only in dropping the ``(1 - p_t^T)`` weight on
    NCKD. ``log(1 - p_t)`` is computed exactly as the log-sum-exp over the non-target logits.

    Defaults ``alpha=1, beta=2``. For reference: mdistiller (vision) used ``alpha=1, beta=8, T=4``; SakanaAI's
    TAID LLM port used ``beta=0.5, T=1``.

    Args:
        labels: ``(...)`` gold targets aligned with positions (``labels[t]`` is the token ``logits[t]``
            predicts; see :func:`~kd_plugins.functional.shift_labels`); values in ``[0, V)`` or ``ignore_index``.
        alpha: TCKD weight, ``>= 0``.
        beta: NCKD weight, ``>= 0``.
        Others as in :func:`forward_kl`. Needs ``V >= 2``.

    Returns:
        0-dim fp32 tensor.
    """
    return _reduce(
        "dkd", student_logits, teacher_logits, labels,
        options={"alpha": alpha, "beta": beta}, temperature=temperature, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


# --- validation and reduction (shared by all four, and by fused.py) -----------------------------------------


def _check_beta_unit(beta: float = 0.5) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")


def _check_dkd_weights(alpha: float = 1.0, beta: float = 2.0) -> None:
    if not alpha >= 0:
        raise ValueError(f"dkd: alpha must be >= 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"dkd: beta must be >= 0, got {beta}")


# name -> (per-token function, validator of its options). Validators take the options as keywords, so an
# unknown option raises Python's TypeError naming it.
_LOSSES: dict[str, tuple[Callable[..., Tensor], Callable[..., None]]] = {}


def check_loss_options(loss: str, options: dict) -> Callable[..., Tensor]:
    """Validate ``options`` for ``loss`` and return its per-token function."""
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(sorted(_LOSSES))}")
    per_token, check = _LOSSES[loss]
    check(**options)
    return per_token


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a vocabulary dimension (..., V)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student logits have V={student_logits.shape[-1]}, teacher logits have "
            f"V={teacher_logits.shape[-1]}; teacher and student need the same tokenizer/vocabulary"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits "
            f"{tuple(teacher_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (labels aligned with positions, see shift_labels)"
        )


def _reduce(
    loss: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    options: dict,
    temperature: float,
    ignore_index: int,
    num_items_in_batch: Tensor | int | None,
) -> Tensor:
    check_temperature(temperature)
    _check_logits(student_logits, teacher_logits, labels)
    per_token_fn = check_loss_options(loss, options)
    vocab = student_logits.shape[-1]
    mask = valid_mask(labels, ignore_index).reshape(-1)
    # Only valid rows are computed at all; normalize_token_sum then sees the valid rows with an all-true mask.
    student = student_logits.reshape(-1, vocab)[mask]
    teacher = teacher_logits.reshape(-1, vocab)[mask]
    targets = labels.reshape(-1)[mask]
    per_token = per_token_fn(student, teacher, targets, temperature=temperature, **options)
    return normalize_token_sum(per_token, torch.ones_like(per_token, dtype=torch.bool), num_items_in_batch)


# --- per-token losses: (N, V), (N, V), (N,) -> (N,) fp32, already scaled by T**2 ----------------------------
#
# Written with log-sum-exps and row dot-products rather than full log-prob tensors: e.g.
# KL(p_T||p_S) = <p_T, z_T - z_S> - lse(z_T) + lse(z_S) with z = logits / T. Same values, fewer full-vocabulary
# temporaries, which matters for the fused path.


def upcast(x: Tensor) -> Tensor:
    """At least fp32 (float64 stays float64, so gradcheck can run in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    logits = upcast(logits)
    return logits if temperature == 1.0 else logits / temperature


def _forward_kl_per_token(s_logits: Tensor, t_logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    zs, zt = _scaled(s_logits, temperature), _scaled(t_logits, temperature)
    lse_t = torch.logsumexp(zt, dim=-1)
    p_t = torch.exp(zt - lse_t.unsqueeze(-1))
    kl = (p_t * (zt - zs)).sum(-1) - lse_t + torch.logsumexp(zs, dim=-1)
    return kl * temperature**2


def _reverse_kl_per_token(s_logits: Tensor, t_logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    zs, zt = _scaled(s_logits, temperature), _scaled(t_logits, temperature)
    lse_s = torch.logsumexp(zs, dim=-1)
    p_s = torch.exp(zs - lse_s.unsqueeze(-1))
    kl = (p_s * (zs - zt)).sum(-1) - lse_s + torch.logsumexp(zt, dim=-1)
    return kl * temperature**2


def _generalized_jsd_per_token(
    s_logits: Tensor, t_logits: Tensor, labels: Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    if beta == 0.0:
        return _forward_kl_per_token(s_logits, t_logits, labels, temperature=temperature)
    if beta == 1.0:
        return _reverse_kl_per_token(s_logits, t_logits, labels, temperature=temperature)
    log_ps = torch.log_softmax(_scaled(s_logits, temperature), dim=-1)
    log_pt = torch.log_softmax(_scaled(t_logits, temperature), dim=-1)
    log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
    kl_teacher = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_student = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return (beta * kl_teacher + (1.0 - beta) * kl_student) * temperature**2


def _dkd_per_token(
    s_logits: Tensor,
    t_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 1.0,
) -> Tensor:
    tckd, nckd, _ = _dkd_parts(s_logits, t_logits, labels, temperature=temperature)
    return (alpha * tckd + beta * nckd) * temperature**2


def _dkd_parts(
    s_logits: Tensor, t_logits: Tensor, labels: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(TCKD, NCKD, log p_t^T)``, unscaled by ``T**2``."""
    vocab = s_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"dkd needs a vocabulary of at least 2 tokens, got V={vocab}")
    zs, zt = _scaled(s_logits, temperature), _scaled(t_logits, temperature)
    index = labels.long().unsqueeze(-1)
    target = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, index, True)
    neg_inf = torch.tensor(float("-inf"), dtype=zs.dtype, device=zs.device)

    lse_s, lse_t = torch.logsumexp(zs, dim=-1), torch.logsumexp(zt, dim=-1)
    # log-sum-exp over non-target logits: log(1 - p_t) = lse_nt - lse, exact even when p_t -> 1
    lse_nt_s = torch.logsumexp(torch.where(target, neg_inf, zs), dim=-1)
    zt_rest = torch.where(target, neg_inf, zt)
    lse_nt_t = torch.logsumexp(zt_rest, dim=-1)
    log_pt_s = zs.gather(-1, index).squeeze(-1) - lse_s
    log_pt_t = zt.gather(-1, index).squeeze(-1) - lse_t
    log_rest_s, log_rest_t = lse_nt_s - lse_s, lse_nt_t - lse_t

    tckd = log_pt_t.exp() * (log_pt_t - log_pt_s) + log_rest_t.exp() * (log_rest_t - log_rest_s)
    # KL(p_hat^T || p_hat^S) = <p_hat^T, z_T - z_S> - lse_nt_t + lse_nt_s; p_hat^T is exactly 0 at the target
    p_hat_t = torch.exp(zt_rest - lse_nt_t.unsqueeze(-1))
    nckd = (p_hat_t * (zt - zs)).sum(-1) - lse_nt_t + lse_nt_s
    return tckd, nckd, log_pt_t


def _check_no_options() -> None:
    return None


_LOSSES.update(
    {
        "forward_kl": (_forward_kl_per_token, _check_no_options),
        "reverse_kl": (_reverse_kl_per_token, _check_no_options),
        "generalized_jsd": (_generalized_jsd_per_token, _check_beta_unit),
        "dkd": (_dkd_per_token, _check_dkd_weights),
    }
)
