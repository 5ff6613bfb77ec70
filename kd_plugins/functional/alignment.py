"""Representation-level ("alignment") transfer losses: functional forms.

Every function takes features that are already projected to comparable widths (projectors belong to the
module-level terms in :mod:`kd_plugins.components.alignment`) and a mask, accumulates in fp32 (fp64 inputs stay
fp64, so ``gradcheck`` works), and returns a 0-dim loss that is an exact, finite 0 with zero gradients when
nothing in the batch is valid.

* :func:`contrastive` -- token-level InfoNCE, the in-batch form of CRD (Tian et al., ICLR 2020, arXiv 1910.10699).
* :func:`hidden_mse`, :func:`hidden_cosine` -- per-token feature regression.
* :func:`attention_relation` -- MiniLMv2 self-attention relations (Wang et al., Findings ACL 2021,
  arXiv 2012.15828), computed from q/k/v projection outputs, so it works with SDPA and FlashAttention.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_plugins.functional._common import normalize_token_sum

__all__ = ["attention_relation", "contrastive", "hidden_cosine", "hidden_mse"]

RELATION_TYPES = ("q", "k", "v")
# Finite stand-in for -inf on masked relation logits: exp() underflows to exactly 0, and unlike -inf it never
# produces 0 * (-inf - -inf) = NaN in the KL or its gradient.
_MASKED_LOGIT = -1e9


def contrastive(
    student_feats: Tensor,
    teacher_feats: Tensor,
    mask: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    max_tokens: int = 1024,
    symmetric: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token-level InfoNCE between student and teacher features (CRD, in-batch form).

    ``L = -(1/N) Σᵢ log( exp(⟨ŝᵢ,t̂ᵢ⟩/τ) / Σⱼ exp(⟨ŝᵢ,t̂ⱼ⟩/τ) )`` with ``ŝ, t̂`` the L2-normalised features of
    the ``N`` valid tokens: each student token must pick its own teacher token among all valid tokens of the
    batch (the others are the negatives).

    Args:
        student_feats: ``(B, T, D)`` projected student features.
        teacher_feats: ``(B, T, D)`` projected teacher features (same ``D``).
        mask: ``(B, T)`` bool, True for valid tokens.
        temperature: ``τ > 0``, a float or a 0-dim tensor (learnable temperatures pass a tensor).
        max_tokens: if more than this many tokens are valid, that many are sampled uniformly without
            replacement (``torch.randperm`` with ``generator``), bounding the ``O(N²)`` logits.
        symmetric: also add the teacher→student direction and average the two.
        generator: optional ``torch.Generator`` for reproducible sampling.

    Returns:
        0-dim loss. With fewer than two valid tokens there are no negatives and the loss is exactly 0.
    """
    _check_features(student_feats, teacher_feats, mask, same_width=True, name="contrastive")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"contrastive: temperature must be > 0, got {temperature}")
    if max_tokens < 2:
        raise ValueError(f"contrastive: max_tokens must be >= 2 (a positive and a negative), got {max_tokens}")
    dtype = _compute_dtype(student_feats)
    s = student_feats[mask]
    t = teacher_feats[mask]
    n = s.shape[0]
    if n > max_tokens:
        device = generator.device if generator is not None else s.device
        rows = torch.randperm(n, generator=generator, device=device)[:max_tokens].to(s.device)
        s, t = s[rows], t[rows]
        n = max_tokens
    if n < 2:
        # No negatives: the loss is defined as 0, kept attached to the inputs so backward gives zero gradients.
        zero = s[:0].to(dtype).sum() + t[:0].to(dtype).sum()
        if isinstance(temperature, Tensor):
            zero = zero + 0.0 * temperature.to(dtype)
        return zero
    s_hat = F.normalize(s.to(dtype), dim=-1)
    t_hat = F.normalize(t.to(dtype), dim=-1)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(dtype)
    logits = s_hat @ t_hat.T / temperature
    targets = torch.arange(n, device=logits.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, targets))
    return loss


