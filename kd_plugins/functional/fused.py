"""Fused, chunked LM-head + logit KD: never materialises the full ``(N, V)`` logits of either model.

:func:`fused_linear_kd` projects the final hidden states of student and teacher through their LM heads one chunk
of tokens at a time, computes the per-token loss of the chunk with the same per-token functions as
:mod:`kd_plugins.functional.logit`, and gets ``d loss / d logits`` for the chunk with ``torch.autograd.grad`` on a
local leaf (so every loss kind has exact gradients through one generic engine, including logit scale and
softcapping). The chunk's logit gradient is immediately turned into the gradient of the student hidden states
and accumulated into the gradient of the LM head, so only ``O(N*H + V*H)`` is kept for backward.

Memory: one chunk of ``chunk_size * V`` fp32 logits (a few copies of it while the loss is differentiated) instead
of ``2 * N * V``. Positions whose label is ``ignore_index`` are dropped before the projection, so padding and
prompt tokens cost nothing.

:func:`linear_kd_reference` is the plain-autograd equivalent (full logits) for parity tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature, normalize_token_sum, valid_mask
from kd_plugins.functional.logit import _check_loss_options, _forward_kl_per_token, _upcast, dkd, forward_kl, generalized_jsd, reverse_kl

__all__ = ["fused_linear_kd", "linear_kd_reference"]

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
) -> Tensor:
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

    Returns:
        0-dim fp32 loss, equal (up to float rounding) to :func:`linear_kd_reference`. Its gradients with
        respect to the student hidden states, weight and bias are computed during the forward call and
        returned, in the inputs' dtypes, by ``backward``.
    """
    options = dict(loss_kwargs or {})
    per_token_fn = _check_loss_options(loss, options)
    _check_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        student_softcap, teacher_softcap, temperature, chunk_size,
    )
    mask = valid_mask(labels, ignore_index).reshape(-1)
    hidden_s = student_hidden.reshape(-1, student_hidden.shape[-1])[mask]
    with torch.no_grad():
        hidden_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[mask]
    targets = labels.reshape(-1)[mask]
    per_token = _FusedLinearKD.apply(
        hidden_s,
        student_weight,
        student_bias,
        hidden_t,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        targets,
        per_token_fn,
        options,
        (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap),
        temperature,
        chunk_size,
    )
    return normalize_token_sum(per_token, torch.ones_like(per_token, dtype=torch.bool), num_items_in_batch)


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
    _check_loss_options(loss, options)
    _check_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        student_softcap, teacher_softcap, temperature, chunk_size,
    )
    student_logits = _head(_project(student_hidden, student_weight, student_bias), student_logit_scale, student_softcap)
    with torch.no_grad():
        teacher_logits = _head(
            _project(teacher_hidden, teacher_weight, teacher_bias), teacher_logit_scale, teacher_softcap
        )
    return _FUNCTIONAL[loss](
        student_logits, teacher_logits, labels, temperature=temperature, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, **options,
    )


