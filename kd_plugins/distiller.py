"""The Distiller: builds the configured terms and scheduler through the registry, owns every trainable
distillation parameter (projectors, learned temperatures, scheduler parameters), and turns captured student and
teacher tensors into the weighted loss.

It never owns the student or the teacher: integrations capture their tensors and pass them in.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pluggy
import torch
from torch import Tensor, nn

from kd_plugins.config import KDConfig
from kd_plugins.errors import ConfigError
from kd_plugins.plan import HostFacts, StepPlan, StudentMode, plan_step
from kd_plugins.plugins import family_of, get_component, get_plugin_manager
from kd_plugins.types import (
    BatchContext,
    DistillationTerm,
    GradientProbe,
    ModelCapture,
    ModelInfo,
    Requirements,
    WeightScheduler,
)


@dataclass
class DistillOutput:
    """Result of one :meth:`Distiller.forward`.

    Attributes:
        loss: ``ce_weight * task_loss + transfer`` (just ``transfer`` without a task loss); backpropagate this.
        transfer: the weighted sum of the (plan-scaled) transfer terms, plus the scheduler's ``regularizer(step=...)``
            when it has one.
        losses: ``{label: loss}`` as it enters the total (scaled by the step plan, not weighted), detached.
        weights: ``{label: weight}`` applied this step, as floats.
        metrics: extra scalars from terms and scheduler, ready to log.
        task_loss: the task loss used (detached): the one passed in, or the carrier's (a ``FUSED_CE`` plan).
    """

    loss: Tensor
    transfer: Tensor
    losses: dict[str, Tensor]
    weights: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    task_loss: Tensor | None = None

    def log_dict(self, prefix: str = "kd/") -> dict[str, float]:
        """Flat ``{name: float}`` for a trainer's logs: per-term losses, weights and extra metrics."""
        out = {f"{prefix}loss/{k}": float(v) for k, v in self.losses.items()}
        out.update({f"{prefix}weight/{k}": float(v) for k, v in self.weights.items()})
        out.update({f"{prefix}{k}": float(v) for k, v in self.metrics.items()})
        out[f"{prefix}transfer"] = float(self.transfer.detach())
        return out


