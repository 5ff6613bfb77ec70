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
from kd_plugins.types import BatchContext, DistillationTerm, ModelCapture, ModelInfo, Requirements

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
    """Shared forward of the logit terms: ``fused_linear_kd`` over the captured final hidden states.

    It can also carry the task loss: after :meth:`request_task_loss`, the next forward computes the student's
    cross-entropy on ``batch.labels`` in the same chunked pass over its LM head (``return_task_loss=True``) and
    keeps it for :meth:`take_task_loss`; the term's own output is unchanged. The :class:`~kd_plugins.Distiller`
    does this when called with ``task_loss="fused"``.
    """

    family = "logit"
    loss_name = ""
    can_fuse_task_loss = True

    def __init__(self, *, temperature: float = 1.0, chunk_size: int = 1024, **loss_kwargs: float):
        super().__init__()
        check_temperature(temperature)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        check_loss_options(self.loss_name, loss_kwargs)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.loss_kwargs = {k: float(v) for k, v in loss_kwargs.items()}
        self._task_requested = False
        self._task_grad_ratio: float | None = None
        self._task_loss: Tensor | None = None

    def request_task_loss(self, grad_ratio: float | None = None) -> None:
        """Compute the student's CE alongside the next forward (see the class docstring).

        ``grad_ratio``: the caller's promise that the term's output and the CE are used only as
        ``a * term + a * grad_ratio * ce``; their gradients are then combined before the LM head
        (``task_grad_ratio`` of :func:`~kd_plugins.functional.fused.fused_linear_kd`). None: kept separate.
        """
        self._task_requested, self._task_grad_ratio, self._task_loss = True, grad_ratio, None

    def take_task_loss(self) -> Tensor:
        """The CE computed by the last forward after :meth:`request_task_loss` (then forgotten)."""
        loss, self._task_loss, self._task_requested = self._task_loss, None, False
        if loss is None:
            raise RuntimeError(f"{type(self).__name__}: no task loss was computed; call request_task_loss() first")
        return loss

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        """Args: captures with ``final_hidden (B, T, H)`` and ``lm_head_weight (V, H)``; ``batch.labels (B, T)``
        aligned with positions. Returns a 0-dim fp32 loss."""
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
            return_task_loss=self._task_requested,
            task_grad_ratio=self._task_grad_ratio if self._task_requested else None,
        )
        if teacher.final_hidden is None and teacher.topk_logprobs is not None and teacher.topk_indices is not None:
            # offline teacher (top-k cache): the sparse bucket form, see kd_plugins.functional.sparse
            out = sparse_linear_kd(student.final_hidden, student.lm_head_weight, teacher.topk_logprobs,
                                   teacher.topk_indices, batch.labels, **common)
            return self._keep_task_loss(out)
        if teacher.final_hidden is None or teacher.lm_head_weight is None:
            raise ValueError(
                f"{type(self).__name__} needs the teacher's final hidden states and LM head weight (or, from an "
                f"offline cache, its top-k log-probs and indices), but the teacher capture of "
                f"{teacher.info.name!r} has neither"
            )
        out = fused_linear_kd(
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
        return self._keep_task_loss(out)

    def _keep_task_loss(self, out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        if not self._task_requested:
            return out
        self._task_requested, self._task_grad_ratio = False, None
        loss, self._task_loss = out
        return loss

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
