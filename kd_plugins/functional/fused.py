"""Fused, chunked LM-head + logit KD: never materialises the full ``(N, V)`` logits of either model.

:func:`fused_linear_kd` projects the final hidden states of student and teacher through their LM heads one chunk
of tokens at a time and computes, in place in the chunk's logit buffers, the per-token loss and its exact
gradient with respect to the student logits by an analytic kernel per loss (forward KL ``p - q``; reverse KL
``p * (log p - log q - L)``; generalized JSD ``(1 - beta) * p * (log p - log m - KL(p||m))``; DKD, see
``_dkd_kernel``), chained through the student head (logit scale, temperature, softcap). A per-token function
without a kernel falls back to a generic engine (``torch.autograd.grad`` on a local leaf). The chunk's logit
gradient is immediately turned into the gradient of the student hidden states and accumulated into the
gradient of the LM head, so only ``O(N*H + V*H)`` is kept for backward. The loop is the chunk engine of
:mod:`kd_plugins.functional.chunked`; the kernels are in :mod:`kd_plugins.functional.kernels`; this module is the
dense front-end (a live teacher's hidden states and LM head), :mod:`kd_plugins.functional.sparse` the top-k one.

Memory: one chunk of ``chunk_size * V`` fp32 logits (a few copies of it while the loss is differentiated) instead
of ``2 * N * V``. Positions whose label is ``ignore_index`` are dropped before the projection, so padding and
prompt tokens cost nothing.

:func:`linear_kd_reference` is the plain-autograd equivalent (full logits) for parity tests.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature, normalize_token_sum, valid_mask
from kd_plugins.functional.chunked import ChunkPlan, FusedLinearKD, head, normalise_outputs, project, project_into, task_head
from kd_plugins.functional.kernels import block_engine, teacher_head_
from kd_plugins.functional.logit import check_loss_options, dkd, forward_kl, generalized_jsd, reverse_kl

__all__ = ["fused_linear_kd", "linear_ce_reference", "linear_kd_reference"]

_FUNCTIONAL = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "dkd": dkd,
}


def fused_linear_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    loss_kwargs: dict | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
    return_task_loss: bool = False,
    task_grad_ratio: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Logit KD computed from hidden states and LM heads, chunk by chunk.

    The logits of each model are ``softcap(scale * (hidden @ weight.T + bias))`` with
    ``softcap(x) = c * tanh(x / c)`` when a softcap ``c`` is given (Gemma 2 style), matching what the model's
    own forward produces -- pass the model's ``logit_scale`` / final-logit softcap, or the fused loss optimises
    a different objective than the model's logits.

    Args:
        student_hidden: ``(..., Hs)`` final-norm output of the student.
        student_weight: ``(V, Hs)`` student LM head. May be frozen (``requires_grad=False``), then its gradient
            is skipped.
        teacher_hidden: ``(..., Ht)``; ``Ht`` may differ from ``Hs``. Never receives gradients.
        teacher_weight: ``(V, Ht)``, same ``V`` as the student. Never receives gradients.
        labels: ``(...)`` targets aligned with positions (``labels[t]`` is what position ``t`` predicts; see
            :func:`~kd_plugins.functional.shift_labels`); ``ignore_index`` positions are skipped entirely.
        loss: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"`` or ``"dkd"``.
        loss_kwargs: options of the loss (``{"beta": ...}`` for generalized_jsd, ``{"alpha", "beta"}`` for dkd).
        student_bias, teacher_bias: ``(V,)`` or None.
        student_logit_scale, teacher_logit_scale: logit multipliers.
        student_softcap, teacher_softcap: final-logit softcap values, or None.
        temperature, ignore_index, num_items_in_batch: as in :func:`~kd_plugins.functional.forward_kl`.
        chunk_size: tokens per chunk; peak extra memory is a small multiple of ``chunk_size * V`` fp32.
        return_task_loss: also return the student's cross-entropy on ``labels`` (its own logits, temperature 1,
            same normaliser), computed from the same chunk projections: no second pass over the LM head. Costs one
            more ``chunk_size * V`` buffer and the CE's own gradient matmuls.
        task_grad_ratio: with ``return_task_loss``, a promise that the two outputs are only used in
            ``a * kd_loss + a * task_grad_ratio * ce_loss`` (any ``a``): then the CE's logit gradient is added to
            the KD's, ``g_kd + ratio * g_ce``, before the one projection through the LM head -- two head-sized
            matmuls instead of four, and one block-sized CE buffer instead of a chunk-sized one. ``backward``
            checks the promise and raises if the outputs were weighted otherwise (or differentiated one at a
            time, as a gradient probe does). None (default): the CE keeps its own gradient matmuls.

    Returns:
        0-dim fp32 loss, equal (up to float rounding) to :func:`linear_kd_reference`. Its gradients with
        respect to the student hidden states, weight and bias are computed during the forward call and
        returned, in the inputs' dtypes, by ``backward``. With ``return_task_loss``: ``(kd_loss, ce_loss)``,
        ``ce_loss`` equal to :func:`linear_ce_reference`.
    """
    options = dict(loss_kwargs or {})
    check_loss_options(loss, options)
    _check_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        student_softcap, teacher_softcap, temperature, chunk_size,
    )
    mask = valid_mask(labels, ignore_index).reshape(-1)
    hidden_s = student_hidden.reshape(-1, student_hidden.shape[-1])[mask]
    with torch.no_grad():
        hidden_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[mask]
    targets = labels.reshape(-1)[mask]
    n, vocab = hidden_s.shape[0], student_weight.shape[0]
    block_loss, block_rows, n_scratch = block_engine(loss, options, student_logit_scale, student_softcap, vocab)
    teacher_head = (hidden_t, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                    teacher_logit_scale, teacher_softcap, temperature)
    plan = ChunkPlan(
        teacher_chunk=partial(_dense_teacher_chunk, teacher_head),
        block_loss=partial(block_loss, temperature=temperature),
        block_rows=block_rows,
        n_scratch=n_scratch,
        teacher_buffer=True,
        chunk_size=chunk_size,
        task=task_head(return_task_loss, task_grad_ratio, student_logit_scale, student_softcap),
    )
    out = FusedLinearKD.apply(hidden_s, student_weight, student_bias, targets, plan, torch.is_grad_enabled())
    return normalise_outputs(out, num_items_in_batch)


