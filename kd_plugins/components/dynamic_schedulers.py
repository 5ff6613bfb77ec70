"""Adaptive transfer-weight schedulers: ``gradnorm``, ``conflict``, ``dwa`` and ``uncertainty``.

They change each transfer term's weight while training runs, from the terms' losses (``dwa``), from their
gradients on a small shared parameter set (``gradnorm``, ``conflict``), or by learning it (``uncertainty``).
``docs/schedulers.md`` gives the formulas, citations and advice on choosing one.

Common behaviour:

* **Warm-up.** For ``step < warmup_steps`` every weight is ``base_i * step / warmup_steps`` (the ``linear``
  ramp) and nothing adapts; gradients are never requested during warm-up.
* **Update steps.** ``gradnorm``, ``conflict`` and ``dwa`` recompute weights only on update steps: the first
  step ``>= warmup_steps`` and then every ``every`` steps. In between the last weights are reused at no gradient
  cost. A step is an update step at most once, so the micro-batches of one gradient-accumulation step share it.
  Nothing is observed or updated while autograd is disabled (evaluation), so evaluation cannot change training.
* **Bounds.** Weights stay inside ``[min_weight, max_weight]`` (absolute values, after warm-up).
* **State.** Every number the schedule depends on (weights, initial losses, loss history, step counters,
  log-variances) is a buffer or parameter, so ``state_dict()`` captures it and a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from torch import Tensor, nn

from kd_plugins.components.schedulers import check_ramp, linear_ramp
from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import GradientProbe, WeightScheduler

logger = logging.getLogger(__name__)

_CONFLICT_MODES = ("scale", "project")


@hookimpl
def register_schedulers(register):
    register("gradnorm", GradNormScheduler)
    register("conflict", ConflictScheduler)
    register("dwa", DynamicWeightAverageScheduler)
    register("uncertainty", UncertaintyScheduler)


class AdaptiveScheduler(WeightScheduler):
    """Base of the schedulers that recompute weights on update steps (see the module docstring).

    Subclasses implement :meth:`propose` and say whether they need gradients (``uses_gradients``), whether they read
    the task loss's gradient (``reads_task_loss``, the :class:`~kd_plugins.WeightScheduler` trait; False here) and
    whether the proposed weights are renormalised to ``sum(base_weights)`` (``renormalise``).

    Args:
        base_weights: ``{term: configured weight}``; terms with base weight 0 stay at 0.
        every: steps between updates (>= 1).
        warmup_steps: length of the linear warm-up during which weights are ``base * ramp`` and frozen.
        min_weight, max_weight: bounds on every weight after warm-up (``max_weight=None``: unbounded).
        ema: smoothing of successive weights, ``w <- ema * w_old + (1 - ema) * w_proposed`` (0 disables).
    """

    uses_gradients = False
    reads_task_loss = False
    renormalise = False

    def __init__(
        self,
        base_weights: Mapping[str, float],
        *,
        every: int = 1,
        warmup_steps: int = 0,
        min_weight: float = 0.0,
        max_weight: float | None = None,
        ema: float = 0.0,
    ):
        super().__init__()
        check_ramp(warmup_steps, 0.0)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r} is invalid; expected an integer >= 1")
        _check_bounds(min_weight, max_weight)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema!r} is invalid; expected 0 <= ema < 1")
        self.names = list(base_weights)
        self.base_weights = {k: float(v) for k, v in base_weights.items()}
        self.every = every
        self.warmup_steps = warmup_steps
        self.min_weight = float(min_weight)
        self.max_weight = math.inf if max_weight is None else float(max_weight)
        self.ema = float(ema)
        n = len(self.names)
        base = torch.tensor([self.base_weights[k] for k in self.names], dtype=torch.float64)
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("current", base.clone())
        self.register_buffer("last_update", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("loss_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(n, dtype=torch.float64))
        # Python copies of the buffers read every step (no device sync between updates); rebuilt after an update
        # or a state load
        self._cache: dict | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_cache())

    # --- the WeightScheduler contract ----------------------------------------------------------------------

    def needs_gradients(self, step: int) -> bool:
        return self.uses_gradients and self._is_update_step(step)

    def weights(
        self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None = None
    ) -> dict[str, float]:
        if step < self.warmup_steps:
            if torch.is_grad_enabled():
                self._observe(losses)
            ramped = self._warmup_weights(step)
            return {k: ramped[k] for k in losses}
        if self._is_update_step(step):
            if self.uses_gradients and gradients is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs per-term gradients on a shared parameter set at step {step}, but "
                    "the Distiller got no shared_params; pass shared_params= (the integrations resolve "
                    "KDConfig.shared_params, e.g. 'final_norm')"
                )
            proposed = self.propose(step=step, losses=losses, gradients=gradients)
            self._commit(proposed)
            self.last_update.fill_(step)
            self.num_updates += 1
            self._forget_cache()
        elif torch.is_grad_enabled():
            self._observe(losses)
        weights = self._cached()["weights"]
        return {k: weights[k] for k in losses}

    def weights_in_advance(self, step: int) -> dict[str, float] | None:
        """Known except on update steps (see the module docstring)."""
        if step < self.warmup_steps:
            return self._warmup_weights(step)
        if self._is_update_step(step):
            return None
        return dict(self._cached()["weights"])

    def _warmup_weights(self, step: int) -> dict[str, float]:
        """``base * linear ramp`` of every term during warm-up."""
        ramp = linear_ramp(step, self.warmup_steps)
        return {k: self.base_weights[k] * ramp for k in self.names}

    def metrics(self) -> dict[str, float]:
        return dict(self._cached()["metrics"])

    # --- for subclasses -------------------------------------------------------------------------------------

    def compute_metrics(self) -> dict[str, float]:
        """Scalars to log, read from the buffers; called once after each update (then cached)."""
        return {f"weight/{k}": v for k, v in zip(self.names, self.current.tolist())}

    def propose(self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None) -> Tensor:
        """Return the new weights (float64, CPU, in ``self.names`` order) before smoothing and bounds."""
        raise NotImplementedError

    def _observe(self, losses: Mapping[str, Tensor]) -> None:
        """Add this step's losses to the running period sums (non-finite values are skipped)."""
        values = torch.stack([losses[k].detach().reshape(()) for k in self.names]).to(self.loss_sum)
        finite = torch.isfinite(values)
        self.loss_sum.add_(torch.where(finite, values, 0.0))
        self.loss_count.add_(finite)

    def _close_period(self) -> Tensor:
        """Mean loss of each term since the last update (NaN where none was observed); resets the sums."""
        mean = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp(min=1), math.nan)
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return mean.cpu()

    def _is_update_step(self, step: int) -> bool:
        if step < self.warmup_steps or not torch.is_grad_enabled():
            return False
        last = self._cached()["last_update"]
        return last < 0 or step < last or step - last >= self.every

    def _cached(self) -> dict:
        if self._cache is None:
            self._cache = {
                "last_update": int(self.last_update),
                "weights": dict(zip(self.names, self.current.tolist())),
                "metrics": self.compute_metrics(),
            }
        return self._cache

    def _forget_cache(self) -> None:
        self._cache = None

    def _commit(self, proposed: Tensor) -> None:
        """Bound (and, if ``renormalise``, rescale) the proposal, smooth it with ``ema``, store it."""
        current = self.current.cpu()
        active = self.base.cpu() > 0
        result = torch.zeros_like(proposed)
        if self.renormalise:
            frozen = active & ~self._adapted_mask()
            free = active & ~frozen
            total = float(self.base.sum()) - float(current[frozen].sum())
            result[frozen] = current[frozen]
            result[free] = bounded_rescale(proposed[free], total, self.min_weight, self.max_weight)
            if self.ema > 0:  # a convex combination keeps both the total and the bounds
                result[free] = self.ema * current[free] + (1.0 - self.ema) * result[free]
                result[free] = bounded_rescale(result[free], total, self.min_weight, self.max_weight)
        else:
            smoothed = self.ema * current + (1.0 - self.ema) * proposed if self.ema > 0 else proposed
            result[active] = smoothed[active].clamp(self.min_weight, self.max_weight)
        self.current.copy_(result)

    def _adapted_mask(self) -> Tensor:
        """Terms whose weight the last proposal actually adapted (renormalising schedulers only)."""
        return torch.ones(len(self.names), dtype=torch.bool)


