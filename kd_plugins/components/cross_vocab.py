"""Logit terms for a teacher with another vocabulary: module forms and their builders.

=========================  ==================================  ===============================
term (registered name)     class                               functional
=========================  ==================================  ===============================
``uld``                    :class:`ULDLoss`                    ``uld``
``cross_vocab_kd``         :class:`CrossVocabKDLoss`           ``cross_vocab_kd``
=========================  ==================================  ===============================

Both read ``batch.alignment`` (:class:`~kd_plugins.alignment_spans.SpanAlignment`, set when the teacher reads its
own tokenization: ``KDConfig.cross_tokenizer``) and compare the two models' next-token distributions at the last
token of every aligned span followed by another span -- there both models predict a next token that starts the same
text -- where the student has a target. A mean over those positions of the micro-batch (``normalizer = BATCH``).
No parameters; the teacher's tensors are detached.
"""

from __future__ import annotations

from torch import Tensor

from kd_plugins.errors import ConfigError
from kd_plugins.functional._common import check_temperature
from kd_plugins.functional.cross_vocab import cross_vocab_kd
from kd_plugins.functional.logit import check_loss_options
from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import BatchContext, DistillationTerm, ModelCapture, ModelInfo, Requirements

__all__ = ["CrossVocabKDLoss", "ULDLoss", "build_cross_vocab_kd", "build_uld"]

EXACT_MATCH_LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd", "dkd")


@hookimpl
def register_logit_terms(register):
    register("uld", build_uld)
    register("cross_vocab_kd", build_cross_vocab_kd)


class CrossVocabKDLoss(DistillationTerm):
    """Hybrid logit transfer between two vocabularies: ``exact_weight * D_shared + uld_weight * ULD(rest)``.

    ``D_shared`` is ``loss`` (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``dkd``) between the two models'
    distributions restricted to the tokens whose strings both vocabularies hold
    (``batch.alignment.shared_vocabulary``); ULD (Boizard et al. 2024, arXiv:2402.12030) compares the sorted
    probabilities of the remaining tokens of each side. See :func:`kd_plugins.functional.cross_vocab_kd`.

    Args:
        loss: the exact-match loss.
        exact_weight, uld_weight: the two parts' weights (``uld_weight: 0`` is the exact-match path alone).
        temperature: softmax temperature of both parts (the exact-match part is scaled by ``T**2``).
        chunk_size: aligned positions per checkpointed chunk.
        loss_kwargs: ``beta`` (``generalized_jsd``), ``alpha`` / ``beta`` (``dkd``).
    """

    family = "logit"
    cross_tokenizer = True

    def __init__(self, *, loss: str = "forward_kl", exact_weight: float = 1.0, uld_weight: float = 1.0,
                 temperature: float = 1.0, chunk_size: int = 256, **loss_kwargs: float):
        super().__init__()
        self.loss = loss
        self.exact_weight = float(exact_weight)
        self.uld_weight = float(uld_weight)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.loss_kwargs = {k: float(v) for k, v in loss_kwargs.items()}

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        spans = batch.alignment
        name = type(self).__name__
        if spans is None:
            raise ValueError(f"{name} compares a teacher and a student with different tokenizers and needs the "
                             "batch's aligned spans (BatchContext.alignment); set cross_tokenizer: true in the KD "
                             "config, or use forward_kl / dkd / ... for one shared tokenizer")
        for role, capture in (("student", student), ("teacher", teacher)):
            if capture.final_hidden is None or capture.lm_head_weight is None:
                raise ValueError(f"{name} needs the {role}'s final hidden states and LM head weight, but the "
                                 f"{role} capture of {capture.info.name!r} has none")
        shared = spans.shared_vocabulary
        if self.exact_weight > 0 and shared is None:
            raise ValueError(f"{name} with exact_weight > 0 needs the shared vocabulary of the two tokenizers "
                             "(SpanAlignment.shared_vocabulary); set exact_weight: 0 for ULD alone")
        device = student.final_hidden.device
        spans = spans.to(device)
        labels = batch.labels.to(device)
        rows, cols = (spans.span_mask & spans.next_span_mask).nonzero(as_tuple=True)
        s_pos, t_pos = spans.student_last[rows, cols], spans.teacher_last[rows, cols]
        targets = labels[rows, s_pos]
        return cross_vocab_kd(
            student.final_hidden[rows, s_pos],
            student.lm_head_weight,
            teacher.final_hidden[rows, t_pos].detach(),
            teacher.lm_head_weight.detach(),
            targets,
            shared_student=None if shared is None else shared.student_ids,
            shared_teacher=None if shared is None else shared.teacher_ids,
            loss=self.loss,
            loss_kwargs=self.loss_kwargs,
            exact_weight=self.exact_weight,
            uld_weight=self.uld_weight,
            temperature=self.temperature,
            student_bias=student.lm_head_bias,
            teacher_bias=None if teacher.lm_head_bias is None else teacher.lm_head_bias.detach(),
            student_logit_scale=student.logit_scale,
            teacher_logit_scale=teacher.logit_scale,
            student_softcap=student.logit_softcap,
            teacher_softcap=teacher.logit_softcap,
            chunk_size=self.chunk_size,
            ignore_index=batch.ignore_index,
        )

    def extra_repr(self) -> str:
        return (f"loss={self.loss}, exact_weight={self.exact_weight}, uld_weight={self.uld_weight}, "
                f"temperature={self.temperature}, chunk_size={self.chunk_size}")