def hidden_mse(
    student_feats: Tensor,
    teacher_feats: Tensor,
    mask: Tensor,
    *,
    num_tokens_in_batch: Tensor | int | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Mean over valid tokens of the mean-over-features squared error.

    Args:
        student_feats, teacher_feats: ``(B, T, D)`` (the student already projected to the teacher's width).
        mask: ``(B, T)`` bool, True for valid tokens.
        num_tokens_in_batch: divide the token sum by this count (e.g. the valid tokens of a whole
            gradient-accumulation step) instead of this batch's count.
        token_weights: ``(B, T)``, how many tokens each position stands for (a span of aligned tokens stands for
            the student tokens it covers): each position's error counts that many times in the sum and in this
            batch's count. None: 1 each.
    """
    _check_features(student_feats, teacher_feats, mask, same_width=True, name="hidden_mse")
    s, t = _masked_inputs(student_feats, teacher_feats, mask)
    per_token = (s - t).pow(2).mean(dim=-1)
    return _weighted_token_mean(per_token, mask, num_tokens_in_batch, token_weights)


def hidden_cosine(
    student_feats: Tensor,
    teacher_feats: Tensor,
    mask: Tensor,
    *,
    eps: float = 1e-8,
    num_tokens_in_batch: Tensor | int | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Mean over valid tokens of ``1 - cos(student, teacher)``.

    Args:
        student_feats, teacher_feats: ``(B, T, D)`` (the student already projected to the teacher's width).
        mask: ``(B, T)`` bool, True for valid tokens.
        num_tokens_in_batch, token_weights: as for :func:`hidden_mse`.
    """
    _check_features(student_feats, teacher_feats, mask, same_width=True, name="hidden_cosine")
    s, t = _masked_inputs(student_feats, teacher_feats, mask)
    cos = (F.normalize(s, dim=-1, eps=eps) * F.normalize(t, dim=-1, eps=eps)).sum(dim=-1)
    return _weighted_token_mean(1.0 - cos, mask, num_tokens_in_batch, token_weights)


def attention_relation(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    *,
    relation_heads: int,
    sequence_ids: Tensor | None = None,
    relations: Sequence[str] = RELATION_TYPES,
    num_tokens_in_batch: Tensor | int | None = None,
) -> Tensor:
    """MiniLMv2 self-attention relation distillation from q/k/v projection outputs.

    For each selected ``A ∈ {Q, K, V}`` the projection output (all heads concatenated) is re-split into ``R``
    relation heads of width ``d_r = width / R`` (``d_r`` may differ between student and teacher; ``R`` is shared
    so the relation matrices compare) and ``R_A = softmax(A_r A_rᵀ / √d_r)`` over keys. A query token relates
    only to earlier-or-equal tokens (causal) of the same packed sequence; padding (``sequence_ids == -1``) is
    neither a key nor a query. The loss is the mean over relation types of ``KL(R^T_A ‖ R^S_A)``, averaged over
    valid query rows and relation heads.

    Memory: relation matrices are ``(B, R, T, T)`` in fp32 -- fine for ``T`` up to a few thousand.

    Args:
        student_qkv, teacher_qkv: ``(q, k, v)`` each ``(B, T, width)``. ``q`` width is ``n_heads * head_dim``;
            with grouped-query attention (GQA) ``k``/``v`` are narrower (``n_kv_heads * head_dim``).
        relation_heads: ``R``; must divide every selected width of both models.
        sequence_ids: ``(B, T)`` long packed-sequence ids, ``-1`` on padding. None: every token is valid and
            each row is one sequence.
        relations: which of ``"q"``, ``"k"``, ``"v"`` to use.
        num_tokens_in_batch: divide the sum over valid query rows by this count (e.g. the valid tokens of a whole
            gradient-accumulation step) instead of this batch's count.

    Returns:
        0-dim loss; exactly 0 when no token is valid, and 0 when student and teacher relations coincide.
    """
    relations = _check_relations(relations)
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError("attention_relation: student_qkv and teacher_qkv must be (q, k, v) tuples")
    if not isinstance(relation_heads, int) or relation_heads < 1:
        raise ValueError(f"attention_relation: relation_heads must be a positive int, got {relation_heads!r}")
    batch, seq = student_qkv[0].shape[:2]
    for who, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
        for name, x in zip(RELATION_TYPES, qkv):
            if x.dim() != 3 or tuple(x.shape[:2]) != (batch, seq):
                raise ValueError(
                    f"attention_relation: {who} {name} has shape {tuple(x.shape)}; expected (B, T, width) with "
                    f"(B, T) = {(batch, seq)}"
                )
            if name in relations and x.shape[-1] % relation_heads:
                raise ValueError(
                    f"attention_relation: relation_heads={relation_heads} does not divide the {who} {name} width "
                    f"{x.shape[-1]}. R must divide every selected q/k/v width of both models; with grouped-query "
                    "attention (GQA) k/v are narrower than q (n_kv_heads * head_dim), so pick R dividing those "
                    "too (e.g. the kv-head count)."
                )
    device = student_qkv[0].device
    if sequence_ids is None:
        sequence_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    elif tuple(sequence_ids.shape) != (batch, seq):
        raise ValueError(
            f"attention_relation: sequence_ids has shape {tuple(sequence_ids.shape)}, expected {(batch, seq)}"
        )
    sequence_ids = sequence_ids.to(device)
    valid = sequence_ids >= 0  # (B, T)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    same_sequence = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = (causal & same_sequence & valid[:, None, :])[:, None]  # (B, 1, Tq, Tk)

    dtype = _compute_dtype(student_qkv[0])
    keep = valid[..., None]
    total = None
    for name in relations:
        index = RELATION_TYPES.index(name)
        # Zero padding first (it may hold garbage or NaN) so it cannot leak into gradients of valid tokens.
        student_x = student_qkv[index].to(dtype).masked_fill(~keep, 0.0)
        teacher_x = teacher_qkv[index].to(dtype).masked_fill(~keep, 0.0)
        log_s = _relation_log_probs(student_x, relation_heads, allowed)
        log_t = _relation_log_probs(teacher_x, relation_heads, allowed)
        kl = torch.where(allowed, log_t.exp() * (log_t - log_s), torch.zeros((), dtype=dtype, device=device))
        per_row = kl.sum(dim=-1).mean(dim=1)  # (B, Tq): summed over keys, averaged over relation heads
        term = normalize_token_sum(per_row, valid, num_tokens_in_batch)
        total = term if total is None else total + term
    return total / len(relations)


# --- helpers ------------------------------------------------------------------------------------------------


def _weighted_token_mean(per_token: Tensor, mask: Tensor, num_tokens_in_batch, token_weights: Tensor | None) -> Tensor:
    if token_weights is None:
        return normalize_token_sum(per_token, mask, num_tokens_in_batch)
    if token_weights.shape != mask.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the mask's shape {tuple(mask.shape)}")
    weights = token_weights.to(device=per_token.device, dtype=per_token.dtype).masked_fill(~mask, 0.0)
    if num_tokens_in_batch is not None:
        return normalize_token_sum(per_token * weights, mask, num_tokens_in_batch)
    return normalize_token_sum(per_token * weights, mask, 1) / weights.sum().clamp(min=1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_features(student: Tensor, teacher: Tensor, mask: Tensor, *, same_width: bool, name: str) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(
            f"{name}: features must be (B, T, D); got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{name}: student and teacher (B, T) differ: {tuple(student.shape[:2])} vs {tuple(teacher.shape[:2])}"
        )
    if same_width and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{name}: feature widths differ (student {student.shape[-1]}, teacher {teacher.shape[-1]}); project them "
            "to a common width first (see kd_plugins.projectors.build_projector)"
        )
    if mask.dtype != torch.bool or mask.shape != student.shape[:2]:
        raise ValueError(
            f"{name}: mask must be a bool tensor of shape {tuple(student.shape[:2])}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )


def _masked_inputs(student: Tensor, teacher: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    # Zero masked tokens before any arithmetic: padding may hold garbage (even NaN), and masked_fill's backward
    # sends exactly zero gradient there instead of 0 * NaN.
    dtype = _compute_dtype(student)
    keep = mask[..., None]
    return (
        student.to(dtype).masked_fill(~keep, 0.0),
        teacher.to(dtype).masked_fill(~keep, 0.0),
    )


def _check_relations(relations: Sequence[str]) -> tuple[str, ...]:
    if isinstance(relations, str):
        relations = tuple(relations)
    relations = tuple(relations)
    if not relations or len(set(relations)) != len(relations) or not set(relations) <= set(RELATION_TYPES):
        raise ValueError(
            f"relations must be a non-empty subset of {RELATION_TYPES} without repeats, got {relations!r}"
        )
    return relations


def _relation_log_probs(x: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """``(B, T, width) -> (B, R, T, T)`` log-softmax of scaled dot products over allowed keys."""
    batch, seq, width = x.shape
    head_dim = width // heads
    x = x.reshape(batch, seq, heads, head_dim).transpose(1, 2)  # (B, R, T, d_r)
    scores = x @ x.transpose(-1, -2) / math.sqrt(head_dim)
    # Query rows with no allowed key (padding) get their diagonal allowed so the softmax stays finite; those
    # rows are dropped from the average anyway.
    eye = torch.eye(seq, dtype=torch.bool, device=x.device)
    scores = scores.masked_fill(~(allowed | eye), _MASKED_LOGIT)
    return scores.log_softmax(dim=-1)
