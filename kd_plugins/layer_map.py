"""Which student layer is aligned with which teacher layer.

Layer indices follow :mod:`kd_plugins.types`: ``i`` is the output of decoder block ``i``, negative indices count
from the end. Every error is a :class:`kd_plugins.errors.ConfigError` naming the offending pair or value.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence, Union

from kd_plugins.errors import ConfigError
from kd_plugins.types import ModelInfo

__all__ = ["LayerMapSpec", "resolve_layer_map"]

LayerMapSpec = Union[str, Sequence[Sequence[int]]]
SPEC_NAMES = ("uniform", "last")


def resolve_layer_map(
    spec: LayerMapSpec, student: ModelInfo, teacher: ModelInfo, num_pairs: int | None = None
) -> list[tuple[int, int]]:
    """Turn a layer-map spec into resolved ``(student_layer, teacher_layer)`` pairs.

    Args:
        spec: ``"uniform"`` -- student layer ``i`` ↔ teacher layer ``round((i+1)·Lt/Ls) - 1`` (halves round
            up; the last student layer always meets the last teacher layer); ``"last"`` -- ``[(Ls-1, Lt-1)]``;
            or explicit pairs ``[[s, t], ...]`` (negative indices allowed).
        student, teacher: the models' :class:`ModelInfo` (depths are validated against them).
        num_pairs: only with ``"uniform"``: use this many evenly spaced student layers, always including the
            last one.

    Returns:
        Non-negative pairs, deduplicated and sorted.
    """
    if isinstance(spec, str):
        if spec == "uniform":
            pairs = _uniform(student, teacher, num_pairs)
        elif spec == "last":
            _reject_num_pairs(spec, num_pairs)
            pairs = [(student.num_layers - 1, teacher.num_layers - 1)]
        else:
            raise ConfigError(f"layers: unknown layer map {spec!r}; use one of {SPEC_NAMES} or a list of [s, t] pairs")
    else:
        _reject_num_pairs("explicit pairs", num_pairs)
        pairs = [_resolve_pair(pair, student, teacher) for pair in _as_pairs(spec)]
    if not pairs:
        raise ConfigError("layers: the layer map is empty; give at least one [student_layer, teacher_layer] pair")
    return sorted(set(pairs))


def _uniform(student: ModelInfo, teacher: ModelInfo, num_pairs: int | None) -> list[tuple[int, int]]:
    ls, lt = student.num_layers, teacher.num_layers
    if num_pairs is None:
        student_layers = range(ls)
    else:
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or not 1 <= num_pairs <= ls:
            raise ConfigError(
                f"num_pairs: got {num_pairs!r}; it must be an int in 1..{ls} ({student.name} has {ls} layers)"
            )
        student_layers = sorted({_round_half_up((j + 1) * ls / num_pairs) - 1 for j in range(num_pairs)})
    return [(i, max(_round_half_up((i + 1) * lt / ls) - 1, 0)) for i in student_layers]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _reject_num_pairs(spec: str, num_pairs: int | None) -> None:
    if num_pairs is not None:
        raise ConfigError(f"num_pairs: only valid with layers='uniform', not with {spec}")


def _as_pairs(spec: Iterable) -> list[tuple[int, int]]:
    try:
        items = list(spec)
    except TypeError:
        raise ConfigError(
            f"layers: got {spec!r}; use one of {SPEC_NAMES} or a list of [student_layer, teacher_layer] pairs"
        ) from None
    pairs = []
    for item in items:
        if (
            isinstance(item, str)
            or not hasattr(item, "__len__")
            or len(item) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in item)
        ):
            raise ConfigError(f"layers: bad pair {item!r}; each pair is [student_layer, teacher_layer] of two ints")
        pairs.append((item[0], item[1]))
    return pairs


def _resolve_pair(pair: tuple[int, int], student: ModelInfo, teacher: ModelInfo) -> tuple[int, int]:
    resolved = []
    for index, (role, info) in zip(pair, (("student", student), ("teacher", teacher))):
        try:
            resolved.append(info.resolve_layer(index))
        except IndexError:
            raise ConfigError(
                f"layers: pair {list(pair)}: {role} layer {index} is out of range for {info.name!r} with "
                f"{info.num_layers} layers (allowed: {-info.num_layers}..{info.num_layers - 1})"
            ) from None
    return resolved[0], resolved[1]