class Distiller(nn.Module):
    """Owns the transfer terms and the weight scheduler of one distillation run.

    Args:
        config: the :class:`KDConfig` (or a dict for it).
        student: the student's :class:`ModelInfo`.
        teacher: the teacher's :class:`ModelInfo`.
        plugin_manager: the pluggy manager to resolve names with (default: the process-wide one).

    Raises:
        UnknownComponentError: a term or scheduler name is not registered (the message lists the names).
        ConfigError: a builder rejected its options (the message names the term and the accepted options).
        IncompatibleModelsError: the models cannot be distilled with a term (e.g. vocabulary mismatch).
    """

    def __init__(
        self,
        config: KDConfig | dict,
        *,
        student: ModelInfo,
        teacher: ModelInfo,
        plugin_manager: pluggy.PluginManager | None = None,
    ):
        super().__init__()
        self.config = config if isinstance(config, KDConfig) else KDConfig.from_dict(config)
        self.student_info = student
        self.teacher_info = teacher
        self._pm = plugin_manager or get_plugin_manager()
        self.terms = nn.ModuleDict()
        self.base_weights: dict[str, float] = {}
        for term_config in self.config.terms:
            family = family_of(term_config.name, self._pm)
            component = get_component(family, term_config.name, self._pm)
            term = _call_builder(
                component.builder,
                f"term {term_config.label!r} ({term_config.name})",
                dict(student=student, teacher=teacher),
                term_config.options,
            )
            if not isinstance(term, DistillationTerm):
                raise TypeError(
                    f"builder of {term_config.name!r} from {component.provider!r} returned "
                    f"{type(term).__name__}, expected a kd_plugins.DistillationTerm"
                )
            self.terms[term_config.label] = term
            self.base_weights[term_config.label] = float(term_config.weight)
        scheduler_component = get_component("scheduler", self.config.scheduler.name, self._pm)
        self.scheduler: WeightScheduler = _call_builder(
            scheduler_component.builder,
            f"scheduler {self.config.scheduler.name!r}",
            dict(base_weights=dict(self.base_weights)),
            self.config.scheduler.options,
        )
        self._pm.hook.kd_distiller_built(distiller=self, config=self.config)

    # --- what to capture ----------------------------------------------------------------------------------

    def requirements(self) -> Requirements:
        """The union of what every term needs captured from the student and the teacher."""
        req = Requirements()
        for term in self.terms.values():
            req = req.merge(term.requirements())
        return req

    def plan(self, facts: HostFacts, *, step: int = 0) -> StepPlan:
        """This run's :class:`~kd_plugins.plan.StepPlan` for a micro-batch the host describes with ``facts``
        (:func:`~kd_plugins.plan.plan_step` over the configured terms, scheduler, ``ce_weight`` and
        ``fuse_task_loss``)."""
        return plan_step(facts, terms=self.terms, scheduler=self.scheduler, ce_weight=self.config.ce_weight,
                         fuse_task_loss=self.config.fuse_task_loss, step=step)

    # --- the step -----------------------------------------------------------------------------------------

    def forward(
        self,
        student: ModelCapture,
        teacher: ModelCapture,
        batch: BatchContext,
        *,
        plan: StepPlan | None = None,
        task_loss: Tensor | None = None,
        shared_params: Iterable[Tensor] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> DistillOutput:
        """Compute every term as ``plan`` says, ask the scheduler for weights and combine.

        Args:
            student, teacher: captures of this batch (see :class:`ModelCapture`).
            batch: shared per-batch facts (targets, masks, step). Each term sees it with the normalisers the plan
                gives it (:meth:`StepPlan.term_batch`).
            plan: the step's :class:`~kd_plugins.plan.StepPlan` (:meth:`plan`); None: a plan from
                :meth:`HostFacts.from_batch <kd_plugins.plan.HostFacts.from_batch>` -- every term gets the
                normalisers ``batch`` carries, every scale is 1, and ``task_loss`` is the caller's.
            task_loss: the host's task loss (e.g. CE), already normalised like the host does it, or None. With a
                ``FUSED_CE`` plan the carrier term computes it instead (pass None).
            shared_params: student parameters for gradient-aware schedulers (only used on steps where the
                scheduler asks for gradients).
            reduce: for data parallelism, a callable averaging a tensor across ranks (a collective; the
                integration builds it from ``torch.distributed``). When given, the scheduler sees the rank-mean of
                the detached term losses (one call per step) and of every probe gradient (one call per gradient
                it asks for), so every rank computes the same weights. None: single process.

        Returns:
            :class:`DistillOutput`: ``loss = ce_weight * task_loss + sum_i w_i * s_i * L_i + r * regularizer`` with
            ``s_i`` the plan's term scales and ``r`` its regulariser scale; ``losses`` are the scaled ``s_i * L_i``
            (what enters the total), detached.

        Every rank must call this (or :meth:`skip_transfer`) once per micro-batch with the same ``reduce``
        arrangement: the collectives are issued in the same order on every rank.
        """
        plan = self.plan(HostFacts.from_batch(batch), step=batch.step) if plan is None else plan
        fused = self._check_plan(plan, batch, task_loss)
        losses: dict[str, Tensor] = {}
        for label, term in self.terms.items():
            term_batch = plan.term_batch(label, batch)
            if fused and label == plan.carrier:
                loss, ce = term.forward_with_task_loss(student, teacher, term_batch, task_grad_ratio=plan.ce_grad_ratio)
                task_loss = ce if plan.task_loss_scale == 1.0 else ce * plan.task_loss_scale
            else:
                loss = term(student, teacher, term_batch)
            scale = plan.terms[label].scale
            losses[label] = loss if scale == 1.0 else loss * scale
        weights = self._schedule(batch.step, losses, task_loss, shared_params, reduce)
        missing = set(losses) - set(weights)
        if missing:
            raise RuntimeError(f"scheduler {self.config.scheduler.name!r} returned no weight for {sorted(missing)}")
        if plan.ce_grad_ratio is not None:
            self._check_promised_weight(plan.carrier, plan.carrier_weight, weights[plan.carrier], batch.step)
        device = _device_of(losses, task_loss, batch)
        transfer = torch.zeros((), device=device)
        for label, loss in losses.items():
            transfer = transfer + weights[label] * loss
        regularizer = self.scheduler.regularizer(step=batch.step)
        if regularizer is not None:
            scale = plan.regularizer_scale
            transfer = transfer + (regularizer if scale == 1.0 else scale * regularizer)
        total = transfer if task_loss is None else self.config.ce_weight * task_loss + transfer
        float_weights = {k: float(weights[k].detach() if isinstance(weights[k], Tensor) else weights[k]) for k in losses}
        detached = {k: v.detach() for k, v in losses.items()}
        metrics: dict[str, float] = {}
        for label, term in self.terms.items():
            metrics.update({f"{label}/{k}": v for k, v in term.extra_metrics().items()})
        metrics.update({f"scheduler/{k}": v for k, v in self.scheduler.metrics().items()})
        self._pm.hook.kd_step_end(step=batch.step, total=transfer, losses=detached, weights=float_weights)
        return DistillOutput(loss=total, transfer=transfer, losses=detached, weights=float_weights, metrics=metrics,
                             task_loss=None if task_loss is None else task_loss.detach())

    def skip_transfer(
        self,
        batch: BatchContext,
        *,
        task_loss: Tensor | None = None,
        shared_params: Iterable[Tensor] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Stand in for :meth:`forward` on a rank that skips the transfer terms this step (e.g. a non-finite
        teacher with ``on_nonfinite_teacher: skip``) while other ranks run them.

        With ``reduce`` it takes part in exactly the collectives :meth:`forward` issues, with zero losses and zero
        gradients -- ``reduce`` must give this rank no weight in the mean -- and the scheduler advances on the
        other ranks' values, so every rank keeps the same scheduler state. Without ``reduce`` it does nothing (a
        single process simply has no transfer terms this step). Returns nothing to backpropagate.
        """
        if reduce is None:
            return
        device = task_loss.device if isinstance(task_loss, Tensor) else batch.labels.device
        zeros = {label: torch.zeros((), device=device) for label in self.terms}
        task = None if task_loss is None else torch.zeros((), device=device)
        self._schedule(batch.step, zeros, task, shared_params, reduce)

    def _check_plan(self, plan: StepPlan, batch: BatchContext, task_loss) -> bool:
        """Refuse a plan made for other terms or another step; True when the carrier computes the task loss."""
        if isinstance(task_loss, str):
            raise TypeError(f"task_loss={task_loss!r}: pass the host's task loss tensor or None; the fused task loss "
                            "is planned (StudentMode.FUSED_CE in Distiller.plan(...)), not requested by a string")
        if set(plan.terms) != set(self.terms):
            raise ValueError(f"the step plan covers terms {sorted(plan.terms)} but this Distiller has "
                             f"{sorted(self.terms)}; build the plan with this Distiller's plan()")
        if plan.step != batch.step:
            raise ValueError(f"the step plan was made for step {plan.step}, the batch is at step {batch.step}")
        fused = plan.student_mode is StudentMode.FUSED_CE
        if fused and (plan.carrier not in self.terms or not self.terms[plan.carrier].carries_task_loss):
            raise ValueError(f"the step plan's task-loss carrier {plan.carrier!r} is not a term that carries the "
                             "task loss (carries_task_loss = True)")
        if fused and task_loss is not None:
            raise ValueError("the step plan computes the task loss in the carrier term (StudentMode.FUSED_CE); pass "
                             "task_loss=None")
        return fused

    def _check_promised_weight(self, label: str, promised: float, got: float | Tensor, step: int) -> None:
        value = float(got.detach()) if isinstance(got, Tensor) else float(got)
        if (isinstance(got, Tensor) and got.requires_grad) or abs(value - promised) > 1e-9 * max(1.0, abs(promised)):
            raise RuntimeError(
                f"scheduler {self.config.scheduler.name!r} announced weight {promised!r} for term {label!r} at step "
                f"{step} (weights_in_advance) but weights() returned {got!r}; the fused task-loss gradient was "
                "combined with the announced weight. weights_in_advance must return exactly what weights() will, "
                "or None"
            )

    def _schedule(
        self,
        step: int,
        losses: dict[str, Tensor],
        task_loss: Tensor | None,
        shared_params: Iterable[Tensor] | None,
        reduce: Callable[[Tensor], Tensor] | None,
    ) -> dict[str, float | Tensor]:
        """The scheduler's weights for this step, from detached (rank-mean) losses and the gradient probe."""
        observed = {k: v.detach() for k, v in losses.items()}
        if reduce is not None and observed:
            stacked = torch.stack([v.reshape(()).to(torch.float64) for v in observed.values()])
            observed = dict(zip(observed, reduce(stacked).unbind()))
        probe = None
        if shared_params is not None and self.scheduler.needs_gradients(step):
            probe_losses = dict(losses)
            if task_loss is not None:
                probe_losses["task"] = task_loss
            probe = GradientProbe(probe_losses, list(shared_params), reduce=reduce)
        return self.scheduler.weights(step=step, losses=observed, gradients=probe)

    # --- state --------------------------------------------------------------------------------------------

    def kd_state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the distillation state (projectors, learned temperatures, scheduler), detached and on
        CPU: safe to write with safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def check_kd_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Raise :class:`~kd_plugins.ConfigError` unless ``state`` fits this Distiller exactly: the same keys, each
        with the same shape (the message lists missing and unexpected keys and every shape that differs). Changes
        nothing."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{key}: {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in this run"
                  for key in sorted(set(own) & set(state)) if tuple(state[key].shape) != tuple(own[key].shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing or unexpected:
                parts.append(f"missing {missing}, unexpected {unexpected}")
            if shapes:
                parts.append("shapes differ: " + "; ".join(shapes))
            raise ConfigError(
                f"KD state does not match this configuration: {'; '.join(parts)}. Was it saved with another KD config "
                "(a changed term, proj_dim, layer map or model)? Resume with the configuration it was saved with, or "
                "set allow_config_change_on_resume: true to restore only what still fits"
            )

    def load_kd_state_dict(self, state: Mapping[str, Tensor], *, partial: bool = False) -> list[str]:
        """Restore what :meth:`kd_state_dict` produced.

        Args:
            state: ``{name: tensor}``.
            partial: restore only the tensors whose name and shape match this Distiller and leave the rest as they
                are; otherwise (default) a state that does not fit exactly is refused (:meth:`check_kd_state_dict`)
                and nothing is loaded.

        Returns:
            The names of this Distiller's tensors that were *not* restored (empty unless ``partial``).
        """
        if not partial:
            self.check_kd_state_dict(state)
            self.load_state_dict(dict(state), strict=True)
            return []
        own = self.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        self.load_state_dict(fitting, strict=False)
        return sorted(set(own) - set(fitting))

    def resolved_config(self) -> dict[str, Any]:
        """The configuration this Distiller was built from, with every builder default filled in, plus the shape
        facts of both models: what a checkpoint's KD state depends on (stored in ``kd_state.safetensors`` and compared
        on resume). JSON-compatible. ``teacher_cache`` and ``allow_config_change_on_resume`` are left out: they do not
        change what is trained."""
        config = self.config
        terms = []
        for term in config.terms:
            builder = get_component(family_of(term.name, self._pm), term.name, self._pm).builder
            options = {**_builder_defaults(builder, ("student", "teacher")), **term.options}
            terms.append({"label": term.label, "name": term.name, "weight": term.weight, "options": options})
        scheduler_builder = get_component("scheduler", config.scheduler.name, self._pm).builder
        scheduler = {"name": config.scheduler.name,
                     "options": {**_builder_defaults(scheduler_builder, ("base_weights",)), **config.scheduler.options}}
        out: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                               if f.name not in ("terms", "scheduler", "teacher_cache", "allow_config_change_on_resume")}
        out.update(terms=terms, scheduler=scheduler,
                   student=_shape_facts(self.student_info), teacher=_shape_facts(self.teacher_info))
        return json.loads(json.dumps(out, default=repr, sort_keys=True))


def _call_builder(builder, what: str, fixed: dict[str, Any], options: dict[str, Any]):
    accepted = _accepted_options(builder, tuple(fixed))
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(_unknown_options_message(what, unknown, accepted))
    try:
        return builder(**fixed, **options)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError) or type(exc).__module__.startswith("kd_plugins"):
            raise
        unexpected = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if unexpected and unexpected.group(1) in options:
            raise ConfigError(f"{what}: unknown option {unexpected.group(1)!r} ({exc})") from exc
        raise ConfigError(f"{what}: {exc}") from exc


