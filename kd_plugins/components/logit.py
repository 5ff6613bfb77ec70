"""Logit-level transfer terms: module forms of :mod:`kd_plugins.functional.logit`, computed fused.

Each term reads the final hidden states and LM heads from the captures and calls
:func:`kd_plugins.functional.fused.fused_linear_kd`, so full-vocabulary logits are never materialised. When the
teacher capture comes from an offline cache (``final_hidden`` None, ``topk_logprobs`` / ``topk_indices`` set) the
term computes the sparse top-k form instead (:func:`kd_plugins.functional.sparse.sparse_linear_kd`). The
model's own bias, logit scale and final-logit softcap are taken from the captures, so the loss sees exactly
the logits the models produce.

This module is also the built-in plugin that registers them (``forward_kl``, ``reverse_kl``,
``generalized_jsd``, ``dkd``) through :func:`kd_plugins.hookspecs.register_logit_terms`.
"""

from __future__ import annotations

from torch import Tensor

from kd_plugins.errors import IncompatibleModelsError
from kd_plugins.functional._common import check_temperature
from kd_plugins.functional.fused import fused_linear_kd
from kd_plugins.functional.logit import check_loss_options
from kd_plugins.functional.sparse import sparse_linear_kd
from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import BatchContext, DistillationTerm, ModelCapture, ModelInfo, Normalizer, Requirements

__all__ = [
    "ForwardKLLoss",
    "ReverseKLLoss",
    "GeneralizedJSDLoss",
    "DecoupledKDLoss",
    "build_forward_kl",
    "build_reverse_kl",
    "build_generalized_jsd",
    "build_dkd",
]


