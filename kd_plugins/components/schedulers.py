"""Built-in weight schedulers: ``constant``, ``linear`` and ``cosine`` warm-up ramps.

Each maps the configured base weight ``w_i`` of every term to ``w_i * r(step)``, where the ramp ``r`` rises from
``start`` to 1 over ``warmup_steps`` and stays at 1 afterwards. Ramping transfer terms in lets randomly
initialised projectors settle before they steer the student.
"""

from __future__ import annotations

import math
from typing import Mapping

from torch import Tensor

from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import GradientProbe, WeightScheduler


class ConstantScheduler(WeightScheduler):
    """Every term keeps its base weight. Weights are known in advance; the task loss is never read."""

    reads_task_loss = False

    def __init__(self, base_weights: Mapping[str, float]):
        super().__init__()
        self.base_weights = dict(base_weights)

    def ramp(self, step: int) -> float:
        return 1.0

    def weights(
        self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None = None
    ) -> dict[str, float]:
        factor = self.ramp(step)
        return {name: self.base_weights[name] * factor for name in losses}

    def weights_in_advance(self, step: int) -> dict[str, float]:
        factor = self.ramp(step)
        return {name: weight * factor for name, weight in self.base_weights.items()}


class LinearScheduler(ConstantScheduler):
    """``r(step) = start + (1 - start) * min(1, step / warmup_steps)``."""

    def __init__(self, base_weights: Mapping[str, float], warmup_steps: int = 100, start: float = 0.0):
        super().__init__(base_weights)
        check_ramp(warmup_steps, start)
        self.warmup_steps = int(warmup_steps)
        self.start = float(start)

    def progress(self, step: int) -> float:
        return ramp_progress(step, self.warmup_steps)

    def ramp(self, step: int) -> float:
        return linear_ramp(step, self.warmup_steps, self.start)


class CosineScheduler(LinearScheduler):
    """``r(step) = start + (1 - start) * (1 - cos(pi * min(1, step / warmup_steps))) / 2``: a smooth ramp."""

    def ramp(self, step: int) -> float:
        return self.start + (1.0 - self.start) * (1.0 - math.cos(math.pi * self.progress(step))) / 2.0


def linear_ramp(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """The linear warm-up factor ``start + (1 - start) * min(1, step / warmup_steps)`` (1 when no warm-up).

    Shared with the dynamic schedulers, which ramp their terms in the same way before they start adapting.
    """
    return start + (1.0 - start) * ramp_progress(step, warmup_steps)


def ramp_progress(step: int, warmup_steps: int) -> float:
    """``min(1, step / warmup_steps)``, or 1 when ``warmup_steps`` is 0."""
    return 1.0 if warmup_steps == 0 else min(1.0, max(0, step) / warmup_steps)


def check_ramp(warmup_steps: int, start: float) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} is invalid; expected an integer >= 0")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start={start!r} is invalid; expected 0 <= start <= 1")


@hookimpl
def register_schedulers(register):
    register("constant", ConstantScheduler)
    register("linear", LinearScheduler)
    register("cosine", CosineScheduler)
