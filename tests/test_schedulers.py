import math

import pytest
import torch

from kd_plugins.components.schedulers import ConstantScheduler, CosineScheduler, LinearScheduler

LOSSES = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
BASE = {"a": 1.0, "b": 0.5}


def test_constant_keeps_base_weights():
    s = ConstantScheduler(BASE)
    assert s.weights(step=0, losses=LOSSES) == BASE
    assert s.weights(step=10_000, losses=LOSSES) == BASE


@pytest.mark.parametrize("step, expected", [(0, 0.0), (25, 0.25), (100, 1.0), (250, 1.0)])
def test_linear_ramp(step, expected):
    w = LinearScheduler(BASE, warmup_steps=100).weights(step=step, losses=LOSSES)
    assert w["a"] == pytest.approx(expected) and w["b"] == pytest.approx(0.5 * expected)


def test_linear_start_fraction_and_zero_warmup():
    assert LinearScheduler(BASE, warmup_steps=10, start=0.2).weights(step=5, losses=LOSSES)["a"] == pytest.approx(0.6)
    assert LinearScheduler(BASE, warmup_steps=0).weights(step=0, losses=LOSSES)["a"] == 1.0


@pytest.mark.parametrize("step", [0, 10, 50, 90, 100, 150])
def test_cosine_ramp_matches_formula(step):
    expected = (1 - math.cos(math.pi * min(1.0, step / 100))) / 2
    assert CosineScheduler(BASE, warmup_steps=100).weights(step=step, losses=LOSSES)["a"] == pytest.approx(expected)


def test_cosine_is_monotone():
    s = CosineScheduler(BASE, warmup_steps=20)
    values = [s.weights(step=i, losses=LOSSES)["a"] for i in range(30)]
    assert all(x <= y for x, y in zip(values, values[1:]))


@pytest.mark.parametrize("kwargs, fragment", [({"warmup_steps": -1}, "warmup_steps=-1"), ({"start": 1.5}, "start=1.5")])
def test_bad_ramp_options(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LinearScheduler(BASE, **kwargs)
