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

from functools import partial

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
        torch.is_grad_enabled(),  # under no_grad (evaluation) skip the gradient work entirely
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


# The generic engine's elementwise work runs on row blocks of about this many logits (24 MiB in fp32, 128 rows at V=49152): the
# temporaries of the generic autograd engine then come from the allocator's free lists instead of fresh
# page-faulted memory (on CPU that costs more than the arithmetic), while the matmuls still run on whole
# chunks. Much smaller blocks were slower on a 2-core CPU (per-op overhead).
_BLOCK_ELEMENTS = 6 << 20


class _FusedLinearKD(torch.autograd.Function):
    """Returns per-token losses ``(n,)`` of the valid rows; gradients are computed in ``forward``.

    The LM-head gradient is accumulated over tokens during ``forward`` with unit per-token weights, so
    ``backward`` needs a uniform ``grad_output`` -- which it always gets, because the only consumer is the
    token sum in ``normalize_token_sum``.
    """

    @staticmethod
    def forward(ctx, hidden_s, weight_s, bias_s, hidden_t, weight_t, bias_t, targets, per_token_fn, options,
                heads, temperature, chunk_size, grad_enabled):
        scale_s, softcap_s, scale_t, softcap_t = heads
        need_h, need_w, need_b = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        n, vocab = hidden_s.shape[0], weight_s.shape[0]
        acc = torch.promote_types(hidden_s.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        device = hidden_s.device
        losses = torch.empty(n, dtype=acc, device=device)
        grad_h = torch.empty_like(hidden_s) if need_h else None
        grad_w = torch.zeros(weight_s.shape, dtype=acc, device=device) if need_w else None
        grad_b = torch.zeros(bias_s.shape, dtype=acc, device=device) if need_b else None

        if per_token_fn is _forward_kl_per_token and softcap_s is None:
            block_loss = partial(_forward_kl_block, scale=scale_s)
        else:
            block_loss = partial(_autograd_block, per_token_fn=per_token_fn, options=options, scale=scale_s,
                                 softcap=softcap_s)
        rows = min(chunk_size, n)
        student_buf = torch.empty(rows, vocab, dtype=acc, device=device)
        teacher_buf = torch.empty(rows, vocab, dtype=acc, device=device)
        # the analytic block allocates nothing of size V, so it runs on whole chunks (measured faster)
        block_rows = rows if block_loss.func is _forward_kl_block else max(1, _BLOCK_ELEMENTS // vocab)
        scratch = torch.empty(min(block_rows, rows), vocab, dtype=acc, device=device)

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden_s[start:stop]
            student, teacher = student_buf[: stop - start], teacher_buf[: stop - start]
            _project_into(teacher, hidden_t[start:stop], weight_t, bias_t)
            _teacher_head_(teacher, scale_t, softcap_t, temperature)
            _project_into(student, h, weight_s, bias_s)
            # per block: losses, and d(loss)/d(raw student logits) written over the student logits
            for lo in range(0, stop - start, block_rows):
                hi = min(lo + block_rows, stop - start)
                losses[start + lo : start + hi] = block_loss(
                    student[lo:hi], teacher[lo:hi], targets[start + lo : start + hi], scratch[: hi - lo],
                    temperature=temperature, need_grad=need_grad,
                )
            if not need_grad:
                continue
            grad_raw = student
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
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


def _autograd_block(student, teacher, targets, scratch, *, temperature, need_grad, per_token_fn, options, scale,
                    softcap):
    """Generic engine for one block: per-token losses by the loss's own per-token function, and their exact
    gradient with respect to the raw (biased) student logits by local autograd, written over ``student``.

    ``teacher`` already holds teacher logits divided by ``T``; the student head is divided by ``T`` too
    (``c * tanh(s * x / c) / T`` equals the head with scale ``s / T`` and cap ``c / T``), so the per-token
    function runs at temperature 1 and the ``T**2`` factor is applied here.
    """
    scale, softcap = scale / temperature, (None if softcap is None else softcap / temperature)
    if not need_grad:
        per = per_token_fn(_head(student, scale, softcap), teacher, targets, temperature=1.0, **options)
        return per * temperature**2
    leaf = student.detach().requires_grad_(True)  # shares storage; overwritten only after the gradient
    with torch.enable_grad():
        per = per_token_fn(_head(leaf, scale, softcap), teacher, targets, temperature=1.0, **options)
        per = per * temperature**2
        (grad,) = torch.autograd.grad(per.sum(), leaf)
    student.copy_(grad)
    return per.detach()


def _forward_kl_block(student, teacher, targets, scratch, *, temperature, need_grad, scale):
    """Analytic forward KL for one block (student without softcap), in place in ``student``, ``teacher`` and
    ``scratch``: the same value as ``_forward_kl_per_token`` and the exact gradient
    ``T * scale * (p_S - p_T)`` with respect to the raw student logits, written over ``student``.
    ``teacher`` already holds teacher logits divided by ``T``.
    """
    _scale_(student, scale / temperature)
    torch.log_softmax(teacher, -1, out=scratch)  # scratch = log p_T
    torch.log_softmax(student, -1, out=teacher)  # teacher = log p_S
    torch.exp(teacher, out=student)  # student = p_S
    torch.sub(scratch, teacher, out=teacher)  # teacher = log p_T - log p_S
    scratch.exp_()  # scratch = p_T
    losses = teacher.mul_(scratch).sum(-1).mul_(temperature**2)
    if need_grad:
        _scale_(student.sub_(scratch), temperature * scale)
    return losses


def _teacher_head_(logits: Tensor, scale: float, softcap: float | None, temperature: float) -> None:
    if softcap is None:
        _scale_(logits, scale / temperature)
    else:
        _scale_(logits, scale)
        logits.div_(softcap).tanh_().mul_(softcap / temperature)


def _scale_(x: Tensor, factor: float) -> None:
    if factor != 1.0:
        x.mul_(factor)


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


