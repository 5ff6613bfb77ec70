"""Fused, chunked LM-head + logit KD: never materialises the full ``(N, V)`` logits of either model.

:func:`fused_linear_kd` projects the final hidden states of student and teacher through their LM heads one chunk
of tokens at a time and computes, in place in the chunk's logit buffers, the per-token loss and its exact
gradient with respect to the student logits by an analytic kernel per loss (forward KL ``p - q``; reverse KL
``p * (log p - log q - L)``; generalized JSD ``(1 - beta) * p * (log p - log m - KL(p||m))``; DKD, see
``_dkd_kernel``), chained through the student head (logit scale, temperature, softcap). A per-token function
without a kernel falls back to a generic engine (``torch.autograd.grad`` on a local leaf). The chunk's logit
gradient is immediately turned into the gradient of the student hidden states and accumulated into the
gradient of the LM head, so only ``O(N*H + V*H)`` is kept for backward.

Memory: one chunk of ``chunk_size * V`` fp32 logits (a few copies of it while the loss is differentiated) instead
of ``2 * N * V``. Positions whose label is ``ignore_index`` are dropped before the projection, so padding and
prompt tokens cost nothing.

:func:`linear_kd_reference` is the plain-autograd equivalent (full logits) for parity tests.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_plugins.functional._common import IGNORE_INDEX, check_temperature, normalize_token_sum, valid_mask
from kd_plugins.functional.logit import (
    _check_loss_options,
    _dkd_per_token,
    _forward_kl_per_token,
    _generalized_jsd_per_token,
    _reverse_kl_per_token,
    _upcast,
    dkd,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)

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
    n, vocab = hidden_s.shape[0], student_weight.shape[0]
    block_loss, block_rows, n_scratch = _block_engine(per_token_fn, options, student_logit_scale, student_softcap, vocab)
    teacher_head = (hidden_t, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                    teacher_logit_scale, teacher_softcap, temperature)
    plan = _ChunkPlan(
        teacher_chunk=partial(_dense_teacher_chunk, teacher_head),
        block_loss=partial(block_loss, temperature=temperature),
        block_rows=block_rows,
        n_scratch=n_scratch,
        teacher_buffer=True,
        chunk_size=chunk_size,
        task=_task_head(return_task_loss, task_grad_ratio, student_logit_scale, student_softcap),
    )
    out = _FusedLinearKD.apply(hidden_s, student_weight, student_bias, targets, plan, torch.is_grad_enabled())
    return _normalise_outputs(out, num_items_in_batch)


def _task_head(return_task_loss, task_grad_ratio, scale, softcap):
    """The ``task`` entry of a :class:`_ChunkPlan`: ``(scale, softcap, ratio)`` of the fused CE, or None."""
    if task_grad_ratio is not None:
        if not return_task_loss:
            raise ValueError("task_grad_ratio only applies with return_task_loss=True")
        if not (math.isfinite(task_grad_ratio) and task_grad_ratio >= 0):
            raise ValueError(f"task_grad_ratio must be a finite number >= 0 or None, got {task_grad_ratio!r}")
        task_grad_ratio = float(task_grad_ratio)
    return (scale, softcap, task_grad_ratio) if return_task_loss else None


def _normalise_outputs(out, num_items_in_batch):
    """Per-token output(s) of :class:`_FusedLinearKD` -> normalised token sum(s)."""
    if isinstance(out, tuple):
        return tuple(_normalise_outputs(o, num_items_in_batch) for o in out)
    return normalize_token_sum(out, torch.ones_like(out, dtype=torch.bool), num_items_in_batch)


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
    logits = _head(_project(hidden, weight, bias), logit_scale, softcap)
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


# The elementwise work (loss kernels, the CE, the generic engine) runs on row blocks of about this many logits
# (24 MiB in fp32, 128 rows at V=49152), while the matmuls run on whole chunks: the block's scratch buffers are
# reused and its temporaries come from the allocator's free lists instead of fresh page-faulted memory (on CPU
# that costs more than the arithmetic). Measured at N=4k on 2 cores, blocks of 8 to 128 rows were within
# run-to-run noise of each other.
_BLOCK_ELEMENTS = 6 << 20


class _ChunkPlan(NamedTuple):
    """What :class:`_FusedLinearKD` does per chunk, so the dense and the sparse (top-k) teacher share the loop.

    ``teacher_chunk(start, stop, buffer)`` returns the teacher side of rows ``start:stop`` (the dense path
    projects the teacher logits into ``buffer``); ``block_loss(student, teacher_rows, targets, scratch,
    need_grad=...)`` returns per-token losses and writes ``d loss / d raw student logits`` over ``student``.
    """

    teacher_chunk: Callable
    block_loss: Callable
    block_rows: int
    n_scratch: int
    teacher_buffer: bool
    chunk_size: int
    # (logit scale, softcap, task_grad_ratio) of the student head: also the CE, see _task_head
    task: tuple[float, float | None, float | None] | None = None


class _FusedLinearKD(torch.autograd.Function):
    """Returns per-token losses ``(n,)`` of the valid rows; gradients are computed in ``forward``.

    The LM-head gradient is accumulated over tokens during ``forward`` with unit per-token weights, so
    ``backward`` needs a uniform ``grad_output`` -- which it always gets, because the only consumer is the
    token sum in ``normalize_token_sum``.

    With ``plan.task`` it also returns the per-token cross-entropy of the student's own logits (temperature 1)
    against ``targets``, from the same projection of each chunk: its gradient ``softmax(x) - onehot`` is kept in a
    second chunk buffer and turned into separate hidden-state / LM-head gradients, so ``backward`` can weight the
    KD and the CE outputs independently (the scheduler decides the KD weight after the forward; gradient probes
    ask for one output at a time). Returns ``(kd, ce)`` then. When the caller knows the ratio of the two
    weights in advance (``task_grad_ratio``), the CE gradient is instead added to the KD gradient block by block
    and projected with it; ``backward`` then checks that ratio.
    """

    @staticmethod
    def forward(ctx, hidden_s, weight_s, bias_s, targets, plan, grad_enabled):
        need_h, need_w, need_b = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        n, vocab = hidden_s.shape[0], weight_s.shape[0]
        acc = torch.promote_types(hidden_s.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        device = hidden_s.device
        losses = torch.empty(n, dtype=acc, device=device)
        grad_h = torch.empty_like(hidden_s) if need_h else None
        grad_w = torch.empty(weight_s.shape, dtype=acc, device=device) if need_w else None  # first chunk writes it
        grad_b = torch.zeros(bias_s.shape, dtype=acc, device=device) if need_b else None

        chunk_size, block_rows = plan.chunk_size, plan.block_rows
        rows = min(chunk_size, n)
        student_buf = torch.empty(rows, vocab, dtype=acc, device=device)
        teacher_buf = torch.empty(rows, vocab, dtype=acc, device=device) if plan.teacher_buffer else None
        scratch = [torch.empty(min(block_rows, rows), vocab, dtype=acc, device=device) for _ in range(plan.n_scratch)]
        task = None
        if plan.task is not None:
            task = _TaskGrads(plan.task, hidden_s, weight_s, bias_s, rows, min(block_rows, rows), acc, need_h, need_w,
                              need_b)

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden_s[start:stop]
            student = student_buf[: stop - start]
            teacher = plan.teacher_chunk(start, stop, None if teacher_buf is None else teacher_buf[: stop - start])
            _project_into(student, h, weight_s, bias_s)
            # per block: losses, and d(loss)/d(raw student logits) written over the student logits
            for lo in range(0, stop - start, block_rows):
                hi = min(lo + block_rows, stop - start)
                if task is not None:  # before the KD kernel overwrites the logits
                    task.block(start, lo, hi, student[lo:hi], targets[start + lo : start + hi], need_grad)
                losses[start + lo : start + hi] = plan.block_loss(
                    student[lo:hi], _rows(teacher, lo, hi), targets[start + lo : start + hi],
                    [b[: hi - lo] for b in scratch], need_grad=need_grad,
                )
                if task is not None and task.ratio is not None and need_grad:
                    task.add_to(student[lo:hi], lo, hi)
            if not need_grad:
                continue
            grad_raw = student
            grad_raw_c = grad_raw if grad_raw.dtype == hidden_s.dtype else grad_raw.to(hidden_s.dtype)
            if need_h:
                torch.mm(grad_raw_c, weight_s, out=grad_h[start:stop])
            if need_w:
                if start == 0:
                    torch.mm(grad_raw.t(), h.to(acc), out=grad_w)
                elif h.dtype == acc:
                    grad_w.addmm_(grad_raw.t(), h)
                else:
                    grad_w += torch.mm(grad_raw_c.t(), h)
            if need_b:
                grad_b += grad_raw.sum(0)
            del grad_raw, grad_raw_c
            if task is not None:
                task.backward_chunk(start, stop, h, weight_s)

        if grad_w is not None and n == 0:
            grad_w.zero_()
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight_s.dtype),
            None if grad_b is None else grad_b.to(bias_s.dtype),
        )
        task_grads = None if task is None else task.finish(weight_s, bias_s)
        ctx.task_ratio = None if task is None else task.ratio
        ctx.task_grads = None if ctx.task_ratio is not None else task_grads
        if task is None:
            return losses
        return losses, task.losses

    @staticmethod
    def backward(ctx, grad_output, grad_task=None):
        if ctx.task_ratio is not None:  # the CE gradient is already inside ctx.grads, weighted by the ratio
            _check_task_ratio(grad_output, grad_task, ctx.task_ratio)
        grads = _scaled_grads(ctx.grads, grad_output)
        if ctx.task_grads is not None and grad_task is not None:
            task = _scaled_grads(ctx.task_grads, grad_task)
            grads = tuple(g if t is None else (t if g is None else g + t) for g, t in zip(grads, task))
        return (*grads, None, None, None)


def _check_task_ratio(grad_kd: Tensor, grad_task: Tensor | None, ratio: float) -> None:
    """``backward`` of a call with ``task_grad_ratio``: the CE output's gradient must be ``ratio`` times the KD
    output's (up to float rounding), token by token, or the combined gradient would be wrong."""
    if grad_kd.numel() == 0:  # no valid rows: nothing was combined
        return
    if grad_task is None:
        grad_task = torch.zeros_like(grad_kd)
    expected = grad_kd * ratio
    if not torch.allclose(grad_task, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())):
        got = grad_task.abs().max() / grad_kd.abs().max().clamp_min(torch.finfo(grad_kd.dtype).tiny)
        raise RuntimeError(
            f"fused_linear_kd was called with task_grad_ratio={ratio:g}, so the KD and CE gradients were combined "
            f"before the LM head, but backward received CE / KD output gradients in the ratio {float(got):g}. Use "
            "the outputs only as a * kd + a * task_grad_ratio * ce, or pass task_grad_ratio=None when the "
            "weights are not known before the forward (or the outputs are differentiated separately)"
        )