class _FusedLinearKD(torch.autograd.Function):
    """Returns per-token losses ``(n,)`` of the valid rows; gradients are computed in ``forward``.

    The LM-head gradient is accumulated over tokens during ``forward`` with unit per-token weights, so
    ``backward`` needs a uniform ``grad_output`` -- which it always gets, because the only consumer is the
    token sum in ``normalize_token_sum``.
    """

    @staticmethod
    def forward(ctx, hidden_s, weight_s, bias_s, hidden_t, weight_t, bias_t, targets, per_token_fn, options,
                heads, temperature, chunk_size):
        softcap_s = heads[1]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden_s.shape[0]
        acc = torch.promote_types(hidden_s.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        losses = torch.empty(n, dtype=acc, device=hidden_s.device)
        grad_h = torch.empty_like(hidden_s) if need_h else None
        grad_w = torch.zeros(weight_s.shape, dtype=acc, device=weight_s.device) if need_w else None
        grad_b = torch.zeros(bias_s.shape, dtype=acc, device=bias_s.device) if need_b else None

        need_grad = need_h or need_w or need_b
        if per_token_fn is _forward_kl_per_token and softcap_s is None:
            chunk_loss = _ForwardKLWorkspace(min(chunk_size, n), weight_s.shape[0], acc, hidden_s.device)
        else:
            chunk_loss = _generic_chunk_loss
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden_s[start:stop]
            losses[start:stop], grad_raw = chunk_loss(
                h, weight_s, bias_s, hidden_t[start:stop], weight_t, bias_t, targets[start:stop],
                per_token_fn=per_token_fn, options=options, heads=heads, temperature=temperature,
                need_grad=need_grad,
            )
            if not need_grad:
                continue
            grad_raw_c = grad_raw if grad_raw.dtype == hidden_s.dtype else grad_raw.to(hidden_s.dtype)
            if need_h:
                torch.mm(grad_raw_c, weight_s, out=grad_h[start:stop])
            if need_w:
                if h.dtype == acc:
                    grad_w.addmm_(grad_raw.t(), h)
                else:
                    grad_w += torch.mm(grad_raw_c.t(), h)
            if need_b:
                grad_b += grad_raw.sum(0)
            del grad_raw, grad_raw_c

        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight_s.dtype),
            None if grad_b is None else grad_b.to(bias_s.dtype),
        )
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.grads
        if grad_h is not None:
            grad_h = grad_h * grad_output.unsqueeze(-1).to(grad_h.dtype)
        if grad_w is not None or grad_b is not None:
            if grad_output.numel() == 0:
                scale = grad_output.new_zeros(())
            else:
                scale = grad_output[0]
                if not torch.equal(grad_output, scale.expand_as(grad_output)):
                    raise RuntimeError(
                        "fused_linear_kd: the LM-head gradient needs the same weight on every token; "
                        "reduce the per-token output with a plain (normalised) sum"
                    )
            grad_w = None if grad_w is None else grad_w * scale.to(grad_w.dtype)
            grad_b = None if grad_b is None else grad_b * scale.to(grad_b.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _generic_chunk_loss(h_s, w_s, b_s, h_t, w_t, b_t, targets, *, per_token_fn, options, heads, temperature,
                        need_grad):
    """Per-token losses of one chunk and ``d sum(losses) / d raw_student_logits`` by local autograd.

    The leaf is the biased matmul output, so autograd handles logit scale and softcap, and its gradient,
    row-summed, is also the bias gradient.
    """
    scale_s, softcap_s, scale_t, softcap_t = heads
    teacher_logits = _head(_project(h_t, w_t, b_t), scale_t, softcap_t)
    raw = _project(h_s, w_s, b_s)
    if not need_grad:
        student_logits = _head(raw, scale_s, softcap_s)
        return per_token_fn(student_logits, teacher_logits, targets, temperature=temperature, **options), None
    raw.requires_grad_(True)
    with torch.enable_grad():
        per = per_token_fn(_head(raw, scale_s, softcap_s), teacher_logits, targets, temperature=temperature,
                           **options)
        (grad_raw,) = torch.autograd.grad(per.sum(), raw)
    return per.detach(), grad_raw


class _ForwardKLWorkspace:
    """Analytic forward KL for one chunk, in three reused ``(chunk, V)`` buffers.

    Same value as ``_forward_kl_per_token`` and the exact gradient ``T * scale * (p_S - p_T)`` with respect to
    the raw student logits, but computed with in-place ops: no full-size allocation per chunk (on CPU each
    fresh large allocation is page-faulted in, which costs more than the arithmetic). Used when the student
    has no softcap.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(3)]

    def __call__(self, h_s, w_s, b_s, h_t, w_t, b_t, targets, *, per_token_fn, options, heads, temperature,
                 need_grad):
        scale_s, _, scale_t, softcap_t = heads
        n = h_s.shape[0]
        s, t, p = (b[:n] for b in self.buffers)
        _project_into(t, h_t, w_t, b_t)
        _project_into(s, h_s, w_s, b_s)
        if scale_t != 1.0:
            t.mul_(scale_t)
        if softcap_t is not None:
            t.div_(softcap_t).tanh_().mul_(softcap_t)
        if temperature != 1.0:
            t.div_(temperature)
        if scale_s / temperature != 1.0:
            s.mul_(scale_s / temperature)
        # teacher: p <- p_T, lse_t
        m_t = t.amax(-1, keepdim=True)
        torch.sub(t, m_t, out=p).exp_()
        sum_t = p.sum(-1, keepdim=True)
        p.div_(sum_t)
        lse_t = sum_t.log_().add_(m_t)
        t.sub_(s)  # z_T - z_S
        # student: s <- p_S, lse_s
        m_s = s.amax(-1, keepdim=True)
        s.sub_(m_s).exp_()
        sum_s = s.sum(-1, keepdim=True)
        s.div_(sum_s)
        lse_s = sum_s.log_().add_(m_s)
        cross = t.mul_(p).sum(-1, keepdim=True)  # <p_T, z_T - z_S>
        losses = (cross - lse_t + lse_s).squeeze(-1).mul_(temperature**2)
        if not need_grad:
            return losses, None
        return losses, s.sub_(p).mul_(temperature * scale_s)


def _project_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dtype != out.dtype:
        out.copy_(F.linear(hidden, weight, bias))
    elif bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` in the inputs' dtype (fp32 accumulation inside the matmul), as fp32."""
    return _upcast(F.linear(hidden, weight, bias))


def _head(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


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