class ULDLoss(CrossVocabKDLoss):
    """Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030) at aligned positions: the L1 distance
    between the two models' sorted next-token probabilities (:func:`kd_plugins.functional.uld`). Needs no token
    correspondence.

    Args:
        temperature: softmax temperature.
        chunk_size: aligned positions per checkpointed chunk.
    """

    def __init__(self, *, temperature: float = 1.0, chunk_size: int = 256):
        super().__init__(exact_weight=0.0, uld_weight=1.0, temperature=temperature, chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, chunk_size={self.chunk_size}"


# --- builders -----------------------------------------------------------------------------------------------


def build_uld(*, student: ModelInfo, teacher: ModelInfo, temperature: float = 1.0, chunk_size: int = 256) -> ULDLoss:
    """Build :class:`ULDLoss`."""
    _check_common(temperature, chunk_size)
    return ULDLoss(temperature=float(temperature), chunk_size=chunk_size)


def build_cross_vocab_kd(
    *,
    student: ModelInfo,
    teacher: ModelInfo,
    loss: str = "forward_kl",
    exact_weight: float = 1.0,
    uld_weight: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = 256,
    alpha: float | None = None,
    beta: float | None = None,
) -> CrossVocabKDLoss:
    """Build :class:`CrossVocabKDLoss`; ``alpha`` / ``beta`` are the exact-match loss's options (``beta`` of
    ``generalized_jsd``; ``alpha``, ``beta`` of ``dkd``), None for its default."""
    _check_common(temperature, chunk_size)
    if loss not in EXACT_MATCH_LOSSES:
        raise ConfigError(f"loss={loss!r} is invalid; expected one of {EXACT_MATCH_LOSSES}")
    for key, value in (("exact_weight", exact_weight), ("uld_weight", uld_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{key}={value!r} is invalid; expected a number >= 0")
    if exact_weight == 0 and uld_weight == 0:
        raise ConfigError("exact_weight and uld_weight are both 0: the term would compare nothing; give one a weight")
    options = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    accepted = {"forward_kl": (), "reverse_kl": (), "generalized_jsd": ("beta",), "dkd": ("alpha", "beta")}[loss]
    extra = sorted(set(options) - set(accepted))
    if extra:
        raise ConfigError(f"{extra} do not apply to loss={loss!r} (its options: {list(accepted) or 'none'})")
    try:
        check_loss_options(loss, options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"loss={loss!r}: {exc}") from exc
    return CrossVocabKDLoss(loss=loss, exact_weight=float(exact_weight), uld_weight=float(uld_weight),
                            temperature=float(temperature), chunk_size=chunk_size, **options)


def _check_common(temperature, chunk_size) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ConfigError(f"temperature={temperature!r} is invalid; expected a number > 0")
    try:
        check_temperature(temperature)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} is invalid; expected a positive int")