def _unknown_options_message(what: str, unknown: list[str], accepted: list[str]) -> str:
    hints = [f"{key!r} -> did you mean {close[0]!r}?" for key in unknown
             if (close := difflib.get_close_matches(key, accepted, n=1, cutoff=0.6))]
    return (f"{what}: unknown option(s) {unknown}{' (' + '; '.join(hints) + ')' if hints else ''}; "
            f"accepted options: {accepted}")


def _option_parameters(builder, fixed: tuple[str, ...]) -> list[inspect.Parameter] | None:
    """The builder's options as parameters: its keyword parameters other than ``fixed``; for a builder that forwards
    ``**options`` to the class its return annotation names, that class's ``__init__`` parameters. None when the
    accepted options cannot be known (a ``**kwargs`` all the way down)."""
    try:
        signature = inspect.signature(builder, eval_str=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the plain signature
        try:
            signature = inspect.signature(builder)
        except (TypeError, ValueError):
            return None
    params = [p for p in signature.parameters.values() if p.name not in fixed]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return [p for p in params if p.kind is not p.VAR_POSITIONAL]
    target = signature.return_annotation
    if not inspect.isclass(target):
        return None
    try:
        init = inspect.signature(target.__init__)
    except (TypeError, ValueError):
        return None
    extra = [p for p in init.parameters.values() if p.name != "self" and p.kind is not p.VAR_POSITIONAL]
    if any(p.kind is p.VAR_KEYWORD for p in extra):
        return None
    named = [p for p in params if p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL]
    return named + [p for p in extra if p.name not in {q.name for q in named}]


def _accepted_options(builder, fixed: tuple[str, ...]) -> list[str] | None:
    params = _option_parameters(builder, fixed)
    return None if params is None else [p.name for p in params]


def _builder_defaults(builder, fixed: tuple[str, ...]) -> dict[str, Any]:
    params = _option_parameters(builder, fixed) or []
    return {p.name: p.default for p in params if p.default is not p.empty}


def _shape_facts(info: ModelInfo) -> dict[str, int]:
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "name"}


def _device_of(losses: dict[str, Tensor], task_loss: Tensor | None, batch: BatchContext) -> torch.device:
    for value in [*losses.values(), task_loss]:
        if isinstance(value, Tensor):
            return value.device
    return batch.labels.device


