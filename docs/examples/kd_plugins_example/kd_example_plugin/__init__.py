"""An example kd_plugins plugin: the ``hidden_l1`` alignment term and the ``step_decay`` scheduler.

Everything here uses kd_plugins' public extension surface only: :data:`kd_plugins.hookimpl`, the
:class:`~kd_plugins.DistillationTerm` / :class:`~kd_plugins.WeightScheduler` base classes and their declared traits
(``normalizer``, ``reads_task_loss``, ``weights_in_advance``), the shared layer map and projectors, and
:func:`kd_plugins.functional.normalize_token_sum` for masking and normalisation. Because the traits are declared,
a host plans these components exactly like built-ins: ``hidden_l1`` is exact under gradient accumulation, and
``step_decay`` with ``ce_weight: 0`` lets the student run its backbone only.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from kd_plugins import ConfigError, DistillationTerm, Normalizer, Requirements, WeightScheduler, hookimpl
from kd_plugins.functional import normalize_token_sum
from kd_plugins.layer_map import resolve_layer_map
from kd_plugins.projectors import build_projector

__all__ = ["HiddenL1Loss", "StepDecayScheduler", "build_hidden_l1"]


@hookimpl
def register_alignment_terms(register):
    register("hidden_l1", build_hidden_l1)


@hookimpl
def register_schedulers(register):
    register("step_decay", StepDecayScheduler)


class HiddenL1Loss(DistillationTerm):
    """Mean absolute error between projected student and teacher hidden states, averaged over layer pairs.

    For each ``(student_layer, teacher_layer)`` pair: ``mean_d |P(h_s) - h_t|`` per token, averaged over the
    valid tokens (``batch.token_mask``) -- of the whole accumulation window when the host gives their count
    (``batch.num_tokens_in_batch``; the term declares ``normalizer = TOKENS``), else of this batch. ``P`` is a
    trainable ``Hs -> Ht`` projector owned by this term. The teacher is detached.

    Shapes: hidden states ``(B, T, Hs)`` / ``(B, T, Ht)``; token mask ``(B, T)``; returns a 0-dim fp32 loss,
    exactly 0 when no token is valid.
    """

    family = "alignment"
    normalizer = Normalizer.TOKENS

    def __init__(self, layer_pairs: list[tuple[int, int]], student_dim: int, teacher_dim: int, projector: str):
        super().__init__()
        self.layer_pairs = list(layer_pairs)
        self.projectors = nn.ModuleList(build_projector(student_dim, teacher_dim, projector) for _ in self.layer_pairs)

    def requirements(self) -> Requirements:
        return Requirements(
            student_layers={s for s, _ in self.layer_pairs}, teacher_layers={t for _, t in self.layer_pairs}
        )

    def forward(self, student, teacher, batch) -> Tensor:
        losses = []
        for (s_layer, t_layer), projector in zip(self.layer_pairs, self.projectors):
            hs = student.hidden_states[s_layer]
            ht = teacher.hidden_states[t_layer].detach()
            mask = batch.token_mask.to(hs.device)
            weight = next(projector.parameters(), None)
            projected = projector(hs.to(weight.dtype) if weight is not None else hs)
            # zero padding first: it may hold garbage, and masked_fill sends exactly zero gradient there
            diff = (projected.float() - ht.float()).masked_fill(~mask[..., None], 0.0)
            losses.append(normalize_token_sum(diff.abs().mean(dim=-1), mask, batch.num_tokens_in_batch))
        return torch.stack(losses).mean()


def build_hidden_l1(*, student, teacher, layers="last", num_pairs=None, projector: str = "linear") -> HiddenL1Loss:
    """Builder: ``layers`` / ``num_pairs`` as in :func:`kd_plugins.layer_map.resolve_layer_map`
    (``"last"``, ``"uniform"`` or explicit ``[[s, t], ...]``); ``projector`` as in
    :func:`kd_plugins.projectors.build_projector`."""
    pairs = resolve_layer_map(layers, student, teacher, num_pairs)
    return HiddenL1Loss(pairs, student.hidden_size, teacher.hidden_size, projector)


class StepDecayScheduler(WeightScheduler):
    """Step decay of every transfer weight: ``w_i * max(min_factor, gamma ** (step // step_size))``.

    Useful when the teacher's guidance matters most early and the task loss should take over later. The weights
    depend on the step alone: they are announced in advance (``weights_in_advance``) and the task loss is never read
    (``reads_task_loss = False``).

    Args:
        base_weights: ``{label: weight}`` from the KD config (passed by the Distiller).
        step_size: steps between decays (int >= 1).
        gamma: multiplicative decay per ``step_size`` steps, in ``[0, 1]``.
        min_factor: floor on the decay factor, in ``[0, 1]``.
    """

    reads_task_loss = False

    def __init__(
        self, base_weights: Mapping[str, float], step_size: int = 100, gamma: float = 0.5, min_factor: float = 0.0
    ):
        super().__init__()
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ConfigError(f"scheduler step_decay: step_size={step_size!r} is invalid; expected an int >= 1")
        for key, value in (("gamma", gamma), ("min_factor", min_factor)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"scheduler step_decay: {key}={value!r} is invalid; expected 0 <= {key} <= 1")
        self.base_weights = dict(base_weights)
        self.step_size = step_size
        self.gamma = float(gamma)
        self.min_factor = float(min_factor)

    def factor(self, step: int) -> float:
        return max(self.min_factor, self.gamma ** (max(0, step) // self.step_size))

    def weights(self, *, step, losses, gradients=None) -> dict[str, float]:
        factor = self.factor(step)
        return {name: self.base_weights[name] * factor for name in losses}

    def weights_in_advance(self, step: int) -> dict[str, float]:
        factor = self.factor(step)
        return {name: weight * factor for name, weight in self.base_weights.items()}
