"""Configuration mistakes get a message that names the problem, the value and the fix:
mistyped paths, the wrong shape of ``terms``, YAML syntax errors, option typos, a configuration that trains
nothing. Every test asserts on the message text."""

from __future__ import annotations

import pytest

import kd_plugins
from kd_plugins import ConfigError, Distiller, KDConfig, ModelInfo

STUDENT = ModelInfo(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=128, name="s")
TEACHER = ModelInfo(hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, vocab_size=128, name="t")


@pytest.fixture(autouse=True)
def builtins_only(clean_plugin_manager):
    clean_plugin_manager.setenv("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
    kd_plugins.reset_plugin_manager()


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --- a mistyped kd_config path --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["configs/kd.yaml", "kd.yml"])
def test_a_missing_yaml_path_says_the_file_does_not_exist(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    message = _message(KDConfig.from_yaml, source)
    assert f"KD config file {source!r} does not exist" in message
    assert str(tmp_path / source) in message and "expected a mapping" not in message


def test_a_missing_path_object_says_the_file_does_not_exist(tmp_path):
    message = _message(KDConfig.from_yaml, tmp_path / "kd_typo.yaml")
    assert "does not exist" in message and "kd_typo.yaml" in message


def test_a_path_without_yaml_suffix_is_neither_a_file_nor_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _message(KDConfig.from_yaml, "configs/kd")
    assert "kd_config='configs/kd' is neither an existing file" in message
    assert f"no such file: {tmp_path / 'configs/kd'}" in message and "parses as str" in message


def test_a_directory_is_refused_by_name(tmp_path):
    (tmp_path / "kd.yaml").mkdir()
    assert "is a directory" in _message(KDConfig.from_yaml, str(tmp_path / "kd.yaml"))


def test_load_kd_config_with_a_mistyped_path(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from kd_plugins.integrations.trl import load_kd_config

    monkeypatch.chdir(tmp_path)
    assert "KD config file 'kd_typo.yaml' does not exist" in _message(load_kd_config, "kd_typo.yaml")


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "kd.yaml"
    path.write_text("ce_weight: 1.0\nterms:\n  - {name: dkd, weight: 1.0\nscheduler: constant\n")
    message = _message(KDConfig.from_yaml, str(path))
    assert message.startswith(f"KD config file {str(path)!r}: YAML syntax error at line ")
    assert "<unicode string>" not in message


def test_yaml_syntax_error_in_text():
    message = _message(KDConfig.from_yaml, "terms: [dkd\nce_weight: 1")
    assert message.startswith("KD config text: YAML syntax error at line")


def test_a_file_that_holds_no_mapping(tmp_path):
    path = tmp_path / "kd.yaml"
    path.write_text("- dkd\n- mse\n")
    message = _message(KDConfig.from_yaml, str(path))
    assert "expected a mapping of KD settings" in message and "list" in message and str(path) in message


# --- the shape of terms -----------------------------------------------------------------------------------------


def test_terms_as_a_single_string_shows_the_list_form():
    message = _message(KDConfig.from_yaml, "terms: dkd")
    assert message == ("KDConfig: terms='dkd' is a single string, but terms is a list of terms; write `terms: [dkd]` "
                       "or `terms: [{name: dkd, weight: 1.0}]`")
    assert "more than once" not in message


def test_terms_as_one_mapping_shows_the_list_form():
    message = _message(KDConfig.from_yaml, "terms: {name: dkd, weight: 2.0}")
    assert "terms={'name': 'dkd', 'weight': 2.0} is one term's mapping, but terms is a list of terms" in message
    assert "write `terms: [{name: dkd, weight: 2.0}]`" in message
    assert "unknown transfer term 'name'" not in message


def test_terms_as_a_mapping_of_names_shows_the_list_form():
    message = _message(KDConfig.from_dict, {"terms": {"dkd": {"weight": 1.0}, "mse": None}})
    assert "is a mapping of names" in message and "write `terms: [{name: dkd, weight: 1.0}, {name: mse}]`" in message


# --- option and key typos ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("term, bad, accepted, hint", [
    ({"name": "forward_kl", "temprature": 2.0}, "temprature", ["temperature", "chunk_size"], "temperature"),
    ({"name": "dkd", "alfa": 1.0}, "alfa", ["alpha", "beta", "temperature", "chunk_size"], "alpha"),
    ({"name": "generalized_jsd", "betta": 0.5}, "betta", ["beta", "temperature", "chunk_size"], "beta"),
    ({"name": "contrastive", "projdim": 8}, "projdim", ["layers", "proj_dim", "temperature"], "proj_dim"),
])
def test_a_term_option_typo_lists_the_accepted_options(term, bad, accepted, hint):
    message = _message(Distiller, {"terms": [term]}, student=STUDENT, teacher=TEACHER)
    assert f"term {term['name']!r} ({term['name']}): unknown option(s) [{bad!r}]" in message
    assert f"did you mean {hint!r}?" in message
    listed = message.split("accepted options: ")[1]
    for option in accepted:
        assert repr(option) in listed, (option, message)


def test_an_unknown_key_suggests_the_closest():
    message = _message(KDConfig.from_dict, {"terms": ["dkd"], "ce_weght": 0.5})
    assert "unknown keys ['ce_weght'] ('ce_weght' -> did you mean 'ce_weight'?)" in message


# --- a configuration that trains nothing ------------------------------------------------------------------------


def test_all_weights_zero_with_ce_weight_zero_is_refused():
    message = _message(KDConfig.from_dict, {"ce_weight": 0, "terms": [{"name": "dkd", "weight": 0},
                                                                      {"name": "mse", "weight": 0.0}]})
    assert message == ("KDConfig: every term weight is 0 (dkd: 0, mse: 0.0) and ce_weight=0, so nothing would be "
                       "trained (loss 0, gradient 0 at every step); give a term a weight > 0 or set ce_weight > 0")


def test_zero_weights_are_fine_with_a_task_loss_or_one_weighted_term():
    KDConfig.from_dict({"ce_weight": 1.0, "terms": [{"name": "dkd", "weight": 0}]})
    KDConfig.from_dict({"ce_weight": 0, "terms": [{"name": "dkd", "weight": 0}, {"name": "mse", "weight": 0.1}]})


# --- the new settings --------------------------------------------------------------------------------------------


def test_teacher_cache_in_a_yaml_file_resolves_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "kd.yaml").write_text("terms: [forward_kl]\nteacher_cache: ../cache\n")
    monkeypatch.chdir(tmp_path / "configs")
    config = KDConfig.from_yaml(str(folder / "kd.yaml"))
    assert config.teacher_cache == str(tmp_path / "configs" / ".." / "cache")
    assert KDConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("data, fragment", [
    ({"terms": ["mse"], "teacher_cache": 3}, "teacher_cache=3 is invalid"),
    ({"terms": ["mse"], "allow_config_change_on_resume": "yes"}, "allow_config_change_on_resume='yes' is invalid"),
])
def test_new_settings_are_validated(data, fragment):
    assert fragment in _message(KDConfig.from_dict, data)
