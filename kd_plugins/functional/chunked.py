"""The chunk engine shared by the fused logit losses: project the student's final hidden states through its LM head
one chunk of tokens at a time, let a per-block loss function write the per-token loss and its gradient with respect
to the raw student logits in place, and turn that gradient at once into the gradients of the hidden states, the
LM-head weight and its bias -- so only ``O(N*H + V*H)`` is kept for backward, never the ``(N, V)`` logits.

What differs between front-ends is described by a :class:`ChunkPlan`: where a chunk's teacher side comes from (the
dense front-end :func:`~kd_plugins.functional.fused_linear_kd` projects the teacher's logits into a buffer; the
sparse one :func:`~kd_plugins.functional.sparse_linear_kd` reads cached top-k log-probs) and which block function
computes the loss (the kernels of :mod:`kd_plugins.functional.kernels`, or the sparse bucket loss). Optionally the
student's own cross-entropy is computed from the same projections (``ChunkPlan.task``).

Internal to :mod:`kd_plugins.functional`: the public entry points are the front-ends.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_plugins.functional._common import normalize_token_sum
from kd_plugins.functional.logit import upcast

__all__ = [
    "BLOCK_ELEMENTS",
    "ChunkPlan",
    "FusedLinearKD",
    "block_rows",
    "head",
    "normalise_outputs",
    "project",
    "project_into",
    "scale_",
    "task_head",
]

# The elementwise work (loss kernels, the CE, the generic engine) runs on row blocks of about this many logits
# (24 MiB in fp32, 128 rows at V=49152), while the matmuls run on whole chunks: the block's scratch buffers are
# reused and its temporaries come from the allocator's free lists instead of fresh page-faulted memory (on CPU
# that costs more than the arithmetic). Measured at N=4k on 2 cores, blocks of 8 to 128 rows were within
# run-to-run noise of each other.
BLOCK_ELEMENTS = 6 << 20


def block_rows(vocab: int) -> int:
    """Rows of a ``vocab``-wide block of about :data:`BLOCK_ELEMENTS` logits (read at call time, so tests can shrink
    it to force several blocks per chunk)."""
    return max(1, BLOCK_ELEMENTS // vocab)


class ChunkPlan(NamedTuple):
    """What :class:`FusedLinearKD` does per chunk, so the dense and the sparse (top-k) teacher share the loop.

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
    # (logit scale, softcap, task_grad_ratio) of the student head: also the CE, see task_head
    task: tuple[float, float | None, float | None] | None = None


class FusedLinearKD(torch.autograd.Function):
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
            project_into(student, h, weight_s, bias_s)
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
        scale_(x, self.scale)
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
            scale_(x, self.scale)
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


def task_head(return_task_loss, task_grad_ratio, scale, softcap):
    """The ``task`` entry of a :class:`ChunkPlan`: ``(scale, softcap, ratio)`` of the fused CE, or None."""
    if task_grad_ratio is not None:
        if not return_task_loss:
            raise ValueError("task_grad_ratio only applies with return_task_loss=True")
        if not (math.isfinite(task_grad_ratio) and task_grad_ratio >= 0):
            raise ValueError(f"task_grad_ratio must be a finite number >= 0 or None, got {task_grad_ratio!r}")
        task_grad_ratio = float(task_grad_ratio)
    return (scale, softcap, task_grad_ratio) if return_task_loss else None


def normalise_outputs(out, num_items_in_batch):
    """Per-token output(s) of :class:`FusedLinearKD` -> normalised token sum(s)."""
    if isinstance(out, tuple):
        return tuple(normalise_outputs(o, num_items_in_batch) for o in out)
    return normalize_token_sum(out, torch.ones_like(out, dtype=torch.bool), num_items_in_batch)


def scale_(x: Tensor, factor: float) -> None:
    if factor != 1.0:
        x.mul_(factor)


def project_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dtype != out.dtype:
        out.copy_(F.linear(hidden, weight, bias))
    elif bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` in the inputs' dtype (fp32 accumulation inside the matmul), as fp32."""
    return upcast(F.linear(hidden, weight, bias))


def head(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