def _scaled_grads(grads, grad_output):
    """``(grad_h, grad_w, grad_b)`` computed with unit per-token weights, times this output's ``grad_output``."""
    grad_h, grad_w, grad_b = grads
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
    return grad_h, grad_w, grad_b


class _TaskGrads:
    """The student's own cross-entropy inside the fused loop: per-token ``lse(x) - x[target]`` of the model's
    logits ``x = softcap(scale * raw)`` (temperature 1) and, when gradients are needed, ``d CE / d raw``.

    Without a ratio the gradient is kept in its own chunk buffer and projected to separate hidden-state / LM-head
    / bias gradients. With ``ratio`` (``task_grad_ratio``) it lives in a block-sized buffer and :meth:`add_to`
    adds ``ratio *`` it to the KD gradient of the same block, so it is projected together with the KD's."""

    def __init__(self, head, hidden_s, weight_s, bias_s, rows, block_rows, acc, need_h, need_w, need_b):
        self.scale, self.softcap, self.ratio = head
        n, vocab, device = hidden_s.shape[0], weight_s.shape[0], hidden_s.device
        self.acc, self.dtype = acc, hidden_s.dtype
        self.losses = torch.empty(n, dtype=acc, device=device)
        self.buf = torch.empty(rows if self.ratio is None else block_rows, vocab, dtype=acc, device=device)
        if self.ratio is not None:  # projected with the KD gradient: none of its own
            need_h = need_w = need_b = False
        self.need_h, self.need_w, self.need_b = need_h, need_w, need_b
        self.grad_h = torch.empty_like(hidden_s) if need_h else None
        self.grad_w = torch.empty(weight_s.shape, dtype=acc, device=device) if need_w else None
        self.grad_b = torch.zeros(bias_s.shape, dtype=acc, device=device) if need_b else None
        self.first = True

    def _rows(self, lo, hi):
        return self.buf[lo:hi] if self.ratio is None else self.buf[: hi - lo]

    def block(self, start, lo, hi, raw, targets, need_grad):
        """Per-token CE of chunk rows ``lo:hi`` (the chunk starts at row ``start``) from their raw logits ``raw``
        (left unchanged); ``d CE / d raw`` kept in this object's buffer."""
        x = self._rows(lo, hi)
        x.copy_(raw)
        self.losses[start + lo : start + hi] = self._block(x, targets, need_grad)

    def add_to(self, grad_raw, lo, hi):
        """``grad_raw += ratio * d CE / d raw`` for chunk rows ``lo:hi``."""
        grad_raw.add_(self._rows(lo, hi), alpha=self.ratio)

    def _block(self, x, targets, need_grad):
        _scale_(x, self.scale)
        slope = None
        if self.softcap is not None:
            x.div_(self.softcap).tanh_()
            slope = (x * x).neg_().add_(1.0) if need_grad else None  # d tanh
            x.mul_(self.softcap)
        index = targets.long().unsqueeze(-1)
        x_t = x.gather(-1, index).squeeze(-1)
        top = x.amax(-1, keepdim=True)
        total = x.sub_(top).exp_().sum(-1, keepdim=True)  # x = exp(x - max)
        losses = total.log().add_(top).squeeze(-1).sub_(x_t)  # lse - x[target]
        if need_grad:
            x.div_(total).scatter_add_(-1, index, torch.full_like(index, -1, dtype=x.dtype))  # softmax - onehot
            _scale_(x, self.scale)
            if slope is not None:
                x.mul_(slope)
        return losses

    def backward_chunk(self, start, stop, h, weight_s):
        if not (self.need_h or self.need_w or self.need_b):
            return
        g = self.buf[: stop - start]
        g_c = g if g.dtype == self.dtype else g.to(self.dtype)
        if self.need_h:
            torch.mm(g_c, weight_s, out=self.grad_h[start:stop])
        if self.need_w:
            if self.first:
                torch.mm(g.t(), h.to(self.acc), out=self.grad_w)
            elif h.dtype == self.acc:
                self.grad_w.addmm_(g.t(), h)
            else:
                self.grad_w += torch.mm(g_c.t(), h)
        if self.need_b:
            self.grad_b += g.sum(0)
        self.first = False

    def finish(self, weight_s, bias_s):
        if self.grad_w is not None and self.first:  # no rows
            self.grad_w.zero_()
        self.buf = None
        return (
            self.grad_h,
            None if self.grad_w is None else self.grad_w.to(weight_s.dtype),
            None if self.grad_b is None else self.grad_b.to(bias_s.dtype),
        )