class _FusedLogitTerm(DistillationTerm):
    """Shared forward of the logit terms: ``fused_linear_kd`` over the captured final hidden states (or
    ``sparse_linear_kd`` against an offline top-k teacher).

    A token sum over ``batch.num_items_in_batch`` (``normalizer = ITEMS``), like the host's cross-entropy. It carries
    the task loss: :meth:`forward_with_task_loss` also returns the student's cross-entropy on ``batch.labels``,
    computed in the same chunked pass over its LM head (``return_task_loss=True``).
    """

    family = "logit"
    normalizer = Normalizer.ITEMS
    carries_task_loss = True
    loss_name = ""

    def __init__(self, *, temperature: float = 1.0, chunk_size: int = 1024, **loss_kwargs: float):
        super().__init__()
        check_temperature(temperature)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        check_loss_options(self.loss_name, loss_kwargs)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.loss_kwargs = {k: float(v) for k, v in loss_kwargs.items()}

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        """Args: captures with ``final_hidden (B, T, H)`` and ``lm_head_weight (V, H)`` (the teacher's may instead
        carry cached ``topk_logprobs`` / ``topk_indices``); ``batch.labels (B, T)`` aligned with positions.
        Returns a 0-dim fp32 loss."""
        return self._loss(student, teacher, batch)

    def forward_with_task_loss(
        self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext, *, task_grad_ratio: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loss, student cross-entropy)`` from one chunked pass over the student's LM head (see
        :meth:`kd_plugins.DistillationTerm.forward_with_task_loss`); with ``task_grad_ratio`` the CE's logit gradient
        is added to the term's before the one projection (``task_grad_ratio`` of
        :func:`~kd_plugins.functional.fused_linear_kd`, checked in backward)."""
        return self._loss(student, teacher, batch, return_task_loss=True, task_grad_ratio=task_grad_ratio)

    def _loss(self, student, teacher, batch, **task) -> Tensor | tuple[Tensor, Tensor]:
        if student.final_hidden is None or student.lm_head_weight is None:
            raise ValueError(
                f"{type(self).__name__} needs the student's final hidden states and LM head weight, but the "
                f"student capture of {student.info.name!r} has none"
            )
        # the student side and the loss options, shared by the dense and the sparse (cached teacher) form
        common = dict(
            loss=self.loss_name,
            loss_kwargs=self.loss_kwargs,
            student_bias=student.lm_head_bias,
            student_logit_scale=student.logit_scale,
            student_softcap=student.logit_softcap,
            temperature=self.temperature,
            ignore_index=batch.ignore_index,
            num_items_in_batch=batch.num_items_in_batch,
            chunk_size=self.chunk_size,
            **task,
        )
        if teacher.final_hidden is None and teacher.topk_logprobs is not None and teacher.topk_indices is not None:
            # offline teacher (top-k cache): the sparse bucket form, see kd_plugins.functional.sparse
            return sparse_linear_kd(student.final_hidden, student.lm_head_weight, teacher.topk_logprobs,
                                    teacher.topk_indices, batch.labels, **common)
        if teacher.final_hidden is None or teacher.lm_head_weight is None:
            raise ValueError(
                f"{type(self).__name__} needs the teacher's final hidden states and LM head weight (or, from an "
                f"offline cache, its top-k log-probs and indices), but the teacher capture of "
                f"{teacher.info.name!r} has neither"
            )
        return fused_linear_kd(
            student.final_hidden,
            student.lm_head_weight,
            teacher.final_hidden,
            teacher.lm_head_weight,
            batch.labels,
            teacher_bias=teacher.lm_head_bias,
            teacher_logit_scale=teacher.logit_scale,
            teacher_softcap=teacher.logit_softcap,
            **common,
        )

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.loss_kwargs.items())
        return f"temperature={self.temperature}{options}, chunk_size={self.chunk_size}"


class ForwardKLLoss(_FusedLogitTerm):
    """Forward KL ``T**2 * KL(p_T || p_S)`` (classic KD); see :func:`kd_plugins.functional.forward_kl`.

    Args:
        temperature: softmax temperature ``> 0``.
        chunk_size: tokens per fused chunk.
    """

    loss_name = "forward_kl"

    def __init__(self, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__(temperature=temperature, chunk_size=chunk_size)


class ReverseKLLoss(_FusedLogitTerm):
    """Reverse KL ``T**2 * KL(p_S || p_T)``; see :func:`kd_plugins.functional.reverse_kl`.

    Args:
        temperature: softmax temperature ``> 0``.
        chunk_size: tokens per fused chunk.
    """

    loss_name = "reverse_kl"

    def __init__(self, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__(temperature=temperature, chunk_size=chunk_size)


class GeneralizedJSDLoss(_FusedLogitTerm):
    """Generalized JSD (GKD, TRL semantics); see :func:`kd_plugins.functional.generalized_jsd`.

    Args:
        beta: in ``[0, 1]``; 0 is forward KL, 1 reverse KL.
        temperature: softmax temperature ``> 0``.
        chunk_size: tokens per fused chunk.
    """

    loss_name = "generalized_jsd"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__(temperature=temperature, chunk_size=chunk_size, beta=beta)


class DecoupledKDLoss(_FusedLogitTerm):
    """Decoupled KD ``T**2 * (alpha * TCKD + beta * NCKD)``; see :func:`kd_plugins.functional.dkd`.

    Args:
        alpha: TCKD weight ``>= 0``.
        beta: NCKD weight ``>= 0`` (mdistiller vision: 8 with ``T=4``; TAID LLM port: 0.5 with ``T=1``).
        temperature: softmax temperature ``> 0``.
        chunk_size: tokens per fused chunk.
    """

    loss_name = "dkd"

    def __init__(self, alpha: float = 1.0, beta: float = 2.0, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__(temperature=temperature, chunk_size=chunk_size, alpha=alpha, beta=beta)


# --- builders and plugin registration ------------------------------------------------------------------------


def build_forward_kl(*, student: ModelInfo, teacher: ModelInfo, **options) -> ForwardKLLoss:
    """Build :class:`ForwardKLLoss` (options: ``temperature``, ``chunk_size``)."""
    _check_same_vocabulary(student, teacher, "forward_kl")
    return ForwardKLLoss(**options)


def build_reverse_kl(*, student: ModelInfo, teacher: ModelInfo, **options) -> ReverseKLLoss:
    """Build :class:`ReverseKLLoss` (options: ``temperature``, ``chunk_size``)."""
    _check_same_vocabulary(student, teacher, "reverse_kl")
    return ReverseKLLoss(**options)


def build_generalized_jsd(*, student: ModelInfo, teacher: ModelInfo, **options) -> GeneralizedJSDLoss:
    """Build :class:`GeneralizedJSDLoss` (options: ``beta``, ``temperature``, ``chunk_size``)."""
    _check_same_vocabulary(student, teacher, "generalized_jsd")
    return GeneralizedJSDLoss(**options)


def build_dkd(*, student: ModelInfo, teacher: ModelInfo, **options) -> DecoupledKDLoss:
    """Build :class:`DecoupledKDLoss` (options: ``alpha``, ``beta``, ``temperature``, ``chunk_size``)."""
    _check_same_vocabulary(student, teacher, "dkd")
    return DecoupledKDLoss(**options)


@hookimpl
def register_logit_terms(register):
    register("forward_kl", build_forward_kl)
    register("reverse_kl", build_reverse_kl)
    register("generalized_jsd", build_generalized_jsd)
    register("dkd", build_dkd)


def _check_same_vocabulary(student: ModelInfo, teacher: ModelInfo, term: str) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise IncompatibleModelsError(
            f"logit term {term!r} compares the output distributions of student {student.name!r} "
            f"(vocab_size={student.vocab_size}) and teacher {teacher.name!r} (vocab_size={teacher.vocab_size}); "
            "teacher and student need the same tokenizer/vocabulary"
        )
