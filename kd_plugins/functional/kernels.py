"""The per-block loss kernels of the fused logit losses, one table from loss name to kernel.

A kernel works in place on one block of rows: ``z`` holds the student logits and ``y`` the teacher logits, both at
temperature 1 after the caller applied the model heads (logit scale, softcap) and the temperature. It returns the
per-token loss and, when gradients are needed, writes ``dL/dz`` over ``z`` (or returns ``(loss, c)`` having written
``dL/dz / c``: a constant factor ``c`` is folded into the caller's chain-rule scaling pass). Scratch buffers are
block-sized and overwritten.

``KERNELS`` maps each built-in loss (:mod:`kd_plugins.functional.logit`) to its kernel and the number of scratch
buffers it needs. :func:`block_engine` turns a loss name into the block function the chunk engine
(:mod:`kd_plugins.functional.chunked`) calls: the analytic kernel chained through the student head, or, for a loss
without a kernel, a generic engine that differentiates the loss's own per-token function by local autograd.

Internal to :mod:`kd_plugins.functional`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from kd_plugins.functional.chunked import block_rows, head, scale_
from kd_plugins.functional.logit import check_loss_options

__all__ = ["KERNELS", "block_engine", "teacher_head_"]


def block_engine(loss: str, options: dict, scale: float, softcap: float | None, vocab: int) -> tuple[Callable, int, int]:
    """``(block function, rows per block, scratch buffers)`` for ``loss`` with a student head of logit ``scale`` and
    ``softcap`` over a vocabulary of ``vocab``.

    Every built-in loss has an analytic kernel (:data:`KERNELS`); any other registered loss falls back to the generic
    local-autograd engine. Both run on row blocks of about ``chunked.BLOCK_ELEMENTS`` logits, so their scratch buffers and
    temporaries stay block-sized.
    """
    per_token_fn = check_loss_options(loss, options)
    rows = block_rows(vocab)
    if loss not in KERNELS:
        fn = partial(_autograd_block, per_token_fn=per_token_fn, options=options, scale=scale, softcap=softcap)
        return fn, rows, 0
    kernel, n_scratch = KERNELS[loss]
    fn = partial(_analytic_block, kernel=kernel, options=options, scale=scale, softcap=softcap)
    if softcap is not None:  # one more buffer keeps the capped logits for the chain rule
        n_scratch += 1
    return fn, rows, n_scratch


def teacher_head_(logits: Tensor, scale: float, softcap: float | None, temperature: float) -> None:
    """Apply the teacher head in place: ``softcap(scale * logits) / temperature`` (``c * tanh(x / c)`` when capped)."""
    if softcap is None:
        scale_(logits, scale / temperature)
    else:
        scale_(logits, scale)
        logits.div_(softcap).tanh_().mul_(softcap / temperature)


# --- engines --------------------------------------------------------------------------------------------------------


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
        per = per_token_fn(head(student, scale, softcap), teacher, targets, temperature=1.0, **options)
        return per * temperature**2
    leaf = student.detach().requires_grad_(True)  # shares storage; overwritten only after the gradient
    with torch.enable_grad():
        per = per_token_fn(head(leaf, scale, softcap), teacher, targets, temperature=1.0, **options)
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
        scale_(student, scale / temperature)
    else:
        scale_(student, scale)
        student.div_(softcap).tanh_()  # u
        kept = scratch.pop()
        kept.copy_(student)
        student.mul_(softcap / temperature)
    losses = kernel(student, teacher, targets, scratch, need_grad=need_grad, **options)
    factor = 1.0
    if isinstance(losses, tuple):  # (losses, a constant factor the kernel left out of its gradient)
        losses, factor = losses
    if need_grad:
        scale_(student, temperature * scale * factor)
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


# loss name -> (kernel, scratch buffers it needs)
KERNELS: dict[str, tuple[Callable, int]] = {
    "forward_kl": (_forward_kl_kernel, 1),
    "reverse_kl": (_reverse_kl_kernel, 1),
    "generalized_jsd": (_generalized_jsd_kernel, 3),
    "dkd": (_dkd_kernel, 2),
}
