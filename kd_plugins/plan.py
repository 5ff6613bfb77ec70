"""The step plan: every decision and every scale of one distillation step, computed once, in one place.

A host (a trainer integration, or your own loop) describes the micro-batch it is about to train on with
:class:`HostFacts`; :func:`plan_step` turns those facts and the configured terms and scheduler into a
:class:`StepPlan`; the :class:`~kd_plugins.Distiller` applies it explicitly. The plan is a pure function of its
inputs -- it reads the terms' and the scheduler's declared traits (:class:`~kd_plugins.Normalizer`,
``carries_task_loss``, ``reads_task_loss``) and the scheduler's ``needs_gradients`` / ``weights_in_advance``, and
changes nothing -- so a third party's component is planned exactly like a built-in, and a plan can be unit-tested
without a model.

What the plan decides:

* **how the student runs** (:class:`StudentMode`): the host's own loss (``HOST``); the backbone only, no task loss
  (``BACKBONE``: ``ce_weight == 0`` and a scheduler that does not read the task loss); or the backbone only, with
  the task cross-entropy taken from the carrier logit term's chunked pass over the LM head (``FUSED_CE``);
* **each term's normaliser and scale**, from its declared :class:`~kd_plugins.Normalizer`. When the host's loss is
  already scaled for gradient accumulation (divided by ``num_items_in_batch``, so the host does *not* divide it by
  the accumulation steps afterwards):

  ========== ================================================ =============================================
  normaliser the term's batch carries                           scale on the term's loss
  ========== ================================================ =============================================
  ``ITEMS``  ``num_items_in_batch`` (the host's window count)   the host's data-parallel world factor
  ``TOKENS`` ``num_tokens_in_batch`` (window valid tokens)      the token count's world factor
  ``BATCH``  neither (a per-micro-batch mean)                   ``1 / accumulation steps``
  ========== ================================================ =============================================

  (a ``TOKENS`` term without a window token count is planned like ``BATCH``). Otherwise every term is a
  per-micro-batch mean with scale 1 and the host divides the total by the accumulation steps, as it does its own;
* **the fused task loss's scale** (the host's world factor, like its own CE), **the regulariser's scale**
  (``1 / accumulation steps`` when the host scales for accumulation: it counts once per optimizer step) and **the
  logging factor** that makes the per-micro-batch logged values sum to the window's value;
* **the CE gradient ratio**: with ``FUSED_CE``, when the scheduler knows the carrier's weight ``w`` before the
  step's losses (``weights_in_advance``, and no gradient probe this step), the CE's logit gradient is added to the
  carrier's before the LM head, in the ratio ``ce_weight * task_scale / (w * carrier_scale)`` -- exactly the ratio in
  which the total uses the two, whatever the world factor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from torch import Tensor

from kd_plugins.types import BatchContext, DistillationTerm, Normalizer, WeightScheduler

__all__ = ["HostFacts", "StepPlan", "StudentMode", "TermPlan", "plan_step"]


class StudentMode(Enum):
    """How the student runs in a training step (see :func:`plan_step`)."""

    HOST = "host"
    """The host's own loss computation: the full LM head and its cross-entropy, metrics and normalisation."""
    BACKBONE = "backbone"
    """The backbone only: no LM head outside the logit terms, no task loss."""
    FUSED_CE = "fused_ce"
    """The backbone only; the task cross-entropy comes from the carrier term's chunked pass over the LM head."""


