"""Logit losses between two vocabularies: the exact-match path and ULD, and their hybrid.

The rows are aligned prediction positions of the two models (the last token of each aligned span, where both
models predict a next token that starts the same text; see :class:`~kd_plugins.alignment_spans.SpanAlignment`):
row ``n`` of the student's final hidden states and row ``n`` of the teacher's. Each side's logits come from its own
hidden states and LM head, ``softcap(scale * (h @ W.T + b)) / T``.

* **Exact match** -- the tokens whose strings both vocabularies hold (``shared_student``/``shared_teacher``, one
  id pair per string): each side's logits restricted to them are a distribution over the same strings, compared with
  a logit loss of :mod:`kd_plugins.functional.logit` (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``dkd``;
  scaled by ``T**2`` as there). ``dkd`` needs the target among the shared tokens: rows whose target is not are left
  out of that part.
* **ULD** (Universal Logit Distillation, Boizard et al. 2024, arXiv:2402.12030) -- the L1 distance between the two
  probability vectors sorted in decreasing order, the shorter one padded with zeros: no token correspondence is
  needed. :func:`uld` compares whole distributions; in :func:`cross_vocab_kd` it compares the probabilities of the
  tokens the exact-match part leaves out (each side's unshared tokens).

Chunked: rows are processed ``chunk_size`` at a time under activation checkpointing, so the ``(rows, V)`` logits of
one chunk exist at a time -- in the forward, and again, recomputed, in the backward. Each part is a mean over its
valid rows (targets not ``ignore_index``) of this batch; no valid row gives an exact, finite 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature
from kd_plugins.functional.logit import check_loss_options, upcast

__all__ = ["cross_vocab_kd", "sorted_l1", "uld"]


def uld(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """ULD between two vocabularies: the mean over valid rows of ``Σ_k |sort(p_S)_k - sort(p_T)_k|``.

    Args:
        student_hidden: ``(N, Hs)``; student_weight: ``(Vs, Hs)``; teacher_hidden: ``(N, Ht)``; teacher_weight:
            ``(Vt, Ht)`` -- the aligned rows and each side's LM head.
        targets: ``(N,)``, the student's target ids (only a mask here: ``ignore_index`` rows are left out).
        temperature: ``T > 0`` for both softmaxes.
        student_bias / teacher_bias, *_logit_scale, *_softcap: the model heads.
        chunk_size: rows per checkpointed chunk.

    Returns:
        0-dim fp32 loss (fp64 inputs stay fp64).
    """
    return cross_vocab_kd(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, shared_student=None,
        shared_teacher=None, exact_weight=0.0, uld_weight=1.0, temperature=temperature, student_bias=student_bias,
        teacher_bias=teacher_bias, student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, chunk_size=chunk_size,
        ignore_index=ignore_index,
    )


def cross_vocab_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    *,
    shared_student: Tensor | None,
    shared_teacher: Tensor | None,
    loss: str = "forward_kl",
    loss_kwargs: dict | None = None,
    exact_weight: float = 1.0,
    uld_weight: float = 1.0,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``exact_weight * exact + uld_weight * ULD(rest)`` between two vocabularies (see the module docstring).

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, temperature, heads, chunk_size:
            as for :func:`uld`.
        shared_student, shared_teacher: ``(K,)`` long, the shared tokens' ids in each vocabulary (string ``k`` is
            ``shared_student[k]`` and ``shared_teacher[k]``); None only when ``exact_weight == 0`` (ULD then compares
            whole distributions).
        loss, loss_kwargs: the exact-match loss and its options (``beta`` of ``generalized_jsd``, ``alpha`` /
            ``beta`` of ``dkd``).
        exact_weight, uld_weight: the two parts' weights (>= 0). With ``exact_weight > 0`` the ULD part compares
            each side's probabilities of its unshared tokens; with ``exact_weight == 0`` whole distributions.

    Returns:
        0-dim fp32 loss (fp64 inputs stay fp64).
    """
    check_temperature(temperature)
    if exact_weight < 0 or uld_weight < 0:
        raise ValueError(f"exact_weight={exact_weight} and uld_weight={uld_weight} must be >= 0")
    loss_kwargs = dict(loss_kwargs or {})
    per_token_fn = check_loss_options(loss, loss_kwargs)
    _check_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, targets)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    exact = exact_weight > 0
    if exact and (shared_student is None or shared_teacher is None):
        raise ValueError("the exact-match part (exact_weight > 0) needs shared_student and shared_teacher")
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    valid = targets != ignore_index
    rows = valid.nonzero(as_tuple=True)[0]
    device = student_hidden.device
    maps = _Maps.build(shared_student, shared_teacher, student_weight.shape[0], teacher_weight.shape[0], device,
                       exact and uld_weight > 0)
    sums = torch.zeros(2, dtype=dtype, device=device)
    counts = torch.zeros(2, dtype=dtype, device=device)
    head_s = (student_bias, student_logit_scale, student_softcap)
    head_t = (teacher_bias, teacher_logit_scale, teacher_softcap)
    for start in range(0, int(rows.numel()), chunk_size):
        chunk = rows[start:start + chunk_size]
        fn = _ChunkLoss(per_token_fn, loss, loss_kwargs, maps, temperature, exact, uld_weight > 0, head_s, head_t)
        args = (student_hidden[chunk], student_weight, teacher_hidden[chunk], teacher_weight, targets[chunk])
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in
                                                     (*args[:4], student_bias, teacher_bias))
        part_sums, part_counts = checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args)
        sums = sums + part_sums.to(dtype)
        counts = counts + part_counts.to(dtype)
    means = sums / counts.clamp(min=1)
    zero = student_hidden[:0].to(dtype).sum() + student_weight[:0].to(dtype).sum()  # keeps a graph when empty
    return zero + exact_weight * means[0] + uld_weight * means[1]


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """``Σ_k |sort(p)_k - sort(q)_k|`` per row of two probability tensors ``(N, Vp)``, ``(N, Vq)`` (sorted in
    decreasing order, the narrower padded with zeros): ULD's distance."""
    p = p.sort(dim=-1, descending=True).values
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(dim=-1)


