import pytest
import yaml

from kd_plugins import ConfigError, KDConfig, TermConfig
from kd_plugins.config import SchedulerConfig

EXAMPLE = """
ce_weight: 1.0
terms:
  - {name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}
  - {name: contrastive, weight: 0.5, layers: uniform, proj_dim: 256, temperature: 0.07, max_tokens: 1024}
  - {name: attention_relation, weight: 0.5, teacher_layer: -2, student_layer: -1, relation_heads: 8}
scheduler: {name: linear, warmup_steps: 100}
"""


def test_yaml_round_trip(tmp_path):
    config = KDConfig.from_yaml(EXAMPLE)
    assert [t.name for t in config.terms] == ["dkd", "contrastive", "attention_relation"]
    assert config.terms[0].options == {"alpha": 1.0, "beta": 2.0, "temperature": 1.0}
    assert config.scheduler.name == "linear" and config.scheduler.options == {"warmup_steps": 100}
    path = tmp_path / "kd.yaml"
    path.write_text(config.to_yaml())
    again = KDConfig.from_yaml(str(path))
    assert again == config
    assert KDConfig.from_dict(config.to_dict()) == config


def test_string_shorthands():
    config = KDConfig(terms=["forward_kl"], scheduler="cosine")
    assert config.terms == [TermConfig(name="forward_kl", weight=1.0, label="forward_kl", options={})]
    assert config.scheduler.name == "cosine"


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"ce_weight": -1.0}, "ce_weight=-1.0"),
        ({"terms": [{"name": "dkd", "weight": -0.5}]}, "weight=-0.5"),
        ({"terms": [{"name": "forward_kl", "temperature": 0}]}, "temperature=0"),
        ({"terms": [{"name": "dkd", "alpha": -1}]}, "alpha=-1"),
        ({"terms": [{"name": "generalized_jsd", "beta": 1.5}]}, "beta=1.5"),
        ({"terms": [{"weight": 1.0}]}, "no 'name'"),
        ({"terms": ["dkd", "dkd"]}, "more than once"),
        ({"teacher_dtype": "float8"}, "teacher_dtype='float8'"),
        ({"on_nonfinite_teacher": "ignore"}, "on_nonfinite_teacher='ignore'"),
        ({"scheduler": {"name": "linear", "warmup_steps": -3}}, "warmup_steps=-3"),
        ({"ce_weight": 0.0}, "nothing to train"),
        ({"bogus": 1}, "unknown keys ['bogus']"),
        ({"terms": [{"name": "dkd", "weight": float("nan")}]}, "weight=nan"),
    ],
)
def test_invalid_values_name_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        KDConfig.from_dict(data)
    assert fragment in str(info.value)


def test_labels_allow_the_same_term_twice():
    config = KDConfig(terms=[{"name": "mse", "layers": "last"}, {"name": "mse", "label": "mse_mid", "layers": [[0, 1]]}])
    assert [t.label for t in config.terms] == ["mse", "mse_mid"]
    assert config.to_dict()["terms"][1]["label"] == "mse_mid"


def test_yaml_is_loaded_safely(tmp_path):
    """A python/object tag is refused by the YAML loader itself, before anything it names runs: the payload would
    create a file, and the error is the safe loader's (not a later validation error of the constructed value)."""
    marker = tmp_path / "payload_ran"
    payload = f"ce_weight: !!python/object/apply:builtins.open ['{marker}', 'w']"
    with pytest.raises(ConfigError,
                       match=r"could not determine a constructor for the tag '.*python/object/apply:builtins\.open'") as info:
        KDConfig.from_yaml(payload)
    assert isinstance(info.value.__cause__, yaml.constructor.ConstructorError)
    assert not marker.exists(), "the YAML payload was executed"


# --- the rest of the contract (each test kills surviving mutants of benchmarks/mutation.py) --------------------


