"""``kd-plugins sft`` refuses what a user can get wrong with a message: a teacher, student or KD-config
path typo says the path does not exist (no hub ``HFValidationError``), relative paths in the YAML resolve from the
YAML's folder, unknown YAML keys are refused with the closest known key, and a teacher cache can be named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kd_plugins import cli
from kd_plugins.integrations import sft_cli
from kd_plugins.integrations.cache_coverage import AppendedEosCache
from kd_plugins.integrations.teacher_cache import cache_teacher

from .conftest import tiny_model, tiny_texts, tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def project(tmp_path):
    """A project folder with a student, a teacher, data and a KD config; run.yaml names them relatively."""
    root = tmp_path / "project"
    tiny_model("llama", seed=0).save_pretrained(root / "student")
    tiny_tokenizer().save_pretrained(root / "student")
    tiny_model("llama", seed=1, hidden=48, layers=3).save_pretrained(root / "teacher")
    (root / "data").mkdir()
    (root / "data" / "train.json").write_text("\n".join(json.dumps({"text": t}) for t in tiny_texts(8)))
    (root / "kd.yaml").write_text((FIXTURES / "kd_tiny.yaml").read_text())
    run = {
        "model_name_or_path": "student", "teacher_model_name_or_path": "./teacher", "dataset_name": "data",
        "output_dir": "out", "kd_config": "kd.yaml",
        "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
        "report_to": "none", "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
        "save_strategy": "no", "max_length": 32, "dtype": "float32", "disable_tqdm": True,
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return root, run, elsewhere


def _write(root, run):
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    return str(root / "run.yaml")


def _refused(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "HFValidationError" not in err, err
    return err


def test_relative_paths_resolve_from_the_yaml_folder(project, monkeypatch):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)  # nothing of the project is relative to the working directory
    assert cli.main(["sft", "--config", _write(root, run)]) == 0
    assert (root / "out" / "model.safetensors").is_file() and not (elsewhere / "out").exists()
    trainer = sft_cli.last_trainer
    assert Path(trainer.kd_teacher.model.config._name_or_path) == root / "teacher"


def test_a_teacher_path_typo_says_it_does_not_exist(project, monkeypatch, capsys):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)
    err = _refused(["sft", "--config", _write(root, {**run, "teacher_model_name_or_path": "./teachr"})], capsys)
    assert f"teacher_model_name_or_path: './teachr' does not exist (looked for {root / 'teachr'}; relative paths in " \
           f"the YAML resolve from its folder {root})" in err


def test_a_teacher_flag_typo_says_it_does_not_exist(project, monkeypatch, capsys):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)
    del run["teacher_model_name_or_path"]
    err = _refused(["sft", "--config", _write(root, run), "--teacher_model_name_or_path", "../projct/teacher"], capsys)
    assert "teacher='../projct/teacher' does not exist (no such file or folder: " in err


def test_a_student_flag_typo_says_it_does_not_exist(project, monkeypatch, capsys):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)
    err = _refused(["sft", "--config", _write(root, run), "--model_name_or_path", "./studnt"], capsys)
    assert "model_name_or_path='./studnt' does not exist" in err


def test_a_path_relative_to_the_working_directory_is_explained(project, monkeypatch, capsys):
    root, run, _ = project
    monkeypatch.chdir(root.parent)  # 'project/teacher' exists from here, not from the YAML's folder
    err = _refused(["sft", "--config", _write(root, {**run, "teacher_model_name_or_path": "project/teacher"})], capsys)
    assert "'project/teacher' exists relative to the working directory" in err
    assert "write it relative to the YAML's folder, or absolute" in err


def test_unknown_yaml_keys_are_refused_with_the_closest_key(project, capsys):
    root, run, _ = project
    run = {**run, "max_stpes": 5}
    err = _refused(["sft", "--config", _write(root, run)], capsys)
    assert "unknown keys ['max_stpes'] ('max_stpes' -> did you mean 'max_steps'?)" in err
    assert "the run would ignore them" in err


def test_unknown_flags_are_refused_with_the_closest_flag(project, capsys):
    root, run, _ = project
    err = _refused(["sft", "--config", _write(root, run), "--max_stpes", "3"], capsys)
    assert "unknown arguments ['--max_stpes'] ('--max_stpes' -> did you mean '--max_steps'?)" in err


def test_no_training_data_is_named(project, capsys):
    root, run, _ = project
    del run["dataset_name"]
    err = _refused(["sft", "--config", _write(root, run)], capsys)
    assert "no training data: give dataset_name" in err


@pytest.mark.parametrize("where", ["yaml", "flag"])
def test_a_kd_config_typo_says_the_file_does_not_exist(project, monkeypatch, capsys, where):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)
    if where == "yaml":
        err = _refused(["sft", "--config", _write(root, {**run, "kd_config": "kd_typo.yaml"})], capsys)
        assert f"kd_config: 'kd_typo.yaml' does not exist (looked for {root / 'kd_typo.yaml'}" in err
    else:
        del run["kd_config"]
        err = _refused(["sft", "--config", _write(root, run), "--kd_config", "kd_typo.yml"], capsys)
        assert "KD config file 'kd_typo.yml' does not exist" in err
    assert "expected a mapping" not in err


def test_a_teacher_cache_can_be_named(project, monkeypatch):
    root, run, elsewhere = project
    monkeypatch.chdir(elsewhere)
    tok = tiny_tokenizer()
    ids = [tok(t)["input_ids"] for t in tiny_texts(8)]
    cache_teacher(tiny_model("llama", seed=1, hidden=48, layers=3), tok, ids, root / "cache", k=16, progress=False)
    (root / "kd.yaml").write_text("terms: [{name: dkd, weight: 1.0}]\n")
    del run["teacher_model_name_or_path"]
    assert cli.main(["sft", "--config", _write(root, {**run, "teacher_cache": "cache"})]) == 0
    assert isinstance(sft_cli.last_trainer.kd_teacher, AppendedEosCache)  # TRL appended EOS to the text rows
    assert "kd/loss/dkd" in [e for e in sft_cli.last_trainer.state.log_history if "loss" in e][-1]


def test_a_teacher_and_a_cache_together_are_refused(project, capsys):
    root, run, _ = project
    (root / "cache").mkdir()
    err = _refused(["sft", "--config", _write(root, {**run, "teacher_cache": "cache"})], capsys)
    assert "both teacher_model_name_or_path=" in err and "and teacher_cache=" in err


def test_teacher_tokenizer_is_compared(project, capsys):
    from .test_reliability_tokenizers import _other_tokenizer

    root, run, _ = project
    _other_tokenizer().save_pretrained(root / "teacher_tok")
    err = _refused(["sft", "--config", _write(root, {**run, "teacher_tokenizer": "teacher_tok"})], capsys)
    assert "have different tokenizers" in err and "cross-tokenizer distillation is not configured" in err
