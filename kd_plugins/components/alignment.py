"""Representation-level ("alignment") transfer terms: module forms and their builders.

Each term pairs with a function in :mod:`kd_plugins.functional.alignment`:

=========================  ==================================  ======================
term (registered name)     class                               functional
=========================  ==================================  ======================
``contrastive``            :class:`ContrastiveAlignmentLoss`   ``contrastive``
``mse``                    :class:`MSEAlignmentLoss`           ``hidden_mse``
``cosine``                 :class:`CosineAlignmentLoss`        ``hidden_cosine``
``attention_relation``     :class:`AttentionRelationLoss`      ``attention_relation``
=========================  ==================================  ======================

Terms own their projectors and learnable temperatures (never the student). Teacher features are detached:
gradients reach the student and the term's own parameters only. Builders validate against both models'
:class:`~kd_plugins.types.ModelInfo` and raise :class:`~kd_plugins.errors.ConfigError` before training starts.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Sequence

import torch
from torch import Tensor, nn

from kd_plugins.errors import ConfigError
from kd_plugins.functional.alignment import (
    RELATION_TYPES,
    attention_relation,
    contrastive,
    hidden_cosine,
    hidden_mse,
)
from kd_plugins.hookspecs import hookimpl
from kd_plugins.layer_map import LayerMapSpec, resolve_layer_map
from kd_plugins.projectors import build_projector
from kd_plugins.types import BatchContext, DistillationTerm, ModelCapture, ModelInfo, Normalizer, Requirements

__all__ = [
    "AttentionRelationLoss",
    "ContrastiveAlignmentLoss",
    "CosineAlignmentLoss",
    "MSEAlignmentLoss",
    "build_attention_relation",
    "build_contrastive",
    "build_cosine",
    "build_mse",
]

# CLIP clamps its learnable logit scale log(1/τ) at log(100), i.e. τ >= 0.01, to keep training stable.
MAX_LOGIT_SCALE = math.log(100.0)
MAX_DEFAULT_RELATION_HEADS = 8


@hookimpl
def register_alignment_terms(register):
    register("contrastive", build_contrastive)
    register("mse", build_mse)
    register("cosine", build_cosine)
    register("attention_relation", build_attention_relation)


# --- terms --------------------------------------------------------------------------------------------------


class _PairedFeatureTerm(DistillationTerm):
    """Shared plumbing of terms that compare hidden states of (student_layer, teacher_layer) pairs."""

    family = "alignment"

    def __init__(self, layer_pairs: Sequence[tuple[int, int]]):
        super().__init__()
        if not layer_pairs:
            raise ConfigError("layers: at least one (student_layer, teacher_layer) pair is needed")
        self.layer_pairs = [(int(s), int(t)) for s, t in layer_pairs]

    def requirements(self) -> Requirements:
        return Requirements(
            student_layers={s for s, _ in self.layer_pairs}, teacher_layers={t for _, t in self.layer_pairs}
        )

    def _features(self, student: ModelCapture, teacher: ModelCapture, pair: tuple[int, int]) -> tuple[Tensor, Tensor]:
        s, t = pair
        return _hidden(student, s, "student"), _hidden(teacher, t, "teacher").detach()


class ContrastiveAlignmentLoss(_PairedFeatureTerm):
    """Token-level contrastive (InfoNCE) alignment of hidden states, CRD style (arXiv 1910.10699).

    Per layer pair, a student projector ``Hs -> proj_dim`` and a teacher projector ``Ht -> proj_dim`` (both
    trainable, as in CRD) feed :func:`kd_plugins.functional.contrastive`; the loss is averaged over pairs.
    Valid tokens come from ``batch.token_mask``. A mean over this micro-batch (``normalizer = BATCH``, the default):
    the negatives of each anchor are the other tokens of the same micro-batch, so the loss is not a sum of per-token
    values that could be renormalised over an accumulation step.

    Args:
        layer_pairs: resolved ``(student_layer, teacher_layer)`` pairs.
        student_dim, teacher_dim: hidden sizes ``Hs``, ``Ht``.
        proj_dim: common projection width.
        projector: projector kind (see :func:`kd_plugins.projectors.build_projector`).
        temperature: ``τ``; the initial value when ``learn_temperature``.
        learn_temperature: store ``log(1/τ)`` as a parameter, clamped at ``log(100)`` (``τ >= 0.01``) as in CLIP.
        max_tokens: tokens sampled per pair to bound the ``O(N²)`` cost.
        symmetric: add the teacher→student direction.
    """

    def __init__(
        self,
        layer_pairs: Sequence[tuple[int, int]],
        student_dim: int,
        teacher_dim: int,
        *,
        proj_dim: int = 256,
        projector: str = "linear",
        temperature: float = 0.07,
        learn_temperature: bool = False,
        max_tokens: int = 1024,
        symmetric: bool = False,
    ):
        super().__init__(layer_pairs)
        self.student_projectors = nn.ModuleList(
            build_projector(student_dim, proj_dim, projector) for _ in self.layer_pairs
        )
        self.teacher_projectors = nn.ModuleList(
            build_projector(teacher_dim, proj_dim, projector) for _ in self.layer_pairs
        )
        self.max_tokens = max_tokens
        self.symmetric = symmetric
        self.learn_temperature = learn_temperature
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), dtype=torch.float32))
        else:
            self.temperature = float(temperature)

    def current_temperature(self) -> float | Tensor:
        if self.learn_temperature:
            return torch.exp(-self.logit_scale.clamp(max=MAX_LOGIT_SCALE))
        return self.temperature

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        temperature = self.current_temperature()
        losses = []
        for pair, p_s, p_t in zip(self.layer_pairs, self.student_projectors, self.teacher_projectors):
            hs, ht = self._features(student, teacher, pair)
            losses.append(
                contrastive(
                    _project(p_s, hs),
                    _project(p_t, ht),
                    batch.token_mask.to(hs.device),
                    temperature=temperature,
                    max_tokens=self.max_tokens,
                    symmetric=self.symmetric,
                )
            )
        return torch.stack(losses).mean()

    def extra_metrics(self) -> dict[str, float]:
        with torch.no_grad():
            return {"temperature": float(self.current_temperature())}


class _RegressionAlignmentLoss(_PairedFeatureTerm):
    """A student projector ``Hs -> Ht`` per pair; teacher features are used as they are.

    A token mean (``normalizer = TOKENS``): divided by ``batch.num_tokens_in_batch`` when the host gives it (the
    valid tokens of the whole accumulation step), else by this batch's valid tokens.
    """

    normalizer = Normalizer.TOKENS

    def __init__(self, layer_pairs: Sequence[tuple[int, int]], student_dim: int, teacher_dim: int, *, projector="linear"):
        super().__init__(layer_pairs)
        self.projectors = nn.ModuleList(build_projector(student_dim, teacher_dim, projector) for _ in self.layer_pairs)

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        losses = []
        for pair, projector in zip(self.layer_pairs, self.projectors):
            hs, ht = self._features(student, teacher, pair)
            losses.append(self._loss(_project(projector, hs), ht, batch.token_mask.to(hs.device),
                                     num_tokens_in_batch=batch.num_tokens_in_batch))
        return torch.stack(losses).mean()

    @staticmethod
    def _loss(student_feats: Tensor, teacher_feats: Tensor, mask: Tensor, *, num_tokens_in_batch=None) -> Tensor:
        raise NotImplementedError


class MSEAlignmentLoss(_RegressionAlignmentLoss):
    """Per-token MSE between projected student and teacher hidden states (:func:`hidden_mse`), mean over pairs.

    Args:
        layer_pairs: resolved ``(student_layer, teacher_layer)`` pairs.
        student_dim, teacher_dim: hidden sizes; each pair gets a student projector ``Hs -> Ht``.
        projector: projector kind (default ``"linear"``, identity-initialised when widths are equal).
    """

    _loss = staticmethod(hidden_mse)


class CosineAlignmentLoss(_RegressionAlignmentLoss):
    """Per-token ``1 - cos`` between projected student and teacher hidden states (:func:`hidden_cosine`).

    Same arguments as :class:`MSEAlignmentLoss`.
    """

    _loss = staticmethod(hidden_cosine)


class AttentionRelationLoss(DistillationTerm):
    """MiniLMv2 self-attention relation transfer between one student and one teacher layer (arXiv 2012.15828).

    Reads ``student.qkv[student_layer]`` and ``teacher.qkv[teacher_layer]`` (q/k/v projection outputs captured
    by forward hooks, so SDPA/FlashAttention keep working) and ``batch.sequence_ids`` (packed sequences never
    relate across boundaries). No parameters.

    Args:
        student_layer, teacher_layer: resolved layer indices.
        relation_heads: ``R``, dividing every selected q/k/v width of both models.
        relations: subset of ``("q", "k", "v")``.

    A mean over valid query rows (``normalizer = TOKENS``): divided by ``batch.num_tokens_in_batch`` when the host
    gives it.
    """

    family = "alignment"
    normalizer = Normalizer.TOKENS

    def __init__(
        self, student_layer: int, teacher_layer: int, relation_heads: int, relations: Sequence[str] = RELATION_TYPES
    ):
        super().__init__()
        self.student_layer = int(student_layer)
        self.teacher_layer = int(teacher_layer)
        self.relation_heads = int(relation_heads)
        self.relations = tuple(relations)

    def requirements(self) -> Requirements:
        return Requirements(student_qkv_layers={self.student_layer}, teacher_qkv_layers={self.teacher_layer})

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:
        student_qkv = _qkv(student, self.student_layer, "student")
        teacher_qkv = tuple(x.detach() for x in _qkv(teacher, self.teacher_layer, "teacher"))
        return attention_relation(
            student_qkv,
            teacher_qkv,
            relation_heads=self.relation_heads,
            sequence_ids=batch.sequence_ids,
            relations=self.relations,
            num_tokens_in_batch=batch.num_tokens_in_batch,
        )


# --- builders -----------------------------------------------------------------------------------------------


def build_contrastive(
    *,
    student: ModelInfo,
    teacher: ModelInfo,
    layers: LayerMapSpec = "uniform",
    num_pairs: int | None = None,
    proj_dim: int = 256,
    projector: str = "linear",
    temperature: float = 0.07,
    learn_temperature: bool = False,
    max_tokens: int = 1024,
    symmetric: bool = False,
) -> ContrastiveAlignmentLoss:
    """Build :class:`ContrastiveAlignmentLoss`; ``layers``/``num_pairs`` as in :func:`resolve_layer_map`."""
    _check_positive_int("proj_dim", proj_dim)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens: must be an int >= 2 (one positive and one negative), got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature: must be a number > 0, got {temperature!r}")
    pairs = resolve_layer_map(layers, student, teacher, num_pairs)
    return ContrastiveAlignmentLoss(
        pairs,
        student.hidden_size,
        teacher.hidden_size,
        proj_dim=proj_dim,
        projector=projector,
        temperature=float(temperature),
        learn_temperature=bool(learn_temperature),
        max_tokens=max_tokens,
        symmetric=bool(symmetric),
    )


def build_mse(
    *,
    student: ModelInfo,
    teacher: ModelInfo,
    layers: LayerMapSpec = "uniform",
    num_pairs: int | None = None,
    projector: str = "linear",
) -> MSEAlignmentLoss:
    """Build :class:`MSEAlignmentLoss`; ``layers``/``num_pairs`` as in :func:`resolve_layer_map`."""
    pairs = resolve_layer_map(layers, student, teacher, num_pairs)
    return MSEAlignmentLoss(pairs, student.hidden_size, teacher.hidden_size, projector=projector)


def build_cosine(
    *,
    student: ModelInfo,
    teacher: ModelInfo,
    layers: LayerMapSpec = "uniform",
    num_pairs: int | None = None,
    projector: str = "linear",
) -> CosineAlignmentLoss:
    """Build :class:`CosineAlignmentLoss`; ``layers``/``num_pairs`` as in :func:`resolve_layer_map`."""
    pairs = resolve_layer_map(layers, student, teacher, num_pairs)
    return CosineAlignmentLoss(pairs, student.hidden_size, teacher.hidden_size, projector=projector)


def build_attention_relation(
    *,
    student: ModelInfo,
    teacher: ModelInfo,
    student_layer: int = -1,
    teacher_layer: int = -1,
    relation_heads: int | None = None,
    relations: Sequence[str] = RELATION_TYPES,
) -> AttentionRelationLoss:
    """Build :class:`AttentionRelationLoss`.

    ``relation_heads=None`` picks the largest ``R <= 8`` that divides every selected q/k/v width of both models
    (their greatest common divisor bounds the choice). An explicit ``R`` that does not divide a width is
    rejected here, before training.
    """
    if isinstance(relations, str):
        relations = (relations,)
    relations = tuple(relations)
    if not relations or len(set(relations)) != len(relations) or not set(relations) <= set(RELATION_TYPES):
        raise ConfigError(f"relations: got {relations!r}; use a non-empty subset of {RELATION_TYPES} without repeats")
    layers = []
    for field, index, info in (("student_layer", student_layer, student), ("teacher_layer", teacher_layer, teacher)):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ConfigError(f"{field}: must be an int layer index, got {index!r}")
        try:
            layers.append(info.resolve_layer(index))
        except IndexError:
            raise ConfigError(
                f"{field}: layer {index} is out of range for {info.name!r} with {info.num_layers} layers "
                f"(allowed: {-info.num_layers}..{info.num_layers - 1})"
            ) from None
    widths = {
        (role, name): width
        for role, info in (("student", student), ("teacher", teacher))
        for name, width in _qkv_widths(info).items()
        if name in relations
    }
    if relation_heads is None:
        common = reduce(math.gcd, widths.values())
        relation_heads = max(r for r in range(1, MAX_DEFAULT_RELATION_HEADS + 1) if common % r == 0)
    else:
        _check_positive_int("relation_heads", relation_heads)
        for (role, name), width in widths.items():
            if width % relation_heads:
                info = student if role == "student" else teacher
                raise ConfigError(
                    f"relation_heads: {relation_heads} does not divide the {role} ({info.name!r}) {name} width "
                    f"{width} (= {_width_formula(info, name)}). R must divide every selected q/k/v width of both "
                    f"models; with grouped-query attention (GQA) k/v are narrower than q. Widths: "
                    f"{ {f'{r} {n}': w for (r, n), w in widths.items()} }; choose a common divisor or leave "
                    "relation_heads unset."
                )
    return AttentionRelationLoss(layers[0], layers[1], relation_heads, relations)


# --- helpers ------------------------------------------------------------------------------------------------


def _project(projector: nn.Module, x: Tensor) -> Tensor:
    # Projectors live in the term's dtype (fp32 by default) while captures may be bf16.
    param = next(projector.parameters(), None)
    return projector(x.to(param.dtype) if param is not None else x)


def _hidden(capture: ModelCapture, layer: int, role: str) -> Tensor:
    try:
        return capture.hidden_states[layer]
    except KeyError:
        raise KeyError(
            f"{role} capture has no hidden state for layer {layer} (captured: {sorted(capture.hidden_states)}); "
            "the capture must honour the term's requirements()"
        ) from None


def _qkv(capture: ModelCapture, layer: int, role: str) -> tuple[Tensor, Tensor, Tensor]:
    try:
        return capture.qkv[layer]
    except KeyError:
        raise KeyError(
            f"{role} capture has no q/k/v for layer {layer} (captured: {sorted(capture.qkv)}); "
            "the capture must honour the term's requirements()"
        ) from None


def _qkv_widths(info: ModelInfo) -> dict[str, int]:
    kv = info.num_kv_heads * info.head_dim
    return {"q": info.num_heads * info.head_dim, "k": kv, "v": kv}


def _width_formula(info: ModelInfo, name: str) -> str:
    heads = info.num_heads if name == "q" else info.num_kv_heads
    return f"{'n_heads' if name == 'q' else 'n_kv_heads'} {heads} x head_dim {info.head_dim}"


def _check_positive_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}: must be a positive int, got {value!r}")
