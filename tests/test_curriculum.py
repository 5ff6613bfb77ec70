"""The ``curriculum`` scheduler: the alignment-to-logit ramp against its formula, the gradient bound against a
hand computation, when gradients are asked for, weights_in_advance, state, validation, registration, and a run
through the Distiller with real terms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kd_plugins
from kd_plugins import BatchContext, Distiller, GradientProbe, KDConfig, ModelCapture, ModelInfo
from kd_plugins.components.curriculum import CurriculumScheduler
from kd_plugins.errors import ConfigError

BASE = {"forward_kl": 1.0, "mse": 0.5}
LOSSES = {"forward_kl": torch.tensor(2.0), "mse": torch.tensor(0.3)}


def _expected(step, *, hold=0, handover=100, shape="cosine", start=0.0, floor=0.0, base=BASE):
    x = min(1.0, max(0.0, (step - hold) / handover))
    p = x if shape == "linear" else 0.5 * (1 - math.cos(math.pi * x))
    return {"forward_kl": base["forward_kl"] * (start + (1 - start) * p), "mse": base["mse"] * (1 - (1 - floor) * p)}


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("hold, handover, start, floor", [(0, 100, 0.0, 0.0), (5, 20, 0.1, 0.25), (0, 1, 0.5, 1.0)])
def test_fixed_schedule_matches_the_formula(shape, hold, handover, start, floor):
    s = CurriculumScheduler(BASE, hold_steps=hold, handover_steps=handover, shape=shape, logit_start=start,
                            alignment_floor=floor)
    assert s.reads_task_loss is False
    for step in [0, 1, hold, hold + handover // 3, hold + handover // 2, hold + handover - 1, hold + handover, 500]:
        got = s.weights(step=step, losses=LOSSES)
        want = _expected(step, hold=hold, handover=handover, shape=shape, start=start, floor=floor)
        assert got == pytest.approx(want, abs=1e-12)
        assert s.weights_in_advance(step) == got
        assert not s.needs_gradients(step)


def test_fixed_schedule_is_monotone():
    s = CurriculumScheduler(BASE, hold_steps=3, handover_steps=17)
    weights = [s.weights(step=i, losses=LOSSES) for i in range(30)]
    assert all(a["forward_kl"] <= b["forward_kl"] and a["mse"] >= b["mse"] for a, b in zip(weights, weights[1:]))
    assert weights[0] == {"forward_kl": 0.0, "mse": 0.5} and weights[-1] == {"forward_kl": 1.0, "mse": 0.0}


def _shared():
    return nn.Parameter(torch.linspace(0.5, 1.5, 8))


def _probe(shared, scales):
    """``L_i = scale_i * ||W||^2 / 2``: the gradient on the shared set is ``scale_i * W``."""
    losses = {name: scale * (shared**2).sum() / 2 for name, scale in scales.items()}
    return GradientProbe(losses, [shared]), losses


def test_gradient_mode_bounds_the_logit_gradient_by_hand():
    shared = _shared()
    norm_w = float(shared.detach().norm())
    s = CurriculumScheduler(BASE, handover_steps=10, shape="linear", logit_start=0.2, mode="gradient", every=3,
                            max_ratio=0.5)
    scales = {"forward_kl": 100.0, "mse": 1.0}  # the logit gradient is 100x the alignment gradient
    probe, losses = _probe(shared, scales)
    assert s.needs_gradients(0) and s.weights_in_advance(0) is None
    w = s.weights(step=0, losses={k: v.detach() for k, v in losses.items()}, gradients=probe)
    # step 0: p = 0; ramp weights forward_kl 0.2, mse 0.5; G_align = 0.5 * 1 * |W|, G_logit = 0.2 * 100 * |W|
    cap = min(1.0, 0.5 / 1.0 * (0.5 * norm_w) / (0.2 * 100 * norm_w))
    assert float(s.cap) == pytest.approx(cap)
    assert w == pytest.approx({"forward_kl": 0.2 * cap, "mse": 0.5})
    assert w["forward_kl"] * 100 * norm_w == pytest.approx(0.5 * w["mse"] * 1 * norm_w)  # the bound holds exactly
    assert s.metrics()["grad_norm/forward_kl"] == pytest.approx(100 * norm_w, rel=1e-6)
    # steps 1, 2 reuse the cap without gradients; step 3 measures again under a looser bound
    for step in (1, 2):
        assert not s.needs_gradients(step)
        ramp = _expected(step, handover=10, shape="linear", start=0.2)
        assert s.weights_in_advance(step) == pytest.approx({"forward_kl": ramp["forward_kl"] * cap, "mse": ramp["mse"]})
        assert s.weights(step=step, losses=LOSSES) == s.weights_in_advance(step)
    assert s.needs_gradients(3)
    probe, _ = _probe(shared, scales)
    w3 = s.weights(step=3, losses=LOSSES, gradients=probe)
    p = 0.3
    ramp = _expected(3, handover=10, shape="linear", start=0.2)
    cap3 = min(1.0, 0.5 / (1 - p) * (ramp["mse"] * norm_w) / (ramp["forward_kl"] * 100 * norm_w))
    assert w3 == pytest.approx({"forward_kl": ramp["forward_kl"] * cap3, "mse": ramp["mse"]})
    # after the hand-over the bound is gone and no gradient is asked for
    assert not s.needs_gradients(10)
    assert s.weights(step=10, losses=LOSSES) == {"forward_kl": 1.0, "mse": 0.0}


def test_gradient_mode_leaves_a_small_logit_gradient_alone_and_holds_without_gradients():
    shared = _shared()
    s = CurriculumScheduler(BASE, hold_steps=4, handover_steps=10, mode="gradient", every=1)
    for step in range(4):  # holding: no hand-over yet, no gradients
        assert not s.needs_gradients(step)
        assert s.weights(step=step, losses=LOSSES) == {"forward_kl": 0.0, "mse": 0.5}
    probe, _ = _probe(shared, {"forward_kl": 0.01, "mse": 1.0})
    assert s.needs_gradients(4)
    s.weights(step=4, losses=LOSSES, gradients=probe)
    assert float(s.cap) == 1.0  # logit weight 0 at p = 0: nothing to bound
    probe, _ = _probe(shared, {"forward_kl": 0.01, "mse": 1.0})
    s.weights(step=6, losses=LOSSES, gradients=probe)
    assert float(s.cap) == 1.0  # a logit gradient far below the bound is not scaled up


def test_gradient_mode_without_alignment_gradient_keeps_the_ramp(caplog):
    shared = _shared()
    s = CurriculumScheduler(BASE, handover_steps=10, mode="gradient", logit_start=0.5)
    losses = {"forward_kl": 100.0 * (shared**2).sum(), "mse": torch.tensor(0.3)}  # mse does not reach the set
    w = s.weights(step=0, losses=LOSSES, gradients=GradientProbe(losses, [shared]))
    assert w == pytest.approx(_expected(0, handover=10, start=0.5))
    assert "no gradient on the shared parameters" in caplog.text
    with pytest.raises(RuntimeError, match="shared_params"):
        CurriculumScheduler(BASE, mode="gradient").weights(step=0, losses=LOSSES, gradients=None)


def test_gradient_accumulation_measures_once_per_step_and_state_round_trips():
    shared = _shared()
    s = CurriculumScheduler(BASE, handover_steps=20, mode="gradient", every=5, max_ratio=0.1)
    probe, _ = _probe(shared, {"forward_kl": 50.0, "mse": 1.0})
    s.weights(step=0, losses=LOSSES, gradients=probe)
    assert not s.needs_gradients(0)  # the second micro-batch of step 0
    clone = CurriculumScheduler(BASE, handover_steps=20, mode="gradient", every=5, max_ratio=0.1)
    clone.load_state_dict(s.state_dict())
    for step in (1, 2, 3, 4):
        assert clone.weights_in_advance(step) == s.weights_in_advance(step)
    assert clone.needs_gradients(5) and s.needs_gradients(5)
    with torch.no_grad():  # evaluation never measures or changes the cap
        assert not s.needs_gradients(5)


def test_alignment_terms_inferred_from_the_registry_or_named():
    s = CurriculumScheduler({"forward_kl": 1.0, "mse": 1.0, "contrastive": 0.5})
    assert s.alignment == {"mse", "contrastive"} and s.logit == ["forward_kl"]
    named = CurriculumScheduler({"kd": 1.0, "align": 1.0}, alignment=["align"])
    assert named.alignment == {"align"} and named.logit == ["kd"]
    with pytest.raises(ConfigError, match="at least one of each"):
        CurriculumScheduler({"kd": 1.0, "align": 1.0})  # custom labels cannot be classified
    with pytest.raises(ConfigError, match="unknown term"):
        CurriculumScheduler(BASE, alignment=["cosine"])
    with pytest.raises(ConfigError, match="at least one of each"):
        CurriculumScheduler(BASE, alignment=["mse", "forward_kl"])


@pytest.mark.parametrize("kwargs, fragment", [
    ({"handover_steps": 0}, "handover_steps=0"), ({"hold_steps": -1}, "hold_steps=-1"), ({"every": 0}, "every=0"),
    ({"shape": "step"}, "shape='step'"), ({"mode": "adaptive"}, "mode='adaptive'"),
    ({"logit_start": 1.5}, "logit_start=1.5"), ({"alignment_floor": -0.1}, "alignment_floor=-0.1"),
    ({"max_ratio": 0.0}, "max_ratio=0.0"), ({"handover_steps": 2.5}, "handover_steps=2.5"),
])
def test_bad_options_raise_clear_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        CurriculumScheduler(BASE, **kwargs)


def test_registered_by_default():
    names = kd_plugins.available_components()["scheduler"]
    assert names["curriculum"] == "kd_plugins.components.curriculum"


INFO = ModelInfo(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=11)


@pytest.mark.parametrize("mode", ["fixed", "gradient"])
def test_trains_through_the_distiller_with_real_terms(mode):
    config = KDConfig(
        ce_weight=0.0,
        terms=[{"name": "forward_kl", "weight": 1.0}, {"name": "mse", "weight": 2.0, "layers": [[1, 1]]}],
        scheduler={"name": "curriculum", "hold_steps": 1, "handover_steps": 4, "mode": mode, "every": 1,
                   "shape": "linear"},
    )
    distiller = Distiller(config, student=INFO, teacher=INFO)
    generator = torch.Generator().manual_seed(0)
    block = nn.Linear(8, 8)  # the "last layer": both terms reach it
    head = torch.randn(11, 8, generator=generator)
    x = torch.randn(2, 5, 8, generator=generator)
    teacher_hidden = torch.randn(2, 5, 8, generator=generator)
    teacher = ModelCapture(info=INFO, hidden_states={1: teacher_hidden}, final_hidden=teacher_hidden,
                           lm_head_weight=head)
    optimizer = torch.optim.SGD([*block.parameters(), *distiller.parameters()], lr=1e-2)
    history = []
    for step in range(7):
        hidden = block(x)
        student = ModelCapture(info=INFO, hidden_states={1: hidden}, final_hidden=hidden, lm_head_weight=head)
        batch = BatchContext.from_inputs(labels=torch.randint(0, 11, (2, 5), generator=generator), step=step)
        out = distiller(student, teacher, batch, shared_params=list(block.parameters()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(out.weights)
        assert all(math.isfinite(v) for v in out.log_dict().values())
    assert history[0] == {"forward_kl": 0.0, "mse": 2.0}
    assert history[-1] == {"forward_kl": 1.0, "mse": 0.0}
    if mode == "gradient":
        assert "scheduler/grad_norm/forward_kl" in out.metrics
        assert all(h["forward_kl"] <= _expected(s, hold=1, handover=4, shape="linear", base={"forward_kl": 1.0, "mse": 2.0})["forward_kl"] + 1e-12
                   for s, h in enumerate(history))
    else:
        for step, h in enumerate(history):
            assert h == pytest.approx(_expected(step, hold=1, handover=4, shape="linear",
                                                base={"forward_kl": 1.0, "mse": 2.0}))