def test_yaml_from_a_path_object_and_a_yml_file(tmp_path):
    config = KDConfig.from_yaml(EXAMPLE)
    for name in ("kd.yaml", "kd.yml"):
        (tmp_path / name).write_text(config.to_yaml())
        assert KDConfig.from_yaml(str(tmp_path / name)) == config
        assert KDConfig.from_yaml(tmp_path / name) == config


def test_to_yaml_keeps_the_field_and_entry_order():
    text = KDConfig.from_yaml(EXAMPLE).to_yaml()
    assert text.startswith("ce_weight: 1.0\nterms:\n- name: dkd\n  weight: 1.0\n  alpha: 1.0\n")
    assert text.index("terms:") < text.index("scheduler:") < text.index("teacher_dtype:")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: KDConfig(ce_weight=-1.0), "KDConfig: ce_weight=-1.0 is invalid; expected a finite number >= 0.0"),
        (lambda: KDConfig(projector_lr=0.0), "KDConfig: projector_lr=0.0 is invalid; expected a finite number > 0.0"),
        (lambda: KDConfig(fuse_task_loss="yes"),
         "KDConfig: fuse_task_loss='yes' is invalid; expected true (default: run the student's LM head once per step) "
         "or false (always run the host trainer's own loss)"),
        (lambda: KDConfig(ce_weight=0.0),
         "KDConfig: no terms and ce_weight=0 leaves nothing to train; add a term or set ce_weight"),
        (lambda: KDConfig.from_dict(["dkd"]), "KDConfig: expected a mapping of KD settings (ce_weight, terms, scheduler, ...), got list ['dkd']"),
        (lambda: TermConfig(name=""), "terms: name='' is invalid; expected a registered term name"),
        (lambda: TermConfig.from_dict(5), "terms: each entry must be a mapping with a 'name' key, got 5"),
        (lambda: TermConfig(name="dkd", options={"alpha": -1}),
         "terms[dkd]: alpha=-1 is invalid; expected a finite number >= 0.0"),
        (lambda: SchedulerConfig(name=""), "scheduler: name='' is invalid; expected a registered scheduler name"),
        (lambda: SchedulerConfig.from_dict(5),
         "scheduler: expected a mapping like {name: linear, warmup_steps: 100}, got 5"),
        (lambda: SchedulerConfig(name="gradnorm", options={"every": -1}),
         "scheduler: every=-1 is invalid; expected an integer >= 0"),
        (lambda: SchedulerConfig(name="gradnorm", options={"every": True}),
         "scheduler: every=True is invalid; expected an integer >= 0"),
    ],
)
def test_error_messages_in_full(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


def test_boundary_values_are_accepted():
    assert KDConfig(terms=[], ce_weight=1.0).terms == []  # CE alone: a plain fine-tune, nothing to refuse
    assert KDConfig(terms=["dkd"], ce_weight=0.0).ce_weight == 0.0  # pure distillation
    assert SchedulerConfig(name="linear", options={"warmup_steps": 0}).options == {"warmup_steps": 0}
    assert TermConfig(name="generalized_jsd", options={"beta": 1.0}).options == {"beta": 1.0}  # reverse KL
    assert TermConfig(name="generalized_jsd", options={"beta": 0.0}).options == {"beta": 0.0}


def test_nested_options_defaults_and_config_objects():
    term = TermConfig.from_dict({"name": "dkd", "options": {"alpha": 0.5}, "beta": 3.0})
    assert (term.weight, term.label, term.options) == (1.0, "dkd", {"alpha": 0.5, "beta": 3.0})
    scheduler = SchedulerConfig.from_dict({"options": {"warmup_steps": 3}})
    assert (scheduler.name, scheduler.options) == ("constant", {"warmup_steps": 3})
    given = TermConfig(name="mse", weight=0.25)
    config = KDConfig(terms=[given], scheduler=SchedulerConfig(name="cosine"))
    assert config.terms == [given] and config.scheduler == SchedulerConfig(name="cosine")