def linear_ce_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy of full logits ``softcap(scale * (hidden @ weight.T + bias))`` against aligned ``labels``:
    the task loss that ``return_task_loss=True`` computes fused (token sum over ``num_items_in_batch``, or the
    mean over valid positions). For tests."""
    logits = head(project(hidden, weight, bias), logit_scale, softcap)
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                          ignore_index=ignore_index, reduction="none")
    return normalize_token_sum(per, valid_mask(labels, ignore_index).reshape(-1), num_items_in_batch)


def linear_kd_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    loss_kwargs: dict | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Unfused equivalent of :func:`fused_linear_kd`: full logits, plain autograd. ``chunk_size`` is ignored.

    Memory ``O(N * V)``; for tests and small models.
    """
    options = dict(loss_kwargs or {})
    check_loss_options(loss, options)
    _check_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        student_softcap, teacher_softcap, temperature, chunk_size,
    )
    student_logits = head(project(student_hidden, student_weight, student_bias), student_logit_scale, student_softcap)
    with torch.no_grad():
        teacher_logits = head(
            project(teacher_hidden, teacher_weight, teacher_bias), teacher_logit_scale, teacher_softcap
        )
    return _FUNCTIONAL[loss](
        student_logits, teacher_logits, labels, temperature=temperature, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, **options,
    )


# --- helpers --------------------------------------------------------------------------------------------------------


def _dense_teacher_chunk(teacher_head, start, stop, buffer):
    hidden_t, weight_t, bias_t, scale_t, softcap_t, temperature = teacher_head
    project_into(buffer, hidden_t[start:stop], weight_t, bias_t)
    teacher_head_(buffer, scale_t, softcap_t, temperature)
    return buffer


def _check_linear_inputs(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    student_softcap: float | None,
    teacher_softcap: float | None,
    temperature: float,
    chunk_size: int,
) -> None:
    check_temperature(temperature)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 or None, got {cap}")
    for name, weight, hidden in (
        ("student", student_weight, student_hidden),
        ("teacher", teacher_weight, teacher_hidden),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{name}_weight must have shape (V, {hidden.shape[-1]}) to match {name}_hidden "
                f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
            )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student LM head has V={student_weight.shape[0]}, teacher LM head has "
            f"V={teacher_weight.shape[0]}; teacher and student need the same tokenizer/vocabulary"
        )
    vocab = student_weight.shape[0]
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and tuple(bias.shape) != (vocab,):
            raise ValueError(f"{name} must have shape ({vocab},), got {tuple(bias.shape)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) shape"
        )
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
            f"{tuple(student_hidden.shape[:-1])} (labels aligned with positions, see shift_labels)"
        )


