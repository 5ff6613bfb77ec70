"""Adaptive schedulers (gradnorm, conflict, dwa, uncertainty): formulas on synthetic problems with known
gradients, bounds, warm-up, state round trips, and the path through the real Distiller."""

import math

import pluggy
import pytest
import torch
from torch import nn

import kd_plugins
from kd_plugins import BatchContext, Distiller, DistillationTerm, GradientProbe, KDConfig, ModelCapture, ModelInfo
from kd_plugins import hookimpl, hookspecs
from kd_plugins.components import dynamic_schedulers, schedulers
from kd_plugins.components.dynamic_schedulers import (
    ConflictScheduler,
    DynamicWeightAverageScheduler,
    GradNormScheduler,
    UncertaintyScheduler,
    bounded_rescale,
)

DIM = 8


def _shared():
    return nn.Parameter(torch.linspace(0.5, 1.5, DIM))


def _quadratic_losses(shared, scales):
    """``L_i = scale_i * ||W||^2 / 2``: gradient ``scale_i * W`` on the shared set, losses in a fixed ratio."""
    return {name: scale * (shared**2).sum() / 2 for name, scale in scales.items()}


def _step(scheduler, step, losses, shared):
    """One step as the Distiller runs it: ``losses`` may hold ``task``, which the probe sees and weights() not."""
    probe = GradientProbe(losses, [shared]) if scheduler.needs_gradients(step) else None
    terms = {k: v for k, v in losses.items() if k != "task"}
    return scheduler.weights(step=step, losses=terms, gradients=probe), probe


# --- gradnorm ------------------------------------------------------------------------------------------------


def test_gradnorm_balances_a_100x_gradient_gap_within_five_updates():
    # Stationary norms and equal training rates: the G ratio goes q -> q ** (1 - lr) per update, so
    # 100 ** (0.5 ** 5) = 1.155 < 1.2 after 5 updates at lr=0.5 (bound: ceil(log2(ln 100 / ln 1.2)) = 5).
    shared = _shared()
    scheduler = GradNormScheduler({"big": 1.0, "small": 1.0}, every=2, alpha=1.5, lr=0.5)
    norm = float(shared.detach().norm())
    ratios, updates = [], 0
    for step in range(10):
        losses = _quadratic_losses(shared, {"big": 100.0, "small": 1.0})
        weights, probe = _step(scheduler, step, losses, shared)
        updates += probe is not None
        ratios.append((weights["big"] * 100 * norm) / (weights["small"] * norm))
        assert weights["big"] + weights["small"] == pytest.approx(2.0)  # renormalised to the base total
    assert updates == 5
    assert ratios[0] < 100  # the first update already moved
    assert 1 / 1.2 <= ratios[-1] <= 1.2
    assert ratios[-1] == pytest.approx(100 ** (0.5**5), rel=1e-6)
    metrics = scheduler.metrics()
    assert metrics["grad_norm/big"] == pytest.approx(100 * norm, rel=1e-5)
    assert metrics["updates"] == 5.0


def test_gradnorm_lr_one_equalises_in_one_update_and_reuses_weights_between_updates():
    shared = _shared()
    scheduler = GradNormScheduler({"big": 0.5, "small": 1.5}, every=3, lr=1.0)
    seen = []
    for step in range(3):
        weights, probe = _step(scheduler, step, _quadratic_losses(shared, {"big": 100.0, "small": 1.0}), shared)
        seen.append(((probe is not None), weights))
    assert [s[0] for s in seen] == [True, False, False]
    w = seen[0][1]
    assert w["big"] * 100 == pytest.approx(w["small"], rel=1e-6)
    assert w["big"] + w["small"] == pytest.approx(2.0)
    assert seen[1][1] == seen[2][1] == w