class GradNormScheduler(AdaptiveScheduler):
    """GradNorm (Chen et al., ICML 2018, arXiv 1711.02257) over the transfer terms.

    On an update step, with ``g_i`` the gradient of term ``i``'s unweighted loss on the shared parameter set and
    ``w_i`` its current weight:

    * ``G_i = w_i * ||g_i||`` (the norm of the gradient of ``w_i * L_i``), ``G_bar = mean_i G_i``;
    * ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``, the relative inverse training rate, where ``L_i`` is the
      mean loss since the previous update and ``L_i(0)`` the one measured at the first update;
    * target ``T_i = G_bar * r_i ** alpha``. ``L_grad = sum_i |G_i - T_i|`` is zero at ``w_i* = T_i / ||g_i||``
      (``G_i`` is linear in ``w_i``), so instead of the paper's optimiser step the weight moves towards that
      minimiser in log space: ``w_i <- w_i ** (1 - lr) * w_i* ** lr`` (``lr=1`` jumps to it);
    * rescaling so that the weights sum to ``sum(base_weights)`` while staying in ``[min_weight, max_weight]``,
      then EMA smoothing with the previous weights (``ema``; it keeps the sum and the bounds).

    With stationary gradient norms and equal training rates the ratio of two terms' ``G`` shrinks from ``q`` to
    ``q ** (1 - lr)`` per update (unbounded weights, ``ema=0``): 100x becomes < 1.2x after 5 updates at
    ``lr=0.5``. Terms whose gradient on the shared set is zero (they do not reach it) keep their weight.
    The task (CE) loss is not balanced: ``ce_weight`` stays fixed.

    **Anchors.** Plain GradNorm equalises the terms' gradient norms, so a term with a naturally large gradient
    -- in distillation the logit term, whose gradient on the last layer is typically 10-100x an alignment
    term's -- is pushed down to ``min_weight`` and the auxiliary terms take over. ``anchor`` names terms that
    keep their configured weight; GradNorm then balances only the other terms among themselves (their target
    is the mean ``G`` of the balanced terms, and they share the total of *their* base weights). This is the
    primary-plus-auxiliaries reading of GradNorm: the primary objective sets the scale, the scheduler decides
    how the auxiliary budget is split over training.

    Args:
        base_weights: ``{term: weight}`` from the config; also the starting weights and their total.
        every: steps between updates (each costs one ``autograd.grad`` per term on the shared set).
        alpha: asymmetry ``alpha`` of the target; 0 equalises ``G_i``, larger values favour slow terms.
        lr: fraction (in log space) of the way to the minimiser taken per update, in ``(0, 1]``.
        anchor: a term name or a list of term names whose weights stay at their base weights (not probed for
            gradients, not balanced); ``None`` (default): every term is balanced.
        warmup_steps, min_weight, max_weight, ema: see :class:`AdaptiveScheduler`.
    """

    uses_gradients = True
    renormalise = True

    def __init__(
        self,
        base_weights: Mapping[str, float],
        every: int = 10,
        alpha: float = 1.5,
        lr: float = 0.5,
        warmup_steps: int = 0,
        min_weight: float = 0.0,
        max_weight: float | None = None,
        ema: float = 0.0,
        anchor: str | list[str] | None = None,
    ):
        super().__init__(
            base_weights, every=every, warmup_steps=warmup_steps, min_weight=min_weight, max_weight=max_weight, ema=ema
        )
        self.anchors = _check_anchor(anchor, self.names)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha={alpha!r} is invalid; expected a finite number >= 0")
        if not (isinstance(lr, (int, float)) and 0 < lr <= 1):
            raise ValueError(f"lr={lr!r} is invalid; expected 0 < lr <= 1")
        self.alpha = float(alpha)
        self.lr = float(lr)
        n = len(self.names)
        self.register_buffer("initial_losses", torch.full((n,), math.nan, dtype=torch.float64))
        self.register_buffer("grad_norms", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("weighted_grad_norms", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("rates", torch.ones(n, dtype=torch.float64))
        self._adapted = torch.ones(n, dtype=torch.bool)
        self._warned_unreached = False

    def propose(self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None) -> Tensor:
        self._observe(losses)
        mean_loss = self._close_period()
        balanced = {k: (0.0 if k in self.anchors else w) for k, w in self.base_weights.items()}
        norms = _grad_norms(gradients, self.names, balanced)
        weights = self.current.cpu()
        initial = self.initial_losses.cpu()
        unset = torch.isnan(initial) & torch.isfinite(mean_loss) & (mean_loss > 0)
        initial = torch.where(unset, mean_loss, initial)
        self.initial_losses.copy_(initial)

        anchored = torch.tensor([k in self.anchors for k in self.names], dtype=torch.bool)
        active = (self.base.cpu() > 0) & ~anchored & torch.isfinite(norms) & (norms > 0)
        self._adapted = active
        # a term whose loss is exactly 0 this step (nothing valid in the batch, e.g. all labels -100) has no gradient
        # for that reason, not because the shared parameters are out of its reach
        unreached = [k for k, ok, b, a in zip(self.names, active.tolist(), self.base.tolist(), anchored.tolist())
                     if b > 0 and not ok and not a and float(torch.as_tensor(losses[k]).detach()) != 0.0]
        if unreached and not self._warned_unreached:
            self._warned_unreached = True
            logger.warning(
                "kd_plugins gradnorm: term(s) %s have no gradient on the shared parameters (KDConfig.shared_params) "
                "and keep their weight; choose shared parameters every term reaches, e.g. shared_params: last_layer",
                unreached,
            )
        weighted = weights * norms
        self.grad_norms.copy_(torch.nan_to_num(norms))
        self.weighted_grad_norms.copy_(torch.nan_to_num(weighted))
        if not bool(active.any()):
            return weights
        inverse_rate = mean_loss / initial
        known = active & torch.isfinite(inverse_rate) & (inverse_rate > 0)
        rates = torch.ones_like(weights)
        if bool(known.any()):
            rates[known] = inverse_rate[known] / inverse_rate[known].mean()
        self.rates.copy_(rates)
        target = weighted[active].mean() * rates**self.alpha
        proposed = weights.clone()
        minimiser = target[active] / norms[active]
        proposed[active] = weights[active].clamp(min=1e-12) ** (1 - self.lr) * minimiser**self.lr
        return proposed

    def _adapted_mask(self) -> Tensor:
        return self._adapted

    def compute_metrics(self) -> dict[str, float]:
        out = super().compute_metrics()
        for label, values in (
            ("grad_norm", self.grad_norms),
            ("weighted_grad_norm", self.weighted_grad_norms),
            ("rate", self.rates),
        ):
            out.update({f"{label}/{k}": v for k, v in zip(self.names, values.tolist())})
        out["updates"] = float(self.num_updates)
        return out


class ConflictScheduler(AdaptiveScheduler):
    """Gradient-conflict gating of transfer terms against the task loss (after PCGrad, Yu et al., NeurIPS 2020,
    arXiv 2001.06782).

    On an update step, with ``g_i`` term ``i``'s gradient and ``g_task`` the task (CE) loss's gradient on the shared
    parameter set, ``c_i = cos(g_i, g_task)``. A term with ``c_i >= 0`` keeps ``w_i = base_i``; a conflicting term
    (``c_i < 0``) gets ``w_i = base_i * max(floor, f(c_i))`` with

    * ``mode="scale"``: ``f = 1 + c_i`` (a fully opposed term, ``c = -1``, is switched off);
    * ``mode="project"``: ``f = 1 - c_i**2 = sin^2``. PCGrad replaces ``g_i`` by ``g_i' = g_i - (g_i.u) u``
      (``u = g_task / ||g_task||``); a scalar weight cannot rotate ``g_i``, so this uses the weight whose
      ``f * g_i`` is the least-squares closest to ``g_i'``: ``f = <g_i', g_i> / ||g_i||^2``. It removes the
      conflicting component only in proportion (``cos * sin^2`` of it remains) and shrinks the useful orthogonal
      part alike; exact projection would need per-term gradients of the whole model.

    Without a task gradient (no ``task`` loss passed to the Distiller, or a zero task gradient) nothing is gated:
    weights are the base weights. Conflicts between two transfer terms are not considered. ``ema`` smooths the
    gate over updates; the bounds clamp the result.

    Args:
        every: steps between checks (each costs one ``autograd.grad`` per term plus one for the task).
        mode: ``scale`` or ``project``.
        floor: smallest factor a conflicting term keeps, in ``[0, 1]``.
        warmup_steps, min_weight, max_weight, ema: see :class:`AdaptiveScheduler`.
    """

    uses_gradients = True
    reads_task_loss = True  # the cosine of each term's gradient with the task's

    def __init__(
        self,
        base_weights: Mapping[str, float],
        every: int = 10,
        mode: str = "scale",
        floor: float = 0.0,
        warmup_steps: int = 0,
        min_weight: float = 0.0,
        max_weight: float | None = None,
        ema: float = 0.0,
    ):
        super().__init__(
            base_weights, every=every, warmup_steps=warmup_steps, min_weight=min_weight, max_weight=max_weight, ema=ema
        )
        if mode not in _CONFLICT_MODES:
            raise ValueError(f"mode={mode!r} is invalid; expected one of {_CONFLICT_MODES}")
        if not (isinstance(floor, (int, float)) and 0.0 <= floor <= 1.0):
            raise ValueError(f"floor={floor!r} is invalid; expected 0 <= floor <= 1")
        self.mode = mode
        self.floor = float(floor)
        n = len(self.names)
        self.register_buffer("cosines", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("factors", torch.ones(n, dtype=torch.float64))
        self.register_buffer("gated", torch.tensor(False))

    def propose(self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None) -> Tensor:
        base = self.base.cpu()
        cosines = torch.zeros_like(base)
        factors = torch.ones_like(base)
        task = gradients.grad("task").detach() if "task" in gradients.names else None
        task_norm = task.norm() if task is not None else None
        gated = task is not None and bool(task_norm > 0)
        if gated:
            for i, name in enumerate(self.names):
                if self.base_weights[name] <= 0:  # a disabled term costs no gradient
                    continue
                grad = gradients.grad(name).detach()
                norm = grad.norm()
                if bool(norm > 0):
                    cosines[i] = float(torch.dot(grad, task) / (norm * task_norm))
            conflict = cosines < 0
            shrink = 1.0 + cosines if self.mode == "scale" else 1.0 - cosines**2
            factors = torch.where(conflict, shrink.clamp(min=self.floor), factors)
        self.cosines.copy_(cosines)
        self.factors.copy_(factors)
        self.gated.fill_(gated)
        return base * factors

    def compute_metrics(self) -> dict[str, float]:
        out = super().compute_metrics()
        out.update({f"cos/{k}": v for k, v in zip(self.names, self.cosines.tolist())})
        out.update({f"factor/{k}": v for k, v in zip(self.names, self.factors.tolist())})
        out["gated"] = float(self.gated)
        return out


class DynamicWeightAverageScheduler(AdaptiveScheduler):
    """Dynamic Weight Average (Liu et al., CVPR 2019, arXiv 1803.10704), per period of ``every`` steps.

    The paper's epochs become periods: the steps between two updates. At an update the period that just ended is
    closed (its mean loss per term, ``L_i(k)``), and the weights for the next period are

    ``w_i = base_i * K * exp(r_i / T) / sum_j exp(r_j / T)``, ``r_i = L_i(k-1) / L_i(k-2)``,

    with ``K`` the number of terms. Until two periods have been closed ``w_i = base_i`` (the paper's first two
    epochs). The current step's loss belongs to the next period. No gradients are used.

    Args:
        every: steps per period (1: the per-step rule ``r_i = L_i(t-1) / L_i(t-2)``, noisy on minibatches).
        temperature: ``T``; larger is closer to uniform.
        warmup_steps, min_weight, max_weight, ema: see :class:`AdaptiveScheduler`.
    """

    def __init__(
        self,
        base_weights: Mapping[str, float],
        every: int = 10,
        temperature: float = 2.0,
        warmup_steps: int = 0,
        min_weight: float = 0.0,
        max_weight: float | None = None,
        ema: float = 0.0,
    ):
        super().__init__(
            base_weights, every=every, warmup_steps=warmup_steps, min_weight=min_weight, max_weight=max_weight, ema=ema
        )
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} is invalid; expected a finite number > 0")
        self.temperature = float(temperature)
        n = len(self.names)
        self.register_buffer("history", torch.full((2, n), math.nan, dtype=torch.float64))
        self.register_buffer("rates", torch.ones(n, dtype=torch.float64))

    def propose(self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None) -> Tensor:
        closed = self._close_period()
        if bool(torch.isfinite(closed).any()):
            self.history.copy_(torch.stack([self.history[1].cpu(), closed]))
        self._observe(losses)
        older, newer = self.history.cpu()
        rates = newer / older
        rates = torch.where(torch.isfinite(rates), rates, torch.ones_like(rates))
        self.rates.copy_(rates)
        return self.base.cpu() * len(self.names) * torch.softmax(rates / self.temperature, dim=0)

    def compute_metrics(self) -> dict[str, float]:
        out = super().compute_metrics()
        out.update({f"rate/{k}": v for k, v in zip(self.names, self.rates.tolist())})
        return out


class UncertaintyScheduler(WeightScheduler):
    """Homoscedastic-uncertainty weighting (Kendall et al., CVPR 2018, arXiv 1705.07115), learned by the optimizer.

    Each term has a learnable log-variance ``s_i`` (the parameter ``log_vars``, owned by the Distiller, so the
    optimizer gets it). The transfer loss becomes ``sum_i base_i * (exp(-s_i) * L_i + s_i)``: the weights
    ``w_i = base_i * exp(-s_i)`` are returned as tensors with gradient and ``sum_i base_i * s_i`` is returned by
    :meth:`regularizer`, which the Distiller adds to ``transfer`` (once per optimizer step). Weights are never known
    in advance (they are parameters the optimizer moves); the task loss is never read. At the optimum ``exp(s_i) = L_i``, i.e. every
    weighted term ``w_i * L_i`` tends to ``base_i``: base weights set each term's share of the transfer loss.

    Before each step ``s_i`` is projected (in place, no gradient) into the range that keeps ``w_i`` inside
    ``[min_weight, max_weight]``. During warm-up the weights are ``base_i * ramp`` and ``s`` gets no gradient.
    Give ``log_vars`` no weight decay. ``transfer`` in the logs includes the regulariser and can be negative.

    Args:
        init_log_var: starting ``s_i`` (0: start at the base weights).
        warmup_steps, min_weight, max_weight: as for the other schedulers.
    """

    reads_task_loss = False

    def __init__(
        self,
        base_weights: Mapping[str, float],
        init_log_var: float = 0.0,
        warmup_steps: int = 0,
        min_weight: float = 0.0,
        max_weight: float | None = None,
    ):
        super().__init__()
        check_ramp(warmup_steps, 0.0)
        _check_bounds(min_weight, max_weight)
        if not (isinstance(init_log_var, (int, float)) and math.isfinite(init_log_var)):
            raise ValueError(f"init_log_var={init_log_var!r} is invalid; expected a finite number")
        self.names = list(base_weights)
        self.base_weights = {k: float(v) for k, v in base_weights.items()}
        self.warmup_steps = warmup_steps
        self.min_weight = float(min_weight)
        self.max_weight = math.inf if max_weight is None else float(max_weight)
        base = torch.tensor([self.base_weights[k] for k in self.names])
        self.register_buffer("base", base, persistent=False)
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init_log_var)))

    def weights(
        self, *, step: int, losses: Mapping[str, Tensor], gradients: GradientProbe | None = None
    ) -> dict[str, float | Tensor]:
        if step < self.warmup_steps:
            ramp = linear_ramp(step, self.warmup_steps)
            return {k: self.base_weights[k] * ramp for k in losses}
        self._project()
        weights = self.base * torch.exp(-self._active_log_vars())
        return {k: weights[self.names.index(k)] for k in losses}

    def regularizer(self, *, step: int) -> Tensor | None:
        """``sum_i base_i * s_i`` after warm-up (it keeps the learned weights from collapsing to 0), None during it."""
        if step < self.warmup_steps:
            return None
        return (self.base * self._active_log_vars()).sum()

    def _active_log_vars(self) -> Tensor:
        """``s_i``, with 0 for terms of base weight 0 (they get neither weight nor regulariser)."""
        return torch.where(self.base > 0, self.log_vars, torch.zeros_like(self.log_vars))

    def metrics(self) -> dict[str, float]:
        weights = (self.base * torch.exp(-self.log_vars.detach())).tolist()
        out = {f"weight/{k}": v for k, v in zip(self.names, weights)}
        out.update({f"log_var/{k}": v for k, v in zip(self.names, self.log_vars.detach().tolist())})
        return out

    @torch.no_grad()
    def _project(self) -> None:
        """Keep ``base * exp(-s)`` inside the bounds: ``log(base / max) <= s <= log(base / min)``."""
        if self.min_weight <= 0 and not math.isfinite(self.max_weight):
            return
        base = self.base.clamp(min=1e-30)
        low = torch.log(base / self.max_weight) if math.isfinite(self.max_weight) else None
        high = torch.log(base / self.min_weight) if self.min_weight > 0 else None
        if low is not None or high is not None:
            self.log_vars.copy_(self.log_vars.clamp(min=low, max=high))


