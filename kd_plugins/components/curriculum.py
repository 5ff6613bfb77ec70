"""The ``curriculum`` scheduler: hand distillation over from alignment terms to logit terms.

A student whose blocks were first trained to reproduce the teacher's hidden states (block-local repair, or simply
the alignment terms) starts the logit stage with a head start that a sudden full-weight logit gradient can undo.
The curriculum moves the weight from the alignment terms (``mse``, ``cosine``, ``contrastive``, ...) to the logit
terms (``forward_kl``, ``dkd``, ...) along a ramp, and -- in ``gradient`` mode -- never lets the logit terms'
gradient on the shared parameters outgrow the alignment terms' by more than a bound that relaxes as the hand-over
proceeds.

Progress ``p = shape(clamp((step - hold_steps) / handover_steps, 0, 1))`` with ``shape`` linear or the cosine
``(1 - cos(pi * x)) / 2``. For an alignment term ``a`` and a logit term ``l``:

* ``w_a = base_a * (1 - (1 - alignment_floor) * p)``;
* ``w_l = base_l * (logit_start + (1 - logit_start) * p) * c``, with ``c = 1`` in ``fixed`` mode.

``gradient`` mode: on update steps (the first step of the hand-over, then every ``every`` steps while ``p < 1``)
the scheduler measures each term's gradient norm ``||g_i||`` on the shared parameters and sets

``c = min(1, max_ratio / (1 - p) * G_align / G_logit)``, ``G_align = sum_a w_a ||g_a||``, ``G_logit = sum_l
w_l(c=1) ||g_l||``,

so the logit terms' weighted gradient is at most ``max_ratio / (1 - p)`` times the alignment terms' (the bound
starts at ``max_ratio`` and releases completely at the end of the hand-over). Between updates ``c`` is reused; from
``p = 1`` on, ``c = 1``. When the alignment terms have no gradient on the shared parameters the bound cannot be
measured and ``c`` stays 1 (with a warning).

The task (CE) loss weight is ``KDConfig.ce_weight`` and does not change; the curriculum never reads it.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from kd_plugins.errors import ConfigError, UnknownComponentError
from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import GradientProbe, WeightScheduler

logger = logging.getLogger(__name__)

MODES = ("fixed", "gradient")
SHAPES = ("linear", "cosine")

__all__ = ["CurriculumScheduler", "MODES", "SHAPES"]


@hookimpl
def register_schedulers(register):
    register("curriculum", CurriculumScheduler)


class CurriculumScheduler(WeightScheduler):
    """Alignment-to-logit curriculum (see the module docstring for the formulas).

    Args:
        base_weights: ``{term: configured weight}`` (the Distiller passes them).
        alignment: labels of the alignment terms; the other terms are the logit terms. Default: every term whose
            label is a registered alignment term name.
        hold_steps: steps of pure alignment (logit terms at ``logit_start``) before the hand-over starts.
        handover_steps: length of the hand-over (>= 1).
        shape: ``linear`` or ``cosine`` progress.
        logit_start: logit terms' weight factor before and at the start of the hand-over, in ``[0, 1]``.
        alignment_floor: alignment terms' weight factor after the hand-over, in ``[0, 1]`` (0 switches them off).
        mode: ``fixed`` (weights from the step alone) or ``gradient`` (bounded logit gradient, see above).
        every: steps between gradient measurements in ``gradient`` mode (>= 1).
        max_ratio: the bound on the logit terms' weighted gradient norm relative to the alignment terms' at the
            start of the hand-over (``gradient`` mode), > 0.

    Raises:
        ConfigError: an option is out of range, an ``alignment`` label is not a term, or the terms do not split
            into at least one alignment and one logit term.
    """

    reads_task_loss = False

    def __init__(
        self,
        base_weights: Mapping[str, float],
        alignment: Sequence[str] | str | None = None,
        hold_steps: int = 0,
        handover_steps: int = 100,
        shape: str = "cosine",
        logit_start: float = 0.0,
        alignment_floor: float = 0.0,
        mode: str = "fixed",
        every: int = 10,
        max_ratio: float = 1.0,
    ):
        super().__init__()
        self.base_weights = {k: float(v) for k, v in base_weights.items()}
        self.names = list(self.base_weights)
        _check_int("hold_steps", hold_steps, 0)
        _check_int("handover_steps", handover_steps, 1)
        _check_int("every", every, 1)
        for name, value in (("logit_start", logit_start), ("alignment_floor", alignment_floor)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
                raise ConfigError(f"curriculum: {name}={value!r} is invalid; expected a number in [0, 1]")
        if shape not in SHAPES:
            raise ConfigError(f"curriculum: shape={shape!r} is invalid; expected one of {SHAPES}")
        if mode not in MODES:
            raise ConfigError(f"curriculum: mode={mode!r} is invalid; expected one of {MODES}")
        if not (isinstance(max_ratio, (int, float)) and math.isfinite(max_ratio) and max_ratio > 0):
            raise ConfigError(f"curriculum: max_ratio={max_ratio!r} is invalid; expected a finite number > 0")
        self.alignment = _alignment_terms(alignment, self.names)
        self.logit = [k for k in self.names if k not in self.alignment]
        if not self.alignment or not self.logit:
            raise ConfigError(
                f"curriculum: the terms {self.names} split into alignment terms {sorted(self.alignment)} and logit "
                f"terms {self.logit}; a hand-over needs at least one of each (name the alignment terms with "
                "alignment: [label, ...])"
            )
        self.hold_steps = int(hold_steps)
        self.handover_steps = int(handover_steps)
        self.shape = shape
        self.logit_start = float(logit_start)
        self.alignment_floor = float(alignment_floor)
        self.mode = mode
        self.every = int(every)
        self.max_ratio = float(max_ratio)
        self.register_buffer("cap", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("last_update", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("grad_norms", torch.zeros(len(self.names), dtype=torch.float64))
        self._warned = False

    # --- the schedule -------------------------------------------------------------------------------------------

    def progress(self, step: int) -> float:
        """Hand-over progress ``p`` in ``[0, 1]`` at ``step``."""
        x = min(1.0, max(0.0, (step - self.hold_steps) / self.handover_steps))
        return x if self.shape == "linear" else (1.0 - math.cos(math.pi * x)) / 2.0

    def ramp_weights(self, step: int) -> dict[str, float]:
        """The weights at ``step`` before the gradient bound (``c = 1``)."""
        p = self.progress(step)
        align = 1.0 - (1.0 - self.alignment_floor) * p
        logit = self.logit_start + (1.0 - self.logit_start) * p
        return {k: w * (align if k in self.alignment else logit) for k, w in self.base_weights.items()}

    # --- the WeightScheduler contract ------------------------------------------------------------------------

    def needs_gradients(self, step: int) -> bool:
        return self._is_update_step(step)

    def weights(
        self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None = None
    ) -> dict[str, float]:
        if self._is_update_step(step):
            if gradients is None:
                raise RuntimeError(
                    "curriculum (mode: gradient) needs per-term gradients on a shared parameter set at step "
                    f"{step}, but the Distiller got no shared_params; pass shared_params= (the integrations "
                    "resolve KDConfig.shared_params, e.g. 'last_layer')"
                )
            self._update_cap(step, gradients)
        weights = self._weights(step)
        return {k: weights[k] for k in losses}

    def weights_in_advance(self, step: int) -> dict[str, float] | None:
        """Known on every step except the gradient measurements of ``gradient`` mode."""
        if self._is_update_step(step):
            return None
        return self._weights(step)

    def metrics(self) -> dict[str, float]:
        out = {"cap": float(self.cap)}
        if self.mode == "gradient":
            out.update({f"grad_norm/{k}": v for k, v in zip(self.names, self.grad_norms.tolist())})
        return out

    # --- helpers ----------------------------------------------------------------------------------------------

    def _weights(self, step: int) -> dict[str, float]:
        ramp = self.ramp_weights(step)
        cap = 1.0 if self.progress(step) >= 1.0 else float(self.cap)
        return {k: (w * cap if k in self.logit else w) for k, w in ramp.items()}

    def _is_update_step(self, step: int) -> bool:
        if self.mode != "gradient" or step < self.hold_steps or self.progress(step) >= 1.0:
            return False
        if not torch.is_grad_enabled():
            return False
        last = int(self.last_update)
        return last < 0 or step < last or step - last >= self.every

    def _update_cap(self, step: int, gradients: GradientProbe) -> None:
        ramp = self.ramp_weights(step)
        norms = {k: float(gradients.norm(k)) if ramp[k] > 0 else 0.0 for k in self.names}
        self.grad_norms.copy_(torch.tensor([norms[k] for k in self.names], dtype=torch.float64))
        g_align = sum(ramp[k] * norms[k] for k in self.alignment)
        g_logit = sum(ramp[k] * norms[k] for k in self.logit)
        if g_align <= 0 or not math.isfinite(g_align):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "kd_plugins curriculum: the alignment terms %s have no gradient on the shared parameters "
                    "(KDConfig.shared_params), so the logit gradient cannot be bounded; choose shared parameters "
                    "both kinds of term reach (e.g. last_layer with an alignment pair on the last block)",
                    sorted(self.alignment),
                )
            cap = 1.0
        elif g_logit <= 0 or not math.isfinite(g_logit):
            cap = 1.0
        else:
            bound = self.max_ratio / max(1.0 - self.progress(step), 1e-12)
            cap = min(1.0, bound * g_align / g_logit)
        self.cap.fill_(cap)
        self.last_update.fill_(step)


def _alignment_terms(alignment: Sequence[str] | str | None, names: list[str]) -> frozenset[str]:
    if alignment is not None:
        labels = [alignment] if isinstance(alignment, str) else list(alignment)
        unknown = [a for a in labels if a not in names]
        if unknown:
            raise ConfigError(f"curriculum: alignment={labels!r} names unknown term(s) {unknown}; the terms are "
                              f"{names} (a term's name is its 'label' if it has one, else its 'name')")
        return frozenset(labels)
    from kd_plugins.plugins import family_of

    found = set()
    for label in names:
        try:
            if family_of(label) == "alignment":
                found.add(label)
        except UnknownComponentError:
            pass  # a custom label: only an explicit alignment list can classify it
    return frozenset(found)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"curriculum: {name}={value!r} is invalid; expected an integer >= {minimum}")