def test_gradnorm_anchor_keeps_its_weight_and_balances_the_rest_among_themselves():
    # "logit" has a 100x larger gradient than the two auxiliaries (10x apart). Unanchored, GradNorm would push it
    # down; anchored, it keeps 1.0 exactly, is never probed, and the auxiliaries share their base total 1.0.
    shared = _shared()
    scheduler = GradNormScheduler({"logit": 1.0, "a": 0.5, "b": 0.5}, every=1, lr=1.0, anchor="logit")
    norm = float(shared.detach().norm())
    for step in range(3):
        losses = _quadratic_losses(shared, {"logit": 100.0, "a": 10.0, "b": 1.0})
        weights, probe = _step(scheduler, step, losses, shared)
        assert probe is not None
        assert weights["logit"] == 1.0
        assert weights["a"] + weights["b"] == pytest.approx(1.0)
        assert weights["a"] * 10 == pytest.approx(weights["b"], rel=1e-6)  # lr=1: their G's are equal
        assert "logit" not in probe._cache  # the anchor's gradient is never computed
    assert scheduler.metrics()["grad_norm/a"] == pytest.approx(10 * norm, rel=1e-5)

    plain = GradNormScheduler({"logit": 1.0, "a": 0.5, "b": 0.5}, every=1, lr=1.0)
    weights, _ = _step(plain, 0, _quadratic_losses(shared, {"logit": 100.0, "a": 10.0, "b": 1.0}), shared)
    assert weights["logit"] < 0.02  # what the anchor prevents


def test_gradnorm_anchor_list_and_bad_anchor():
    scheduler = GradNormScheduler({"x": 1.0, "y": 1.0, "z": 1.0}, anchor=["x", "y"])
    assert scheduler.anchors == {"x", "y"}
    with pytest.raises(ValueError, match=r"unknown term\(s\) \['nope'\].*'x', 'y', 'z'"):
        GradNormScheduler({"x": 1.0, "y": 1.0, "z": 1.0}, anchor="nope")
    with pytest.raises(ValueError, match="expected a term name or a list"):
        GradNormScheduler({"x": 1.0}, anchor=3)


def test_gradnorm_anchor_through_the_config(plugin_manager):
    def build(anchor):
        config = KDConfig(
            terms=[{"name": "test_scaled_square", "label": "big", "scale": 100.0},
                   {"name": "test_scaled_square", "label": "small", "scale": 1.0, "weight": 0.5}],
            scheduler={"name": "gradnorm", "anchor": anchor},
        )
        return Distiller(config, student=INFO, teacher=INFO, plugin_manager=plugin_manager)

    distiller = build("big")
    assert distiller.scheduler.anchors == {"big"}
    shared = nn.Parameter(torch.full((DIM,), 0.5))
    hidden = torch.randn(2, 3, DIM) * shared
    out = distiller(ModelCapture(info=INFO, hidden_states={0: hidden}),
                    ModelCapture(info=INFO, hidden_states={0: torch.randn(2, 3, DIM)}),
                    BatchContext.from_inputs(labels=torch.zeros(2, 3, dtype=torch.long), step=0), shared_params=[shared])
    assert out.weights == {"big": 1.0, "small": 0.5}  # one balanced term keeps its own total
    with pytest.raises(ValueError, match="unknown term"):
        build("test_scaled_square")  # labels, not component names, identify terms


