"""Sparse (top-k) logit KD for an offline teacher: the teacher is known only by its top-k log-probs per token.

:func:`sparse_linear_kd` is the top-k counterpart of :func:`~kd_plugins.functional.fused_linear_kd`: the student
logits are still projected chunk by chunk from its final hidden states (never ``(N, V)`` at once) and the
gradient is computed in the forward call; the teacher side is ``topk_logprobs`` / ``topk_indices`` ``(..., k)``
(log-probs at temperature 1, e.g. read from :class:`kd_plugins.integrations.teacher_cache.TeacherCache`).

**Buckets.** Per token, the vocabulary is partitioned into the ``k`` teacher top-k tokens ``S`` (one bucket
each) and the tail ``R = V \\ S`` (one bucket). The teacher's tail mass is implied,
``tau = max(1 - sum_{j in S} exp(l_j), 1e-6)`` (floored so a reverse-KL/JSD student tail never meets a zero
teacher tail: top-k mass of stored log-probs can round above 1). The student's bucket probabilities are exact:
``p_j`` for ``j in S`` and ``P_R = exp(lse_{j in R}(z_j) - lse(z))``. Each loss is then the dense loss between
the two ``(k+1)``-bucket distributions:

* forward KL: ``sum_{j in S} q_j log(q_j / p_j) + tau * log(tau / P_R)``;
* reverse KL: ``sum_{j in S} p_j log(p_j / q_j) + P_R * log(P_R / tau)``;
* generalized JSD: ``beta * KL(q || m) + (1 - beta) * KL(p || m)`` over the buckets, ``m = beta q + (1-beta) p``;
* DKD: needs the teacher's target probability ``q_t``. If the gold token ``t`` is in ``S``, ``q_t = exp(l_t)``
  (exact). Otherwise ``t`` is split out of the tail as its own bucket with the upper bound
  ``q_t = min(min_{j in S} q_j, tau)`` (a token outside the top-k is no likelier than the k-th token, and no
  likelier than the whole tail), the tail bucket keeping ``tau - q_t``; the student's buckets are ``z_t`` and
  ``R \\ {t}`` likewise. TCKD and NCKD are then computed over these ``k+2`` buckets exactly as in
  :func:`~kd_plugins.functional.dkd` (NCKD = KL between the non-target buckets renormalised).

With ``k == V`` the tail is empty (dropped) and every loss equals its dense version. Losses are scaled by
``T**2``; with ``T != 1`` the student logits are divided by ``T`` exactly, while the teacher's bucket log-probs
(``l_j`` and ``log tau``) are divided by ``T`` and renormalised over the buckets -- exact at ``T = 1`` and for an
empty tail, an approximation otherwise (the cache holds no per-token tail logits). The teacher's buckets are
renormalised at every temperature, ``T = 1`` included: where rounding put the stored top-k mass above 1 (the tail
then sits at its floor), the losses compare normalised bucket distributions.

The bucket-level loss is differentiated by local autograd on ``(rows, k+2)`` tensors (cheap); the
vocabulary-sized part of the gradient is analytic: ``dL/dz_j = g_j`` for ``j`` in ``S`` (and the split target),
``g_R * softmax_R(z)_j`` for ``j`` in the tail.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature, normalize_token_sum, valid_mask
from kd_plugins.functional.chunked import (
    ChunkPlan,
    FusedLinearKD,
    block_rows,
    head,
    normalise_outputs,
    project,
    scale_,
    task_head,
)
from kd_plugins.functional.logit import check_loss_options

__all__ = ["sparse_linear_kd", "sparse_kd_reference"]

TAIL_FLOOR = 1e-6


def sparse_linear_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    loss_kwargs: dict | None = None,
    student_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
    return_task_loss: bool = False,
    task_grad_ratio: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Logit KD against a top-k teacher, from the student's hidden states and LM head, chunk by chunk.

    Args:
        student_hidden: ``(..., H)`` final-norm output of the student.
        student_weight: ``(V, H)`` student LM head (may be frozen).
        topk_logprobs: ``(..., k)`` teacher log-probs (temperature 1) of its top-k tokens, any float dtype.
        topk_indices: ``(..., k)`` their token ids (distinct per position), any integer dtype.
        labels: ``(...)`` targets aligned with positions; ``ignore_index`` positions are skipped.
        loss, loss_kwargs, student_bias, student_logit_scale, student_softcap, temperature, ignore_index,
        num_items_in_batch, chunk_size, return_task_loss, task_grad_ratio: as in
            :func:`~kd_plugins.functional.fused_linear_kd`.

    Returns:
        0-dim fp32 loss (the bucket formulas in the module docstring), equal to :func:`sparse_kd_reference`;
        ``(kd_loss, ce_loss)`` with ``return_task_loss``.
    """
    options = dict(loss_kwargs or {})
    check_loss_options(loss, options)
    _check_sparse_inputs(student_hidden, student_weight, topk_logprobs, topk_indices, labels, student_bias,
                         student_softcap, temperature, chunk_size)
    vocab, k = student_weight.shape[0], topk_indices.shape[-1]
    mask = valid_mask(labels, ignore_index).reshape(-1)
    hidden_s = student_hidden.reshape(-1, student_hidden.shape[-1])[mask]
    lp = topk_logprobs.detach().reshape(-1, k)[mask]
    idx = topk_indices.reshape(-1, k)[mask].long()
    targets = labels.reshape(-1)[mask]
    block = partial(_sparse_block, loss=loss, options=options, scale=student_logit_scale, softcap=student_softcap,
                    temperature=temperature, has_tail=k < vocab)
    plan = ChunkPlan(
        teacher_chunk=lambda start, stop, _buffer: (lp[start:stop], idx[start:stop]),
        block_loss=block,
        block_rows=block_rows(vocab),
        n_scratch=0 if student_softcap is None else 1,
        teacher_buffer=False,
        chunk_size=chunk_size,
        task=task_head(return_task_loss, task_grad_ratio, student_logit_scale, student_softcap),
    )
    out = FusedLinearKD.apply(hidden_s, student_weight, student_bias, targets, plan, torch.is_grad_enabled())
    return normalise_outputs(out, num_items_in_batch)


