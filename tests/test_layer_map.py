"""kd_plugins.layer_map.resolve_layer_map."""

from __future__ import annotations

import pytest

from kd_plugins.errors import ConfigError
from kd_plugins.layer_map import resolve_layer_map
from kd_plugins.types import ModelInfo


def info(layers: int, name: str) -> ModelInfo:
    return ModelInfo(hidden_size=8, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=11, name=name)


STUDENT, TEACHER = info(4, "student-4"), info(8, "teacher-8")


@pytest.mark.parametrize(
    "ls, lt, expected",
    [
        (4, 8, [(0, 1), (1, 3), (2, 5), (3, 7)]),
        (3, 5, [(0, 1), (1, 2), (2, 4)]),
        (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        (6, 2, [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]),  # deeper student: never below layer 0
    ],
)
def test_uniform(ls, lt, expected):
    assert resolve_layer_map("uniform", info(ls, "s"), info(lt, "t")) == expected


def test_uniform_num_pairs_spaced_and_includes_last():
    assert resolve_layer_map("uniform", STUDENT, TEACHER, num_pairs=2) == [(1, 3), (3, 7)]
    assert resolve_layer_map("uniform", STUDENT, TEACHER, num_pairs=1) == [(3, 7)]
    assert resolve_layer_map("uniform", STUDENT, TEACHER, num_pairs=4) == resolve_layer_map("uniform", STUDENT, TEACHER)
    pairs = resolve_layer_map("uniform", info(12, "s"), info(24, "t"), num_pairs=3)
    assert pairs == [(3, 7), (7, 15), (11, 23)]


@pytest.mark.parametrize("num_pairs", [0, 5, -1, 2.0, True])
def test_uniform_num_pairs_out_of_range(num_pairs):
    with pytest.raises(ConfigError, match=r"num_pairs.*1\.\.4"):
        resolve_layer_map("uniform", STUDENT, TEACHER, num_pairs=num_pairs)


def test_last():
    assert resolve_layer_map("last", STUDENT, TEACHER) == [(3, 7)]
    with pytest.raises(ConfigError, match="num_pairs"):
        resolve_layer_map("last", STUDENT, TEACHER, num_pairs=2)


def test_explicit_negative_dedup_sorted():
    pairs = resolve_layer_map([[-1, -1], (0, 2), [3, 7], [1, -4]], STUDENT, TEACHER)
    assert pairs == [(0, 2), (1, 4), (3, 7)]


@pytest.mark.parametrize(
    "pair, pattern",
    [
        ([4, 0], r"pair \[4, 0\]: student layer 4 is out of range for 'student-4' with 4 layers \(allowed: -4\.\.3\)"),
        ([0, -9], r"pair \[0, -9\]: teacher layer -9 is out of range for 'teacher-8' with 8 layers \(allowed: -8\.\.7\)"),
    ],
)
def test_explicit_out_of_range(pair, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_layer_map([[0, 0], pair], STUDENT, TEACHER)


@pytest.mark.parametrize("spec", ["middle", [[0]], [[0, 1, 2]], [["a", 1]], [[0.5, 1]], [], 3])
def test_bad_specs(spec):
    with pytest.raises(ConfigError, match="layers"):
        resolve_layer_map(spec, STUDENT, TEACHER)
