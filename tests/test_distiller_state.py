"""The Distiller's checkpoint contract without a trainer: ``check_kd_state_dict`` names every key and shape that
differs and changes nothing, ``load_kd_state_dict`` loads all or nothing (or, ``partial``, exactly what fits), and
``resolved_config`` is the config with every builder default filled in plus both models' shape facts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kd_plugins
from kd_plugins import ConfigError, DistillationTerm, Distiller, KDConfig, ModelInfo, Requirements, WeightScheduler
from kd_plugins import hookimpl

STUDENT = ModelInfo(hidden_size=6, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=3, vocab_size=11, name="s")
TEACHER = ModelInfo(hidden_size=8, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=11, name="t")


class Projected(DistillationTerm):
    family = "alignment"

    def __init__(self, student_width, teacher_width, width=None, scale=0.5):
        super().__init__()
        self.proj = nn.Linear(student_width, width or teacher_width)
        self.scale = scale

    def requirements(self):
        return Requirements(student_layers={1}, teacher_layers={3})

    def forward(self, student, teacher, batch):  # pragma: no cover - not called here
        raise AssertionError


class Counting(WeightScheduler):
    def __init__(self, base_weights, every=3, decay=0.9):
        super().__init__()
        self.base_weights = base_weights
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def weights(self, *, step, losses, gradients=None):  # pragma: no cover - not called here
        return dict(self.base_weights)


class Plugin:
    @hookimpl
    def register_alignment_terms(self, register):
        register("state_proj", lambda student, teacher, width=None, scale=0.5: Projected(
            student.hidden_size, teacher.hidden_size, width, scale))

    @hookimpl
    def register_schedulers(self, register):
        register("state_counting", Counting)


@pytest.fixture(autouse=True)
def plugin(clean_plugin_manager):
    kd_plugins.get_plugin_manager().register(Plugin(), name="state_plugin")


def _distiller(width=None, label=None, seed=0) -> Distiller:
    torch.manual_seed(seed)
    term = {"name": "state_proj", **({"width": width} if width else {}), **({"label": label} if label else {})}
    return Distiller(KDConfig(terms=[term], scheduler={"name": "state_counting"}), student=STUDENT, teacher=TEACHER)


def _snapshot(d: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.state_dict().items()}


def _assert_unchanged(d: Distiller, before: dict[str, torch.Tensor]) -> None:
    after = d.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_state_that_fits_loads_every_tensor():
    source, target = _distiller(seed=1), _distiller(seed=2)
    source.scheduler.calls += 5
    state = source.kd_state_dict()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    target.check_kd_state_dict(state)  # fits: no error
    assert target.load_kd_state_dict(state) == []
    _assert_unchanged(target, state)
    assert int(target.scheduler.calls) == 5


def test_the_refusal_names_missing_unexpected_and_every_shape_and_loads_nothing():
    target = _distiller(seed=2)
    before = _snapshot(target)
    state = _distiller(seed=1).kd_state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["scheduler.calls"]
    state["terms.state_proj.proj.weight"] = torch.zeros(3, 6)
    state["terms.state_proj.proj.bias"] = torch.zeros(3)
    for call in (target.check_kd_state_dict, target.load_kd_state_dict):
        with pytest.raises(ConfigError) as info:
            call(state)
        assert str(info.value) == (
            "KD state does not match this configuration: missing ['scheduler.calls'], unexpected ['extra.weight']; "
            "shapes differ: terms.state_proj.proj.bias: (3,) in the file, (8,) in this run; "
            "terms.state_proj.proj.weight: (3, 6) in the file, (8, 6) in this run. Was it saved with another KD "
            "config (a changed term, proj_dim, layer map or model)? Resume with the configuration it was saved with, "
            "or set allow_config_change_on_resume: true to restore only what still fits")
        _assert_unchanged(target, before)


@pytest.mark.parametrize("change, expected", [
    ("missing", "missing ['scheduler.calls'], unexpected []. Was"),
    ("unexpected", "missing [], unexpected ['extra']. Was"),
    ("shape", "shapes differ: terms.state_proj.proj.bias: (3,) in the file, (8,) in this run. Was"),
])
def test_each_kind_of_mismatch_alone_is_refused(change, expected):
    target = _distiller()
    before = _snapshot(target)
    state = _distiller(seed=1).kd_state_dict()
    if change == "missing":
        del state["scheduler.calls"]
    elif change == "unexpected":
        state["extra"] = torch.zeros(1)
    else:
        state["terms.state_proj.proj.bias"] = torch.zeros(3)
    with pytest.raises(ConfigError) as info:
        target.load_kd_state_dict(state)
    assert f"KD state does not match this configuration: {expected}" in str(info.value)
    _assert_unchanged(target, before)


def test_partial_loads_exactly_the_tensors_whose_name_and_shape_fit():
    source = _distiller(width=5, seed=1)  # the projector's output width differs; the scheduler's buffer fits
    source.scheduler.calls += 7
    state = source.kd_state_dict()
    state["unknown"] = torch.ones(2)
    target = _distiller(seed=2)
    before = _snapshot(target)
    left = target.load_kd_state_dict(state, partial=True)
    assert left == ["terms.state_proj.proj.bias", "terms.state_proj.proj.weight"]
    assert int(target.scheduler.calls) == 7
    for key in left:
        assert torch.equal(target.state_dict()[key], before[key])
    assert "unknown" not in target.state_dict()


def test_partial_with_a_fitting_state_restores_everything():
    source, target = _distiller(seed=1), _distiller(seed=2)
    assert target.load_kd_state_dict(source.kd_state_dict(), partial=True) == []
    _assert_unchanged(target, source.kd_state_dict())


def test_resolved_config_fills_builder_defaults_and_records_both_models():
    config = KDConfig(ce_weight=0.25, terms=[{"name": "state_proj", "label": "p", "weight": 0.5, "width": 4}],
                      scheduler={"name": "state_counting", "every": 7}, teacher_cache="/some/cache",
                      allow_config_change_on_resume=True)
    resolved = Distiller(config, student=STUDENT, teacher=TEACHER).resolved_config()
    assert resolved["terms"] == [{"label": "p", "name": "state_proj", "weight": 0.5,
                                  "options": {"width": 4, "scale": 0.5}}]
    assert resolved["scheduler"] == {"name": "state_counting", "options": {"every": 7, "decay": 0.9}}
    assert resolved["student"] == {"hidden_size": 6, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                   "head_dim": 3, "vocab_size": 11}
    assert resolved["teacher"] == {"hidden_size": 8, "num_layers": 4, "num_heads": 2, "num_kv_heads": 2,
                                   "head_dim": 4, "vocab_size": 11}
    assert resolved["ce_weight"] == 0.25
    assert "teacher_cache" not in resolved and "allow_config_change_on_resume" not in resolved
    other_fields = {f for f in KDConfig.__dataclass_fields__} - {"terms", "scheduler", "teacher_cache",
                                                                  "allow_config_change_on_resume"}
    assert other_fields <= set(resolved)
    assert json.loads(json.dumps(resolved)) == resolved  # JSON-compatible as it is
    assert list(resolved) == sorted(resolved)


def test_resolved_config_differs_exactly_where_training_would():
    base = Distiller(KDConfig(terms=[{"name": "state_proj"}]), student=STUDENT, teacher=TEACHER).resolved_config()
    same = Distiller(KDConfig(terms=[{"name": "state_proj", "scale": 0.5}], teacher_cache="/x"),
                     student=STUDENT, teacher=TEACHER).resolved_config()
    assert same == base  # an explicit default and a teacher cache change nothing that is trained
    changed = Distiller(KDConfig(terms=[{"name": "state_proj", "scale": 0.6}]), student=STUDENT,
                        teacher=TEACHER).resolved_config()
    assert changed["terms"][0]["options"]["scale"] == 0.6 and changed != base
    wider = ModelInfo(hidden_size=10, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=5, vocab_size=11)
    other_teacher = Distiller(KDConfig(terms=[{"name": "state_proj"}]), student=STUDENT,
                              teacher=wider).resolved_config()
    assert other_teacher["teacher"]["hidden_size"] == 10 and other_teacher["student"] == base["student"]


def test_resolved_config_reads_the_distillers_own_plugin_manager():
    """A Distiller built on a private plugin manager (components the process-wide one does not have) resolves its
    builders there too."""
    import pluggy

    from kd_plugins import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)

    class Private:
        @hookimpl
        def register_alignment_terms(self, register):
            register("private_proj", lambda student, teacher, scale=0.25: Projected(
                student.hidden_size, teacher.hidden_size, None, scale))

        @hookimpl
        def register_schedulers(self, register):
            register("private_counting", Counting)

    pm.register(Private(), name="private")
    config = KDConfig(terms=[{"name": "private_proj"}], scheduler={"name": "private_counting", "decay": 0.5})
    resolved = Distiller(config, student=STUDENT, teacher=TEACHER, plugin_manager=pm).resolved_config()
    assert resolved["terms"][0]["options"] == {"scale": 0.25}
    assert resolved["scheduler"] == {"name": "private_counting", "options": {"every": 3, "decay": 0.5}}


def test_resolved_config_writes_option_values_json_cannot_hold_as_their_repr():
    config = KDConfig(terms=[{"name": "state_proj", "scale": torch.float16}])
    resolved = Distiller(config, student=STUDENT, teacher=TEACHER).resolved_config()
    assert resolved["terms"][0]["options"]["scale"] == "torch.float16"
    assert json.loads(json.dumps(resolved)) == resolved