def _rows(teacher, lo, hi):
    """Rows ``lo:hi`` of a teacher chunk: a tensor, or a tuple of per-row tensors (sparse teacher)."""
    if isinstance(teacher, tuple):
        return tuple(t[lo:hi] for t in teacher)
    return teacher[lo:hi]


def _dense_teacher_chunk(teacher_head, start, stop, buffer):
    hidden_t, weight_t, bias_t, scale_t, softcap_t, temperature = teacher_head
    _project_into(buffer, hidden_t[start:stop], weight_t, bias_t)
    _teacher_head_(buffer, scale_t, softcap_t, temperature)
    return buffer


def _block_engine(per_token_fn, options, scale, softcap, vocab):
    """Pick the block function, rows per block and number of scratch buffers for one call.

    Every built-in loss has an analytic gradient (``_ANALYTIC``); an unknown per-token function falls back to the
    generic local-autograd engine. Both run on row blocks of about ``_BLOCK_ELEMENTS`` logits: their scratch
    buffers and temporaries are block-sized and stay in cache between the kernel's passes.
    """
    small_rows = max(1, _BLOCK_ELEMENTS // vocab)
    analytic = _ANALYTIC.get(per_token_fn)
    if analytic is None:
        fn = partial(_autograd_block, per_token_fn=per_token_fn, options=options, scale=scale, softcap=softcap)
        return fn, small_rows, 0
    kernel, n_scratch = analytic
    fn = partial(_analytic_block, kernel=kernel, options=options, scale=scale, softcap=softcap)
    if softcap is not None:  # one more buffer keeps the capped logits for the chain rule
        n_scratch += 1
    return fn, small_rows, n_scratch


def _autograd_block(student, teacher, targets, scratch, *, temperature, need_grad, per_token_fn, options, scale,
                    softcap):
    """Generic engine for one block (fallback for a per-token function without an analytic kernel): per-token
    losses by the loss's own per-token function, and their exact gradient with respect to the raw (biased)
    student logits by local autograd, written over ``student``.

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


def _analytic_block(student, teacher, targets, scratch, *, temperature, need_grad, kernel, options, scale, softcap):
    """Analytic engine for one block, in place: apply the student head at temperature ``T`` (``z``), let the
    loss kernel compute the per-token loss ``L(z, y)`` at temperature 1 and write ``dL/dz`` over ``student``,
    then chain through the head: ``d/dx [T**2 L] = T**2 * dL/dz * dz/dx`` with ``dz/dx = s / T`` (no softcap)
    or ``(s / T) * (1 - u**2)``, ``u = tanh(s * x / c) = z * T / c`` (softcap ``c``).

    ``teacher`` already holds the teacher logits at temperature ``T`` (``y``).
    """
    if softcap is None:
        _scale_(student, scale / temperature)
    else:
        _scale_(student, scale)
        student.div_(softcap).tanh_()  # u
        kept = scratch.pop()
        kept.copy_(student)
        student.mul_(softcap / temperature)
    losses = kernel(student, teacher, targets, scratch, need_grad=need_grad, **options)
    factor = 1.0
    if isinstance(losses, tuple):  # (losses, a constant factor the kernel left out of its gradient)
        losses, factor = losses
    if need_grad:
        _scale_(student, temperature * scale * factor)
        if softcap is not None:
            student.mul_(kept.mul_(kept).neg_().add_(1.0))
    return losses.mul_(temperature**2)


# --- analytic loss kernels: logits z (student) and y (teacher) at T=1, rows of a block --------------------------
# Each returns the per-token loss and, when ``need_grad``, writes dL/dz over ``z``, or ``(loss, c)`` having written
# dL/dz / c (a constant ``c`` is folded into the chain rule's scaling pass). Buffers are overwritten.


def _forward_kl_kernel(z, y, targets, scratch, *, need_grad):
    """``KL(q || p)``, ``p = softmax(z)``, ``q = softmax(y)``; ``dL/dz = p - q``."""
    (buf,) = scratch
    torch.log_softmax(y, -1, out=buf)  # buf = log q
    torch.log_softmax(z, -1, out=y)  # y = log p
    torch.exp(y, out=z)  # z = p
    torch.sub(buf, y, out=y)  # y = log q - log p
    buf.exp_()  # buf = q
    losses = y.mul_(buf).sum(-1)
    if need_grad:
        z.sub_(buf)
    return losses


def _reverse_kl_kernel(z, y, targets, scratch, *, need_grad):
    """``KL(p || q)``; ``dL/dz_j = p_j * (log p_j - log q_j - L)``."""
    (buf,) = scratch
    torch.log_softmax(y, -1, out=buf)  # buf = log q
    torch.log_softmax(z, -1, out=y)  # y = log p
    torch.exp(y, out=z)  # z = p
    y.sub_(buf)  # y = log p - log q
    losses = torch.mul(z, y, out=buf).sum(-1)
    if need_grad:
        z.mul_(y.sub_(losses.unsqueeze(-1)))
    return losses


def _generalized_jsd_kernel(z, y, targets, scratch, *, need_grad, beta=0.5):
    """``beta * KL(q || m) + (1 - beta) * KL(p || m)``, ``m = beta q + (1 - beta) p``. ``dL/dp_j = (1 - beta) *
    (log p_j - log m_j)`` (the ``q/m`` terms cancel), so ``dL/dz = (1 - beta) * p * (r - KL(p || m))`` with
    ``r = log p - log m``; the factor ``1 - beta`` is returned for the caller's scaling pass.

    ``m`` is formed in probability space (one ``lerp``) and its log taken once -- fewer full-vocabulary passes
    than ``logaddexp`` of the two log-probabilities. ``m`` is clamped to the smallest normal float before the
    log: where both ``p`` and ``q`` underflow to 0 the entry contributes ``0 * finite`` instead of ``0 * -inf``.
    """
    if beta == 0.0:
        return _forward_kl_kernel(z, y, targets, scratch[:1], need_grad=need_grad)
    if beta == 1.0:
        return _reverse_kl_kernel(z, y, targets, scratch[:1], need_grad=need_grad)
    log_p, log_q, log_m = scratch
    torch.log_softmax(z, -1, out=log_p)
    torch.log_softmax(y, -1, out=log_q)
    torch.exp(log_p, out=z)  # z = p
    torch.exp(log_q, out=y)  # y = q
    torch.lerp(z, y, beta, out=log_m).clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
    kl_teacher = y.mul_(log_q.sub_(log_m)).sum(-1)  # y, log_q are free after this
    log_p.sub_(log_m)  # r = log p - log m
    p_r = torch.mul(z, log_p, out=log_q)
    kl_student = p_r.sum(-1)
    losses = kl_teacher.mul_(beta).add_(kl_student, alpha=1.0 - beta)
    if need_grad:  # p * r - p * KL(p || m) in one pass; the factor (1 - beta) is applied by the caller
        torch.addcmul(p_r, z, kl_student.unsqueeze(-1), value=-1.0, out=z)
    return losses, 1.0 - beta


def _dkd_kernel(z, y, targets, scratch, *, need_grad, alpha=1.0, beta=2.0):
    """``alpha * TCKD + beta * NCKD``. With ``p_hat`` / ``q_hat`` the non-target distributions and ``p_t``,
    ``q_t`` the target probabilities, the gradient is ``dL/dz_t = alpha * (p_t - q_t)`` and, for ``j != t``,
    ``dL/dz_j = p_hat_j * (alpha * (q_t - p_t) + beta) - beta * q_hat_j``.

    The non-target distributions come from one ``log_softmax`` each over the logits with the target set to
    ``-inf``; the non-target log-sum-exp is then read off one non-target column (``z_j - log p_hat_j``), so the
    binary (TCKD) part needs no further full-vocabulary pass.
    """
    if z.shape[-1] < 2:
        raise ValueError(f"dkd needs a vocabulary of at least 2 tokens, got V={z.shape[-1]}")
    log_p_hat, log_q_hat = scratch
    index = targets.long().unsqueeze(-1)
    z_t, y_t = z.gather(-1, index).squeeze(-1), y.gather(-1, index).squeeze(-1)
    z.scatter_(-1, index, float("-inf"))
    y.scatter_(-1, index, float("-inf"))
    torch.log_softmax(z, -1, out=log_p_hat)  # -inf at the target
    torch.log_softmax(y, -1, out=log_q_hat)
    other = (index == 0).long()  # a non-target column: 0, or 1 where the target is 0
    lse_nt_s = (z.gather(-1, other) - log_p_hat.gather(-1, other)).squeeze(-1)
    lse_nt_t = (y.gather(-1, other) - log_q_hat.gather(-1, other)).squeeze(-1)
    torch.exp(log_p_hat, out=z)  # p_hat, 0 at the target
    torch.exp(log_q_hat, out=y)  # q_hat, 0 at the target
    log_p_hat.scatter_(-1, index, 0.0)
    log_q_hat.scatter_(-1, index, 0.0).sub_(log_p_hat)  # log q_hat - log p_hat, 0 at the target
    nckd = torch.mul(y, log_q_hat, out=log_p_hat).sum(-1)

    lse_s, lse_t = torch.logaddexp(z_t, lse_nt_s), torch.logaddexp(y_t, lse_nt_t)
    log_pt_s, log_rest_s = z_t - lse_s, lse_nt_s - lse_s
    log_pt_t, log_rest_t = y_t - lse_t, lse_nt_t - lse_t
    pt_s, pt_t = log_pt_s.exp(), log_pt_t.exp()
    tckd = pt_t * (log_pt_t - log_pt_s) + log_rest_t.exp() * (log_rest_t - log_rest_s)
    if need_grad:
        z.mul_((alpha * (pt_t - pt_s) + beta).unsqueeze(-1)).sub_(y, alpha=beta)
        z.scatter_(-1, index, (alpha * (pt_s - pt_t)).unsqueeze(-1))
    return tckd.mul_(alpha).add_(nckd, alpha=beta)


# per-token function -> (kernel, scratch buffers it needs)
_ANALYTIC = {
    _forward_kl_per_token: (_forward_kl_kernel, 1),
    _reverse_kl_per_token: (_reverse_kl_kernel, 1),
    _generalized_jsd_per_token: (_generalized_jsd_kernel, 3),
    _dkd_per_token: (_dkd_kernel, 2),
}


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


