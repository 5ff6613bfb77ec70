"""The step plan (kd_plugins.plan): every decision and scale from host facts and declared traits, no model needed.

The components here are written like a third party's: plain subclasses of the public base classes that declare
their traits, so the tests show that the plan reads the declarations and nothing else.
"""

from __future__ import annotations

import pytest
import torch

from kd_plugins import BatchContext, DistillationTerm, HostFacts, Normalizer, StudentMode, WeightScheduler, plan_step


class _Term(DistillationTerm):
    def __init__(self, normalizer=Normalizer.BATCH, carries=False):
        super().__init__()
        self.normalizer = normalizer
        self.carries_task_loss = carries


class _Scheduler(WeightScheduler):
    """Weights ``base`` every step; announces them in advance unless ``advance`` is False."""

    def __init__(self, base, *, reads_task_loss=False, advance=True, probe_steps=()):
        super().__init__()
        self.base, self.reads_task_loss, self.advance, self.probe_steps = dict(base), reads_task_loss, advance, probe_steps

    def needs_gradients(self, step):
        return step in self.probe_steps

    def weights(self, *, step, losses, gradients=None):
        return {k: self.base[k] for k in losses}

    def weights_in_advance(self, step):
        return dict(self.base) if self.advance else None


TERMS = {"kl": _Term(Normalizer.ITEMS, carries=True), "mse": _Term(Normalizer.TOKENS), "nce": _Term()}
WEIGHTS = {"kl": 0.5, "mse": 2.0, "nce": 1.0}


def _plan(facts=None, *, terms=TERMS, scheduler=None, ce_weight=1.0, fuse=True, step=0):
    return plan_step(facts or HostFacts(), terms=terms, scheduler=scheduler or _Scheduler(WEIGHTS),
                     ce_weight=ce_weight, fuse_task_loss=fuse, step=step)


def test_not_scaled_for_ga_every_term_is_a_micro_batch_mean_and_the_host_divides():
    plan = _plan(HostFacts(loss_scaled_for_ga=False, grad_accumulation_steps=4, num_items_in_batch=40,
                           num_tokens_in_batch=50, items_world_factor=2.0))
    for term in plan.terms.values():
        assert (term.scale, term.num_items_in_batch, term.num_tokens_in_batch) == (1.0, None, None)
    assert (plan.regularizer_scale, plan.log_scale, plan.task_loss_scale) == (1.0, 0.25, 1.0)
    assert plan.student_mode is StudentMode.HOST  # the host loss is not fusable unless the host says so


def test_scaled_for_ga_each_normaliser_gets_its_count_and_scale():
    count_items, count_tokens = torch.tensor(40), torch.tensor(52)
    plan = _plan(HostFacts(loss_scaled_for_ga=True, grad_accumulation_steps=4, num_items_in_batch=count_items,
                           items_world_factor=2.0, num_tokens_in_batch=count_tokens, tokens_world_factor=3.0))
    kl, mse, nce = plan.terms["kl"], plan.terms["mse"], plan.terms["nce"]
    assert (kl.scale, kl.num_items_in_batch, kl.num_tokens_in_batch) == (2.0, count_items, None)
    assert (mse.scale, mse.num_items_in_batch, mse.num_tokens_in_batch) == (3.0, None, count_tokens)
    assert (nce.scale, nce.num_items_in_batch, nce.num_tokens_in_batch) == (0.25, None, None)
    assert (plan.regularizer_scale, plan.log_scale) == (0.25, 1.0)


def test_a_tokens_term_without_a_window_count_is_planned_like_a_batch_mean():
    plan = _plan(HostFacts(loss_scaled_for_ga=True, grad_accumulation_steps=2, num_items_in_batch=9))
    assert (plan.terms["mse"].scale, plan.terms["mse"].num_tokens_in_batch) == (0.5, None)


def test_term_batch_carries_exactly_the_planned_normalisers():
    batch = BatchContext.from_inputs(labels=torch.ones(2, 3, dtype=torch.long), num_items_in_batch=99,
                                     num_tokens_in_batch=98)
    plan = _plan(HostFacts(loss_scaled_for_ga=True, num_items_in_batch=7, num_tokens_in_batch=8))
    assert (plan.term_batch("kl", batch).num_items_in_batch, plan.term_batch("kl", batch).num_tokens_in_batch) == (7, None)
    assert (plan.term_batch("mse", batch).num_items_in_batch, plan.term_batch("mse", batch).num_tokens_in_batch) == (None, 8)
    nce = plan.term_batch("nce", batch)
    assert (nce.num_items_in_batch, nce.num_tokens_in_batch) == (None, None)
    assert batch.num_items_in_batch == 99  # the caller's batch is not changed