@dataclass(frozen=True)
class HostFacts:
    """What the host knows about the micro-batch it is about to train on.

    Attributes:
        loss_scaled_for_ga: the host's loss is already scaled for gradient accumulation (divided by
            ``num_items_in_batch``), so the host does not divide it by the accumulation steps afterwards (the
            ``transformers.Trainer`` rule). False: the host divides the returned loss by the accumulation steps.
        grad_accumulation_steps: micro-batches per optimizer step (>= 1).
        num_items_in_batch: the host's count of target tokens over the accumulation window (over all ranks when it
            averages tokens across devices); given to ``ITEMS`` terms when ``loss_scaled_for_ga``.
        items_world_factor: the factor the host multiplies its loss by to undo data-parallel gradient averaging when
            ``num_items_in_batch`` counts every rank's tokens (the process count), else 1.
        num_tokens_in_batch: valid (attention-mask) tokens of the accumulation window, or None when the host cannot
            count them; given to ``TOKENS`` terms when ``loss_scaled_for_ga``.
        tokens_world_factor: the world factor of ``num_tokens_in_batch`` (the process count when it sums all ranks).
        fusable_task_loss: the host's loss on this micro-batch is the model's plain causal-LM cross-entropy, which a
            carrier term reproduces exactly (same targets, same normaliser), and the student can run its backbone
            through the model's own forward. False keeps the host's loss (``HOST``) whenever a task loss is needed.
        grad_enabled: autograd is on (a combined CE gradient is only planned when there is a backward).
    """

    loss_scaled_for_ga: bool = False
    grad_accumulation_steps: int = 1
    num_items_in_batch: Tensor | int | None = None
    items_world_factor: float = 1.0
    num_tokens_in_batch: Tensor | int | None = None
    tokens_world_factor: float = 1.0
    fusable_task_loss: bool = False
    grad_enabled: bool = True

    def __post_init__(self) -> None:
        steps = self.grad_accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"HostFacts: grad_accumulation_steps={steps!r} is invalid; expected an integer >= 1")
        for name in ("items_world_factor", "tokens_world_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HostFacts: {name}={value!r} is invalid; expected a finite number > 0")

    @classmethod
    def from_batch(cls, batch: BatchContext) -> "HostFacts":
        """Facts for a plain loop that put the normalisers it wants into ``batch`` itself: each term gets
        ``batch.num_items_in_batch`` / ``batch.num_tokens_in_batch`` as given, every scale is 1, and the task loss is
        the caller's (``HOST``)."""
        return cls(loss_scaled_for_ga=True, num_items_in_batch=batch.num_items_in_batch,
                   num_tokens_in_batch=batch.num_tokens_in_batch)


@dataclass(frozen=True)
class TermPlan:
    """One term's part of a :class:`StepPlan`: the normalisers its batch carries and the factor on its loss."""

    normalizer: Normalizer
    scale: float = 1.0
    num_items_in_batch: Tensor | int | None = None
    num_tokens_in_batch: Tensor | int | None = None


@dataclass(frozen=True)
class StepPlan:
    """Everything the :class:`~kd_plugins.Distiller` applies in one step (built by :func:`plan_step`).

    Attributes:
        student_mode: how the student runs (:class:`StudentMode`).
        terms: ``{label: TermPlan}`` for every configured term.
        task_loss_scale: factor on a fused task loss (``FUSED_CE``); a host's own loss is used as it comes.
        regularizer_scale: factor on the scheduler's regulariser.
        log_scale: factor on this micro-batch's loss values in a trainer's logs, so that they sum to the window's value
            over the accumulation steps.
        carrier: label of the term that computes the task cross-entropy (``FUSED_CE`` only), else None.
        ce_grad_ratio: with ``FUSED_CE``, the ratio in which the carrier's loss and the CE enter the total when it is
            known before the step (their gradients are then combined before the LM head), else None.
        carrier_weight: the carrier's weight ``ce_grad_ratio`` assumes (the scheduler's ``weights_in_advance``); the
            Distiller checks that ``weights()`` returns exactly it.
        step: the optimisation step the plan was made for.
    """

    student_mode: StudentMode
    terms: Mapping[str, TermPlan] = field(default_factory=dict)
    task_loss_scale: float = 1.0
    regularizer_scale: float = 1.0
    log_scale: float = 1.0
    carrier: str | None = None
    ce_grad_ratio: float | None = None
    carrier_weight: float | None = None
    step: int = 0

    def term_batch(self, label: str, batch: BatchContext) -> BatchContext:
        """``batch`` with exactly the normalisers term ``label`` is planned to see."""
        term = self.terms[label]
        if (batch.num_items_in_batch is term.num_items_in_batch
                and batch.num_tokens_in_batch is term.num_tokens_in_batch):
            return batch
        return dataclasses.replace(batch, num_items_in_batch=term.num_items_in_batch,
                                   num_tokens_in_batch=term.num_tokens_in_batch)