# --- helpers ------------------------------------------------------------------------------------------------


class _Maps:
    """Index tensors of the shared / unshared tokens of both vocabularies, built once per call."""

    def __init__(self, shared_s, shared_t, student_to_shared, unshared_s, unshared_t):
        self.shared_s, self.shared_t = shared_s, shared_t
        self.student_to_shared = student_to_shared
        self.unshared_s, self.unshared_t = unshared_s, unshared_t

    @classmethod
    def build(cls, shared_s, shared_t, vs, vt, device, need_unshared):
        if shared_s is None:
            return cls(None, None, None, None, None)
        shared_s, shared_t = shared_s.to(device), shared_t.to(device)
        if shared_s.shape != shared_t.shape or shared_s.dim() != 1:
            raise ValueError(f"shared_student {tuple(shared_s.shape)} and shared_teacher {tuple(shared_t.shape)} must "
                             "be two 1-D tensors of one length")
        if shared_s.numel() and (int(shared_s.max()) >= vs or int(shared_t.max()) >= vt):
            raise ValueError(f"shared token ids reach past a vocabulary (student {vs}, teacher {vt} rows)")
        to_shared = torch.full((vs,), -1, dtype=torch.long, device=device)
        to_shared[shared_s] = torch.arange(shared_s.numel(), device=device)
        unshared_s = unshared_t = None
        if need_unshared:
            keep_s = torch.ones(vs, dtype=torch.bool, device=device)
            keep_s[shared_s] = False
            keep_t = torch.ones(vt, dtype=torch.bool, device=device)
            keep_t[shared_t] = False
            unshared_s, unshared_t = keep_s.nonzero(as_tuple=True)[0], keep_t.nonzero(as_tuple=True)[0]
        return cls(shared_s, shared_t, to_shared, unshared_s, unshared_t)


class _ChunkLoss:
    """One chunk's ``(sums, counts)`` of the two parts: a plain function of tensors, so it can be checkpointed."""

    def __init__(self, per_token_fn: Callable, loss: str, loss_kwargs: dict, maps: _Maps, temperature: float,
                 exact: bool, with_uld: bool, head_s, head_t):
        self.per_token_fn, self.loss, self.loss_kwargs = per_token_fn, loss, loss_kwargs
        self.maps, self.temperature, self.exact, self.with_uld = maps, temperature, exact, with_uld
        self.head_s, self.head_t = head_s, head_t

    def __call__(self, hs, ws, ht, wt, targets):
        zs = _logits(hs, ws, *self.head_s)
        zt = _logits(ht, wt, *self.head_t)
        sums, counts = [], []
        maps = self.maps
        if self.exact:
            mapped = maps.student_to_shared[targets]
            keep = mapped >= 0 if self.loss == "dkd" else torch.ones_like(mapped, dtype=torch.bool)
            s_rows, t_rows = zs[keep][:, maps.shared_s], zt[keep][:, maps.shared_t]
            values = self.per_token_fn(s_rows, t_rows, mapped[keep].clamp(min=0), temperature=self.temperature,
                                       **self.loss_kwargs)
            sums.append(values.sum())
            counts.append(keep.sum())
        else:
            sums.append(zs.new_zeros(()))
            counts.append(torch.zeros((), dtype=torch.long, device=zs.device))
        if self.with_uld:
            ps = torch.softmax(zs / self.temperature, dim=-1)
            pt = torch.softmax(zt / self.temperature, dim=-1)
            if self.exact:
                ps, pt = ps[:, maps.unshared_s], pt[:, maps.unshared_t]
            sums.append(sorted_l1(ps, pt).sum())
            counts.append(torch.tensor(zs.shape[0], device=zs.device))
        else:
            sums.append(zs.new_zeros(()))
            counts.append(torch.zeros((), dtype=torch.long, device=zs.device))
        return torch.stack(sums), torch.stack(counts)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None) -> Tensor:
    logits = upcast(hidden) @ upcast(weight).T
    if bias is not None:
        logits = logits + upcast(bias)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _check_rows(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, targets: Tensor) -> None:
    if hs.dim() != 2 or ht.dim() != 2 or hs.shape[0] != ht.shape[0] or targets.shape != hs.shape[:1]:
        raise ValueError(f"aligned rows must be student_hidden (N, Hs), teacher_hidden (N, Ht) and targets (N,); got "
                         f"{tuple(hs.shape)}, {tuple(ht.shape)}, {tuple(targets.shape)}")
    if ws.dim() != 2 or ws.shape[1] != hs.shape[1] or wt.dim() != 2 or wt.shape[1] != ht.shape[1]:
        raise ValueError(f"LM heads must be (V, H) matching the hidden widths; got student {tuple(ws.shape)} for "
                         f"H={hs.shape[1]}, teacher {tuple(wt.shape)} for H={ht.shape[1]}")