def sparse_kd_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    loss_kwargs: dict | None = None,
    student_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Unfused :func:`sparse_linear_kd`: full student logits, buckets built with masks, plain autograd."""
    options = dict(loss_kwargs or {})
    check_loss_options(loss, options)
    _check_sparse_inputs(student_hidden, student_weight, topk_logprobs, topk_indices, labels, student_bias,
                         student_softcap, temperature, chunk_size)
    vocab, k = student_weight.shape[0], topk_indices.shape[-1]
    mask = valid_mask(labels, ignore_index).reshape(-1)
    logits = head(project(student_hidden, student_weight, student_bias), student_logit_scale, student_softcap)
    z = logits.reshape(-1, vocab)[mask] / temperature
    idx = topk_indices.reshape(-1, k)[mask].long()
    targets = labels.reshape(-1)[mask].long()
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    z_top = z.gather(-1, idx)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype)
    if loss == "dkd":
        is_target = torch.zeros_like(in_top).scatter_(-1, targets.unsqueeze(-1), True)
        z_split = torch.where((is_target & ~in_top).any(-1), z.gather(-1, targets.unsqueeze(-1)).squeeze(-1), neg_inf)
        tail = torch.logsumexp(torch.where(in_top | is_target, neg_inf, z), -1)
        student = torch.cat([z_top, z_split.unsqueeze(-1), tail.unsqueeze(-1)], -1)
    else:
        tail = torch.logsumexp(torch.where(in_top, neg_inf, z), -1)
        student = torch.cat([z_top, tail.unsqueeze(-1)], -1)
    lp = topk_logprobs.detach().reshape(-1, k)[mask]
    teacher, target_col = _teacher_buckets(lp, idx, targets, loss, temperature, vocab)
    if k == vocab:  # no tail bucket
        student = student[:, :-1]
    per = _bucket_loss(student, teacher, target_col, loss, options) * temperature**2
    return normalize_token_sum(per, torch.ones_like(per, dtype=torch.bool), num_items_in_batch)


# --- one block of the fused loop ------------------------------------------------------------------------------


def _sparse_block(student, teacher_rows, targets, scratch, *, need_grad, loss, options, scale, softcap, temperature,
                  has_tail):
    lp, idx = teacher_rows
    if softcap is None:
        scale_(student, scale / temperature)
    else:
        scale_(student, scale)
        student.div_(softcap).tanh_()
        kept = scratch[0]
        kept.copy_(student)
        student.mul_(softcap / temperature)
    z = student
    vocab = z.shape[-1]
    tgt = targets.long()
    z_top = z.gather(-1, idx)
    z.scatter_(-1, idx, float("-inf"))
    columns = [z_top]
    if loss == "dkd":
        split = ~(idx == tgt.unsqueeze(-1)).any(-1)  # target outside the top-k: its own bucket
        z_t = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # -inf when the target is in the top-k
        z.scatter_(-1, tgt.unsqueeze(-1), float("-inf"))
        columns.append(z_t.unsqueeze(-1))
    if has_tail:
        lse_tail = torch.logsumexp(z, -1)
        columns.append(lse_tail.unsqueeze(-1))
    teacher, target_col = _teacher_buckets(lp, idx, tgt, loss, temperature, vocab)
    leaf = torch.cat(columns, -1).detach()
    if need_grad:
        leaf.requires_grad_(True)
    if not need_grad:
        return _bucket_loss(leaf, teacher, target_col, loss, options) * temperature**2
    with torch.enable_grad():
        per = _bucket_loss(leaf, teacher, target_col, loss, options) * temperature**2
        (g,) = torch.autograd.grad(per.sum(), leaf)
    if has_tail:  # tail part: g_R * softmax over the tail (exp(-inf) = 0 outside it)
        # an empty tail (DKD with k = V - 1 and the target split out) has lse = -inf: subtract 0 there instead
        shift = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
        z.sub_(shift.unsqueeze(-1)).exp_().mul_(g[:, -1:])
    else:
        z.zero_()
    k = idx.shape[-1]
    z.scatter_add_(-1, idx, g[:, :k])
    if loss == "dkd":
        z.scatter_add_(-1, tgt.unsqueeze(-1), torch.where(split, g[:, k], 0.0).unsqueeze(-1))
    scale_(z, scale / temperature)
    if softcap is not None:
        z.mul_(kept.mul_(kept).neg_().add_(1.0))
    return per.detach()


# --- buckets and bucket losses (small: (rows, k+2)) ------------------------------------------------------------


def _teacher_buckets(lp: Tensor, idx: Tensor, targets: Tensor, loss: str, temperature: float, vocab: int):
    """Teacher bucket logits at temperature ``T`` (columns as the student's) and, for DKD, the target column."""
    lp = lp.double()
    k = lp.shape[-1]
    tail = (1.0 - lp.exp().sum(-1)).clamp(min=TAIL_FLOOR)
    target_col = None
    if loss == "dkd":
        hit = idx == targets.unsqueeze(-1)
        in_top = hit.any(-1)
        q_split = torch.minimum(lp.min(-1).values.exp(), tail)
        split_col = torch.where(in_top, float("-inf"), q_split.log())
        rest = torch.where(in_top, tail, (tail - q_split).clamp(min=0.0))
        cols = [lp, split_col.unsqueeze(-1)] + ([rest.log().unsqueeze(-1)] if k < vocab else [])
        target_col = torch.where(in_top, hit.float().argmax(-1), torch.full_like(targets, k))
    else:
        cols = [lp] + ([tail.log().unsqueeze(-1)] if k < vocab else [])
    return torch.cat(cols, -1) / temperature, target_col


def _xlogy_diff(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum p * (log_p - log_q)`` with ``0 * anything = 0`` (empty buckets)."""
    return torch.where(p > 0, p * (log_p - torch.where(p > 0, log_q, 0.0)), 0.0).sum(-1)


def _bucket_loss(student: Tensor, teacher: Tensor, target_col: Tensor | None, loss: str, options: dict) -> Tensor:
    log_p = torch.log_softmax(student if student.dtype == torch.float64 else student.float(), -1)
    log_q = torch.log_softmax(teacher.to(log_p.dtype), -1)
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward_kl":
        return _xlogy_diff(q, log_q, log_p)
    if loss == "reverse_kl":
        return _xlogy_diff(p, log_p, log_q)
    if loss == "generalized_jsd":
        beta = options.get("beta", 0.5)
        if beta == 0.0:
            return _xlogy_diff(q, log_q, log_p)
        if beta == 1.0:
            return _xlogy_diff(p, log_p, log_q)
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        return beta * _xlogy_diff(q, log_q, log_m) + (1.0 - beta) * _xlogy_diff(p, log_p, log_m)
    alpha, beta = options.get("alpha", 1.0), options.get("beta", 2.0)
    col = target_col.unsqueeze(-1)
    is_target = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, col, True)
    neg_inf = torch.tensor(float("-inf"), dtype=log_p.dtype, device=log_p.device)
    log_pt_s, log_pt_t = log_p.gather(-1, col).squeeze(-1), log_q.gather(-1, col).squeeze(-1)
    log_rest_s = torch.logsumexp(torch.where(is_target, neg_inf, log_p), -1)
    log_rest_t = torch.logsumexp(torch.where(is_target, neg_inf, log_q), -1)
    tckd = _xlogy_diff(torch.stack([log_pt_t.exp(), log_rest_t.exp()], -1),
                       torch.stack([log_pt_t, log_rest_t], -1), torch.stack([log_pt_s, log_rest_s], -1))
    log_hat_s = torch.where(is_target, neg_inf, log_p - log_rest_s.unsqueeze(-1))
    log_hat_t = torch.where(is_target, neg_inf, log_q - log_rest_t.unsqueeze(-1))
    nckd = _xlogy_diff(log_hat_t.exp(), log_hat_t, log_hat_s)
    return alpha * tckd + beta * nckd


def _check_sparse_inputs(student_hidden, student_weight, topk_logprobs, topk_indices, labels, student_bias,
                         student_softcap, temperature, chunk_size) -> None:
    check_temperature(temperature)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if student_softcap is not None and not student_softcap > 0:
        raise ValueError(f"student_softcap must be > 0 or None, got {student_softcap}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student_weight must have shape (V, {student_hidden.shape[-1]}) to match student_hidden "
            f"{tuple(student_hidden.shape)}, got {tuple(student_weight.shape)}"
        )
    vocab = student_weight.shape[0]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise ValueError(f"student_bias must have shape ({vocab},), got {tuple(student_bias.shape)}")
    if topk_logprobs.shape != topk_indices.shape:
        raise ValueError(f"topk_logprobs {tuple(topk_logprobs.shape)} and topk_indices "
                         f"{tuple(topk_indices.shape)} must have the same shape (..., k)")
    if topk_indices.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"top-k teacher rows {tuple(topk_indices.shape[:-1])} must match the student's token shape "
                         f"{tuple(student_hidden.shape[:-1])}")
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
                         f"{tuple(student_hidden.shape[:-1])} (labels aligned with positions, see shift_labels)")
    k = topk_indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size k={k} must be in [1, V={vocab}]")
    if topk_indices.numel() and (int(topk_indices.min()) < 0 or int(topk_indices.max()) >= vocab):
        raise ValueError(f"topk_indices must be token ids in [0, {vocab}); the teacher's vocabulary does not "
                         "match the student's")