def test_gradnorm_favours_the_term_that_trains_slower():
    shared = _shared()
    scheduler = GradNormScheduler({"fast": 1.0, "slow": 1.0}, every=1, alpha=1.5, lr=1.0)
    for step in range(2):
        quadratic = (shared**2).sum() / 2
        # equal gradients (W) throughout; "fast" halves its loss value at step 1, "slow" does not move
        fast = quadratic - quadratic.detach() / 2 if step == 1 else quadratic
        weights, _ = _step(scheduler, step, {"fast": fast, "slow": quadratic}, shared)
    rates = torch.tensor([0.5, 1.0]) / torch.tensor([0.5, 1.0]).mean()
    expected = 2 * rates**1.5 / (rates**1.5).sum()  # w_i* proportional to r_i^alpha when norms are equal
    assert weights["fast"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert weights["slow"] == pytest.approx(float(expected[1]), rel=1e-5)
    assert scheduler.metrics()["rate/fast"] == pytest.approx(float(rates[0]))


def test_gradnorm_bounds_and_a_term_without_shared_gradient():
    shared = _shared()
    scheduler = GradNormScheduler({"big": 1.0, "small": 1.0, "elsewhere": 0.5}, every=1, lr=1.0, max_weight=1.6, min_weight=0.2)
    for step in range(4):
        losses = _quadratic_losses(shared, {"big": 100.0, "small": 1.0})
        losses["elsewhere"] = torch.tensor(3.0, requires_grad=True)  # does not reach the shared set
        weights, _ = _step(scheduler, step, losses, shared)
        assert all(0.2 - 1e-9 <= w <= 1.6 + 1e-9 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(2.5)
        assert weights["elsewhere"] == pytest.approx(0.5)
    assert weights["small"] == pytest.approx(1.6) and weights["big"] == pytest.approx(0.4)


def test_gradnorm_needs_shared_params():
    scheduler = GradNormScheduler({"a": 1.0}, every=1)
    with pytest.raises(RuntimeError, match="shared_params"):
        scheduler.weights(step=0, losses={"a": torch.tensor(1.0)}, gradients=None)


def test_bounded_rescale_keeps_sum_and_bounds():
    out = bounded_rescale(torch.tensor([1.0, 100.0, 1.0], dtype=torch.float64), 3.0, 0.5, 1.5)
    assert float(out.sum()) == pytest.approx(3.0) and float(out.max()) <= 1.5 and float(out.min()) >= 0.5
    assert bounded_rescale(torch.tensor([1.0, 1.0]), 10.0, 0.0, 2.0).tolist() == [2.0, 2.0]  # infeasible: all high


# --- warm-up, ema, evaluation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GradNormScheduler, ConflictScheduler, DynamicWeightAverageScheduler])
def test_warmup_ramps_base_weights_without_gradients(cls):
    shared = _shared()
    scheduler = cls({"big": 1.0, "small": 0.5}, every=1, warmup_steps=4)
    for step in range(4):
        assert not scheduler.needs_gradients(step)
        losses = _quadratic_losses(shared, {"big": 100.0, "small": 1.0})
        weights = scheduler.weights(step=step, losses=losses, gradients=None)
        assert weights == {"big": pytest.approx(step / 4), "small": pytest.approx(0.5 * step / 4)}
    assert cls is DynamicWeightAverageScheduler or scheduler.needs_gradients(4)


def test_ema_smooths_updates():
    shared = _shared()
    plain = GradNormScheduler({"big": 1.0, "small": 1.0}, every=1, lr=1.0)
    smooth = GradNormScheduler({"big": 1.0, "small": 1.0}, every=1, lr=1.0, ema=0.5)
    losses = _quadratic_losses(shared, {"big": 100.0, "small": 1.0})
    w_plain, _ = _step(plain, 0, losses, shared)
    w_smooth, _ = _step(smooth, 0, losses, shared)
    assert w_smooth["big"] == pytest.approx(0.5 * 1.0 + 0.5 * w_plain["big"])


def test_no_state_change_while_autograd_is_off():
    shared = _shared()
    scheduler = GradNormScheduler({"big": 1.0, "small": 1.0}, every=1)
    before = {k: v.clone() for k, v in scheduler.state_dict().items()}
    with torch.no_grad():
        assert not scheduler.needs_gradients(0)
        weights = scheduler.weights(step=0, losses=_quadratic_losses(shared, {"big": 2.0, "small": 1.0}))
    assert weights == {"big": 1.0, "small": 1.0}
    assert all(_same(before[k], v) for k, v in scheduler.state_dict().items())


# --- conflict ----------------------------------------------------------------------------------------------------


def _conflict_losses(shared):
    u = torch.zeros(DIM)
    u[0] = 1.0
    v = torch.zeros(DIM)
    v[1] = 1.0
    return {
        "task": shared @ u,  # g_task = u
        "opposed": -3.0 * (shared @ u),  # cos = -1
        "aligned": shared @ (u + v),  # cos = +1/sqrt(2)
        "partial": shared @ (v - u),  # cos = -1/sqrt(2)
    }


@pytest.mark.parametrize("mode, partial", [("scale", 1 - 1 / math.sqrt(2)), ("project", 0.5)])
def test_conflict_gates_opposed_terms_and_leaves_aligned_ones(mode, partial):
    shared = _shared()
    base = {"opposed": 1.0, "aligned": 0.7, "partial": 2.0}
    scheduler = ConflictScheduler(base, every=1, mode=mode)
    weights, probe = _step(scheduler, 0, _conflict_losses(shared), shared)
    assert weights["opposed"] == pytest.approx(0.0, abs=1e-7)
    assert weights["aligned"] == pytest.approx(0.7)
    assert weights["partial"] == pytest.approx(2.0 * partial, rel=1e-6)
    metrics = scheduler.metrics()
    assert metrics["cos/opposed"] == pytest.approx(-1.0) and metrics["gated"] == 1.0
    if mode == "project":  # the least-squares scalar for PCGrad's projected gradient
        g, t = probe.grad("partial"), probe.grad("task")
        projected = g - torch.dot(g, t) / torch.dot(t, t) * t
        assert metrics["factor/partial"] == pytest.approx(float(torch.dot(projected, g) / torch.dot(g, g)), rel=1e-6)


def test_conflict_floor_and_no_task():
    shared = _shared()
    losses = _conflict_losses(shared)
    floored = ConflictScheduler({"opposed": 1.0}, every=1, floor=0.25)
    assert _step(floored, 0, {k: losses[k] for k in ("task", "opposed")}, shared)[0]["opposed"] == pytest.approx(0.25)
    ungated = ConflictScheduler({"opposed": 1.0, "aligned": 0.5}, every=1)
    weights, _ = _step(ungated, 0, {k: losses[k] for k in ("opposed", "aligned")}, shared)  # no "task" in the probe
    assert weights == {"opposed": 1.0, "aligned": 0.5} and ungated.metrics()["gated"] == 0.0


def test_conflict_options_are_validated():
    with pytest.raises(ValueError, match="mode='rotate'"):
        ConflictScheduler({"a": 1.0}, mode="rotate")
    with pytest.raises(ValueError, match="floor=2"):
        ConflictScheduler({"a": 1.0}, floor=2)


# --- dwa ---------------------------------------------------------------------------------------------------------


def _dwa_expected(base, older, newer, temperature):
    rates = {k: newer[k] / older[k] for k in base}
    z = sum(math.exp(r / temperature) for r in rates.values())
    return {k: base[k] * len(base) * math.exp(rates[k] / temperature) / z for k in base}


def test_dwa_per_step_matches_the_formula():
    base = {"a": 1.0, "b": 0.5}
    history = [{"a": 4.0, "b": 2.0}, {"a": 3.0, "b": 2.0}, {"a": 2.4, "b": 1.0}, {"a": 2.0, "b": 0.9}]
    scheduler = DynamicWeightAverageScheduler(base, every=1, temperature=2.0)
    got = [scheduler.weights(step=t, losses={k: torch.tensor(v) for k, v in h.items()}) for t, h in enumerate(history)]
    assert got[0] == base and got[1] == base  # fewer than two closed periods
    for t in (2, 3):
        expected = _dwa_expected(base, history[t - 2], history[t - 1], 2.0)
        assert got[t] == {k: pytest.approx(v) for k, v in expected.items()}


def test_dwa_periods_use_mean_losses():
    base = {"a": 1.0, "b": 1.0}
    losses = [(4.0, 1.0), (2.0, 1.0), (1.0, 2.0), (1.0, 2.0), (5.0, 5.0), (5.0, 5.0)]
    scheduler = DynamicWeightAverageScheduler(base, every=2, temperature=1.0)
    got = [scheduler.weights(step=t, losses={"a": torch.tensor(a), "b": torch.tensor(b)}) for t, (a, b) in enumerate(losses)]
    assert got[2] == base  # one closed period
    expected = _dwa_expected(base, {"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, 1.0)
    assert got[4] == got[5] == {k: pytest.approx(v) for k, v in expected.items()}
    assert scheduler.metrics()["rate/a"] == pytest.approx(1 / 3)


# --- uncertainty -------------------------------------------------------------------------------------------------


def test_uncertainty_log_variances_learn_in_the_right_direction():
    scheduler = UncertaintyScheduler({"large": 1.0, "small": 2.0})
    losses = {"large": torch.tensor(4.0), "small": torch.tensor(0.25)}
    weights = scheduler.weights(step=0, losses=losses)
    assert all(w.requires_grad for w in weights.values())
    total = sum(weights[k] * losses[k] for k in losses) + scheduler.regularizer(step=0)
    total.backward()
    # d/ds [base * (exp(-s) L + s)] = base * (1 - exp(-s) L) at s = 0
    assert scheduler.log_vars.grad.tolist() == pytest.approx([1.0 * (1 - 4.0), 2.0 * (1 - 0.25)])
    optimizer = torch.optim.SGD(scheduler.parameters(), lr=0.1)
    optimizer.step()
    after = scheduler.weights(step=1, losses=losses)
    assert float(after["large"].detach()) < 1.0 and float(after["small"].detach()) > 2.0  # large loss -> smaller weight


def test_uncertainty_converges_to_base_share_and_respects_bounds():
    scheduler = UncertaintyScheduler({"a": 1.0, "b": 0.5}, max_weight=3.0)
    optimizer = torch.optim.SGD(scheduler.parameters(), lr=0.2)
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.05)}
    for step in range(300):
        optimizer.zero_grad()
        weights = scheduler.weights(step=step, losses=losses)
        (sum(weights[k] * losses[k] for k in losses) + scheduler.regularizer(step=step)).backward()
        optimizer.step()
    weights = scheduler.weights(step=300, losses=losses)
    assert float(weights["a"].detach() * losses["a"]) == pytest.approx(1.0, rel=1e-2)  # w_i L_i -> base_i
    assert float(weights["b"].detach()) == pytest.approx(3.0)  # would be 10 unbounded


def test_uncertainty_warmup_has_no_regularizer():
    scheduler = UncertaintyScheduler({"a": 1.0}, warmup_steps=2)
    assert scheduler.weights(step=1, losses={"a": torch.tensor(1.0)}) == {"a": 0.5}
    assert scheduler.regularizer(step=1) is None and scheduler.regularizer(step=2) is not None


# --- state -------------------------------------------------------------------------------------------------------


def _drive(scheduler, steps, shared):
    out = []
    for step in steps:
        scale = 1.0 + 0.1 * step
        losses = _conflict_losses(shared)
        losses["aligned"] = losses["aligned"] * scale
        losses["opposed"] = 50.0 * (shared**2).sum() / scale
        del losses["partial"]
        weights, _ = _step(scheduler, step, losses, shared)
        out.append({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in weights.items()})
        if isinstance(scheduler, UncertaintyScheduler):
            with torch.no_grad():
                scheduler.log_vars -= 0.01 * step
    return out


SCHEDULERS = {
    "gradnorm": lambda: GradNormScheduler({"opposed": 1.0, "aligned": 0.5}, every=2, ema=0.3),
    "conflict": lambda: ConflictScheduler({"opposed": 1.0, "aligned": 0.5}, every=2, ema=0.3),
    "dwa": lambda: DynamicWeightAverageScheduler({"opposed": 1.0, "aligned": 0.5}, every=2),
    "uncertainty": lambda: UncertaintyScheduler({"opposed": 1.0, "aligned": 0.5}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_dict_round_trip_continues_identically(name):
    shared = _shared()
    original = SCHEDULERS[name]()
    _drive(original, range(5), shared)
    restored = SCHEDULERS[name]()
    _drive(restored, range(3), shared)  # used before loading: nothing it read or cached may survive the load
    restored.load_state_dict(original.state_dict())
    assert _drive(original, range(5, 11), shared) == _drive(restored, range(5, 11), shared)


# --- through the real Distiller ----------------------------------------------------------------------------------

INFO = ModelInfo(hidden_size=DIM, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=DIM, vocab_size=5)


class ScaledSquare(DistillationTerm):
    """``scale * mean((h - t)^2)`` on the last block output: its gradient on ``h`` scales with ``scale``."""

    family = "alignment"

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, student, teacher, batch):
        return self.scale * ((student.hidden_states[0] - teacher.hidden_states[0]) ** 2).mean()


class ScaledSquarePlugin:
    @hookimpl
    def register_alignment_terms(self, register):
        register("test_scaled_square", lambda student, teacher, scale=1.0: ScaledSquare(scale))


@pytest.fixture
def plugin_manager():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(schedulers, name="kd_plugins.components.schedulers")
    pm.register(dynamic_schedulers, name="kd_plugins.components.dynamic_schedulers")
    pm.register(ScaledSquarePlugin(), name="test_scaled_square")
    return pm


@pytest.mark.parametrize(
    "scheduler",
    [
        {"name": "gradnorm", "every": 1, "lr": 1.0, "max_weight": 5.0},
        {"name": "conflict", "every": 2, "mode": "project"},
        {"name": "dwa", "every": 1},
        {"name": "uncertainty", "warmup_steps": 1},
    ],
)
def test_every_scheduler_trains_through_the_distiller(plugin_manager, scheduler):
    config = KDConfig(
        ce_weight=1.0,
        terms=[
            {"name": "test_scaled_square", "label": "big", "scale": 100.0, "weight": 1.0},
            {"name": "test_scaled_square", "label": "small", "scale": 1.0, "weight": 1.0},
        ],
        scheduler=scheduler,
    )
    distiller = Distiller(config, student=INFO, teacher=INFO, plugin_manager=plugin_manager)
    shared = nn.Parameter(torch.full((DIM,), 0.1))
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, DIM, generator=generator)
    target = torch.randn(2, 3, DIM, generator=generator)
    optimizer = torch.optim.SGD([shared, *distiller.parameters()], lr=1e-3)
    history = []
    for step in range(4):
        hidden = base * shared
        student = ModelCapture(info=INFO, hidden_states={0: hidden})
        teacher = ModelCapture(info=INFO, hidden_states={0: target})
        batch = BatchContext.from_inputs(labels=torch.zeros(2, 3, dtype=torch.long), step=step)
        task = ((hidden + target) ** 2).mean()  # pulls away from the teacher: conflicts with both terms
        out = distiller(student, teacher, batch, task_loss=task, shared_params=[shared])
        regularizer = distiller.scheduler.regularizer(step=step)  # before the optimizer moves the log-variances
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(out.weights)
        assert all(math.isfinite(v) for v in out.log_dict().values())
    assert history[-1] != {"big": 1.0, "small": 1.0}
    if scheduler["name"] == "gradnorm":
        assert history[-1]["big"] < history[-1]["small"] <= 5.0 + 1e-9
        assert "scheduler/grad_norm/big" in out.metrics
    if scheduler["name"] == "uncertainty":
        weighted = sum(out.weights[k] * float(out.losses[k]) for k in out.losses)
        assert float(out.transfer.detach()) == pytest.approx(weighted + float(regularizer.detach()), rel=1e-5)
        assert distiller.scheduler.log_vars.grad is not None
    state = distiller.kd_state_dict()
    clone = Distiller(config, student=INFO, teacher=INFO, plugin_manager=plugin_manager)
    clone.load_kd_state_dict(state)
    for key, value in clone.state_dict().items():
        assert _same(value, state[key])


def _same(a, b):
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def test_registered_by_default():
    names = kd_plugins.available_components()["scheduler"]
    assert {"gradnorm", "conflict", "dwa", "uncertainty"} <= set(names)
    assert names["gradnorm"] == "kd_plugins.components.dynamic_schedulers"


# --- weights_in_advance ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda base: schedulers.ConstantScheduler(base),
    lambda base: schedulers.LinearScheduler(base, warmup_steps=4, start=0.2),
    lambda base: schedulers.CosineScheduler(base, warmup_steps=4),
    lambda base: GradNormScheduler(base, every=3, warmup_steps=2),
    lambda base: ConflictScheduler(base, every=2),
    lambda base: DynamicWeightAverageScheduler(base, every=3, warmup_steps=1),
    lambda base: UncertaintyScheduler(base),
], ids=["constant", "linear", "cosine", "gradnorm", "conflict", "dwa", "uncertainty"])
def test_weights_in_advance_are_the_weights_of_the_step_or_none(build):
    """What a scheduler announces before a step is exactly what weights() returns on it; the adaptive ones
    announce nothing on their update steps (their weights depend on that step's losses or gradients)."""
    shared = _shared()
    scheduler = build({"a": 1.0, "b": 0.5})
    announced = 0
    for step in range(10):
        advance = scheduler.weights_in_advance(step)
        updates = getattr(scheduler, "_is_update_step", lambda s: False)(step)
        losses = _quadratic_losses(shared, {"a": 3.0 + step, "b": 1.0, "task": 2.0})
        weights, _ = _step(scheduler, step, losses, shared)
        if isinstance(scheduler, UncertaintyScheduler) or updates:
            assert advance is None
            continue
        announced += 1
        assert advance.keys() == weights.keys()
        for name in weights:
            assert advance[name] == float(weights[name])
    assert announced >= (0 if isinstance(scheduler, UncertaintyScheduler) else 5)