@pytest.mark.parametrize("fuse, fusable, ce_weight, reads, expected", [
    (True, True, 1.0, False, StudentMode.FUSED_CE),
    (True, True, 0.0, False, StudentMode.BACKBONE),
    (True, True, 0.0, True, StudentMode.HOST),   # the scheduler reads the task loss, nothing computes it
    (False, True, 1.0, False, StudentMode.HOST),  # fuse_task_loss: false
    (True, False, 1.0, False, StudentMode.HOST),  # the host's loss cannot be reproduced
    (True, False, 0.0, False, StudentMode.HOST),
])
def test_student_mode(fuse, fusable, ce_weight, reads, expected):
    scheduler = _Scheduler(WEIGHTS, reads_task_loss=reads)
    plan = _plan(HostFacts(fusable_task_loss=fusable), scheduler=scheduler, ce_weight=ce_weight, fuse=fuse)
    assert plan.student_mode is expected
    assert plan.carrier == ("kl" if expected is StudentMode.FUSED_CE else None)


def test_without_a_carrier_the_host_computes_the_task_loss():
    terms = {"mse": _Term(Normalizer.TOKENS)}
    assert _plan(HostFacts(fusable_task_loss=True), terms=terms, ce_weight=1.0).student_mode is StudentMode.HOST
    assert _plan(HostFacts(fusable_task_loss=True), terms=terms, ce_weight=0.0).student_mode is StudentMode.BACKBONE


def test_the_first_carrier_in_config_order_computes_the_task_loss():
    terms = {"mse": _Term(Normalizer.TOKENS), "a": _Term(Normalizer.ITEMS, carries=True),
             "b": _Term(Normalizer.ITEMS, carries=True)}
    assert _plan(HostFacts(fusable_task_loss=True), terms=terms,
                 scheduler=_Scheduler({"mse": 1.0, "a": 1.0, "b": 1.0})).carrier == "a"


def test_ce_gradient_ratio_uses_every_scale():
    facts = HostFacts(loss_scaled_for_ga=True, grad_accumulation_steps=2, num_items_in_batch=10,
                      items_world_factor=4.0, fusable_task_loss=True)
    plan = _plan(facts, ce_weight=0.8)
    assert plan.task_loss_scale == 4.0 and plan.terms["kl"].scale == 4.0
    # the total uses the carrier as w * scale * kd and the CE as ce_weight * task_scale * ce
    assert plan.ce_grad_ratio == pytest.approx(0.8 * 4.0 / (0.5 * 4.0))
    assert plan.carrier_weight == 0.5


@pytest.mark.parametrize("case", ["unknown in advance", "probe step", "no autograd", "zero weight", "learned weight"])
def test_no_combined_gradient_when_the_weight_is_not_known(case):
    weights = dict(WEIGHTS)
    if case == "zero weight":
        weights["kl"] = 0.0
    if case == "learned weight":
        weights["kl"] = torch.tensor(0.5, requires_grad=True)
    scheduler = _Scheduler(weights, advance=case != "unknown in advance", probe_steps=(3,) if case == "probe step" else ())
    plan = _plan(HostFacts(fusable_task_loss=True, grad_enabled=case != "no autograd"), scheduler=scheduler, step=3)
    assert plan.student_mode is StudentMode.FUSED_CE
    assert plan.ce_grad_ratio is None and plan.carrier_weight is None


def test_the_plan_changes_nothing():
    scheduler = _Scheduler(WEIGHTS)
    before = {k: (t.normalizer, t.carries_task_loss) for k, t in TERMS.items()}
    first = _plan(HostFacts(fusable_task_loss=True), scheduler=scheduler, step=5)
    again = _plan(HostFacts(fusable_task_loss=True), scheduler=scheduler, step=5)
    assert first == again
    assert {k: (t.normalizer, t.carries_task_loss) for k, t in TERMS.items()} == before


def test_builtin_components_declare_their_traits():
    from kd_plugins.components import alignment, dynamic_schedulers, logit, schedulers

    for cls in (logit.ForwardKLLoss, logit.ReverseKLLoss, logit.GeneralizedJSDLoss, logit.DecoupledKDLoss):
        assert (cls.normalizer, cls.carries_task_loss) == (Normalizer.ITEMS, True)
    for cls in (alignment.MSEAlignmentLoss, alignment.CosineAlignmentLoss, alignment.AttentionRelationLoss):
        assert (cls.normalizer, cls.carries_task_loss) == (Normalizer.TOKENS, False)
    assert alignment.ContrastiveAlignmentLoss.normalizer is Normalizer.BATCH
    assert dynamic_schedulers.ConflictScheduler.reads_task_loss is True
    for cls in (schedulers.ConstantScheduler, schedulers.LinearScheduler, schedulers.CosineScheduler,
                dynamic_schedulers.GradNormScheduler, dynamic_schedulers.DynamicWeightAverageScheduler,
                dynamic_schedulers.UncertaintyScheduler):
        assert cls.reads_task_loss is False, cls
    assert DistillationTerm.normalizer is Normalizer.BATCH and DistillationTerm.carries_task_loss is False
    assert WeightScheduler.reads_task_loss is True  # the safe default for a scheduler that says nothing


@pytest.mark.parametrize("bad", [dict(grad_accumulation_steps=0), dict(grad_accumulation_steps=True),
                                 dict(items_world_factor=0.0), dict(tokens_world_factor=float("nan"))])
def test_invalid_host_facts_are_refused_by_name(bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=f"HostFacts: {name}="):
        HostFacts(**bad)