def bounded_rescale(weights: Tensor, total: float, low: float, high: float) -> Tensor:
    """Scale ``weights`` by the factor ``c`` for which ``sum(clamp(c * weights, low, high)) == total``.

    Clamping after scaling would break the sum, scaling after clamping would break the bounds; bisection on the
    monotone ``c -> sum(clamp(c * w))`` keeps both. Infeasible totals give all-``low`` or all-``high`` weights.
    """
    if weights.numel() == 0:
        return weights
    weights = weights.clamp(min=0)
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)

    def summed(c: float) -> float:
        return float((c * weights).clamp(low, high).sum())

    lo, hi = 0.0, 1.0
    while summed(hi) < total and hi < 1e30:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if summed(mid) < total:
            lo = mid
        else:
            hi = mid
    return (hi * weights).clamp(low, high)


def _grad_norms(gradients: GradientProbe, names: list[str], base_weights: Mapping[str, float]) -> Tensor:
    """``||g_i||`` per term (float64, CPU); terms with base weight 0 are not probed and get 0."""
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack([gradients.norm(k).detach().double().cpu() if base_weights[k] > 0 else zero for k in names])


def _check_anchor(anchor: str | list[str] | tuple[str, ...] | None, names: list[str]) -> frozenset[str]:
    if anchor is None:
        return frozenset()
    anchors = [anchor] if isinstance(anchor, str) else anchor
    if not isinstance(anchors, (list, tuple)) or not all(isinstance(a, str) for a in anchors):
        raise ValueError(f"anchor={anchor!r} is invalid; expected a term name or a list of term names")
    unknown = [a for a in anchors if a not in names]
    if unknown:
        raise ValueError(f"anchor={anchor!r} names unknown term(s) {unknown}; the terms are {names} "
                         "(a term's name is its 'label' if it has one, else its 'name')")
    return frozenset(anchors)


def _check_bounds(min_weight: float, max_weight: float | None) -> None:
    if not (isinstance(min_weight, (int, float)) and math.isfinite(min_weight) and min_weight >= 0):
        raise ValueError(f"min_weight={min_weight!r} is invalid; expected a finite number >= 0")
    if max_weight is not None and not (isinstance(max_weight, (int, float)) and max_weight >= min_weight):
        raise ValueError(f"max_weight={max_weight!r} is invalid; expected None or a number >= min_weight={min_weight}")
