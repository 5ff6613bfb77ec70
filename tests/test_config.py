import pytest
import yaml

from kd_plugins import ConfigError, KDConfig, TermConfig

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
    with pytest.raises(yaml.constructor.ConstructorError,
                       match=r"could not determine a constructor for the tag '.*python/object/apply:builtins\.open'"):
        KDConfig.from_yaml(payload)
    assert not marker.exists(), "the YAML payload was executed"