def plan_step(
    facts: HostFacts,
    *,
    terms: Mapping[str, DistillationTerm],
    scheduler: WeightScheduler,
    ce_weight: float,
    fuse_task_loss: bool = True,
    step: int = 0,
) -> StepPlan:
    """Plan one step from the host's ``facts``, the configured ``terms`` (``{label: term}``), the ``scheduler``, the
    task loss's ``ce_weight`` and ``KDConfig.fuse_task_loss``. Pure: nothing is changed. See the module docstring."""
    scaled = facts.loss_scaled_for_ga
    ga = facts.grad_accumulation_steps
    plans = {label: _term_plan(term, facts) for label, term in terms.items()}
    mode, carrier = _student_mode(facts, terms, scheduler, ce_weight, fuse_task_loss)
    task_scale = facts.items_world_factor if (mode is StudentMode.FUSED_CE and scaled) else 1.0
    ratio = weight = None
    if mode is StudentMode.FUSED_CE and facts.grad_enabled and not scheduler.needs_gradients(step):
        weight = _weight_in_advance(scheduler, carrier, step)
        if weight is not None:
            ratio = ce_weight * task_scale / (weight * plans[carrier].scale)
    return StepPlan(
        student_mode=mode,
        terms=plans,
        task_loss_scale=task_scale,
        regularizer_scale=1.0 / ga if scaled else 1.0,
        log_scale=1.0 if scaled else 1.0 / ga,
        carrier=carrier,
        ce_grad_ratio=ratio,
        carrier_weight=weight,
        step=step,
    )


# --- helpers ----------------------------------------------------------------------------------------------------


def _term_plan(term: DistillationTerm, facts: HostFacts) -> TermPlan:
    normalizer = Normalizer(term.normalizer)
    if not facts.loss_scaled_for_ga:  # per-micro-batch means; the host divides the total by the accumulation steps
        return TermPlan(normalizer)
    if normalizer is Normalizer.ITEMS:
        return TermPlan(normalizer, facts.items_world_factor, num_items_in_batch=facts.num_items_in_batch)
    if normalizer is Normalizer.TOKENS and facts.num_tokens_in_batch is not None:
        return TermPlan(normalizer, facts.tokens_world_factor, num_tokens_in_batch=facts.num_tokens_in_batch)
    return TermPlan(normalizer, 1.0 / facts.grad_accumulation_steps)


def _student_mode(facts, terms, scheduler, ce_weight, fuse_task_loss) -> tuple[StudentMode, str | None]:
    if not (fuse_task_loss and facts.fusable_task_loss):
        return StudentMode.HOST, None
    if ce_weight == 0 and not scheduler.reads_task_loss:
        return StudentMode.BACKBONE, None
    carrier = next((label for label, term in terms.items() if term.carries_task_loss), None)
    if ce_weight == 0 or carrier is None:  # only the scheduler reads the task loss, or no term can compute it
        return StudentMode.HOST, None
    return StudentMode.FUSED_CE, carrier


def _weight_in_advance(scheduler: WeightScheduler, label: str, step: int) -> float | None:
    """The carrier's weight at ``step`` when the scheduler announces it as a positive finite number, else None."""
    announced = scheduler.weights_in_advance(step)
    weight = None if announced is None else announced.get(label)
    if isinstance(weight, Tensor):
        weight = None if weight.requires_grad or weight.numel() != 1 else float(weight)
    if weight is None or not math.isfinite(weight) or weight <= 0:
        return None
    return float(weight)
