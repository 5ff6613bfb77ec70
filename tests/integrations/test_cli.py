"""The ``kd-plugins`` console script: ``list`` (core only), ``sft`` (TRL's parser + KD keys), ``demo``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from kd_plugins import KDConfig, cli
from kd_plugins.errors import ConfigError
from kd_plugins.integrations import sft_cli

from .conftest import tiny_model, tiny_texts, tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_list_prints_builtins_and_imports_no_transformers():
    code = (
        "import sys; from kd_plugins.cli import main; rc = main(['list']); "
        "assert 'transformers' not in sys.modules and 'trl' not in sys.modules, 'list imported the HF stack'; "
        "sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"KD_PLUGINS_DISABLE_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    for expected in ("logit:", "alignment:", "scheduler:", "dkd", "contrastive", "attention_relation",
                     "(kd_plugins.components.logit)"):
        assert expected in done.stdout


def _workspace(tmp_path):
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    tiny_model("llama", seed=0).save_pretrained(student)
    tiny_tokenizer().save_pretrained(student)
    tiny_model("llama", seed=1, hidden=48, layers=3).save_pretrained(teacher)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text("\n".join(json.dumps({"text": t}) for t in tiny_texts(16)))
    run = {
        "model_name_or_path": str(student), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
        "report_to": "none", "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
        "save_strategy": "no", "max_length": 32, "dtype": "float32", "disable_tqdm": True,
        "teacher_model_name_or_path": str(teacher),
    }
    return run


def test_sft_runs_a_yaml_with_kd_config(tmp_path):
    run = _workspace(tmp_path)
    run["kd_config"] = str(FIXTURES / "kd_tiny.yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert cli.main(["sft", "--config", str(tmp_path / "run.yaml")]) == 0
    trainer = sft_cli.last_trainer
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    config = KDConfig.from_yaml(str(FIXTURES / "kd_tiny.yaml"))
    assert [t.label for t in trainer.distiller.config.terms] == [t.label for t in config.terms]
    for entry in logs:  # constant scheduler: the configured weights; the transfer is their weighted sum
        for term in config.terms:
            assert entry[f"kd/weight/{term.label}"] == pytest.approx(term.weight), term.label
            assert math.isfinite(entry[f"kd/loss/{term.label}"]) and entry[f"kd/loss/{term.label}"] > 0
        weighted = sum(term.weight * entry[f"kd/loss/{term.label}"] for term in config.terms)
        assert entry["kd/transfer"] == pytest.approx(weighted, rel=1e-4)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "projector" in k]


def test_inline_kd_block_and_command_line_flags(tmp_path):
    run = {"model_name_or_path": "m", "kd": yaml.safe_load((FIXTURES / "kd_tiny.yaml").read_text()),
           "teacher_model_name_or_path": "t", "max_steps": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    argv, settings, temporary = sft_cli.split_kd_arguments(["--config", str(tmp_path / "run.yaml"), "--seed", "3"])
    try:
        assert isinstance(settings["kd_config"], KDConfig) and settings["teacher"] == "t"
        passed = yaml.safe_load(Path(argv[1]).read_text())
        assert passed == {"model_name_or_path": "m", "max_steps": 2} and argv[2:] == ["--seed", "3"]
    finally:
        Path(temporary).unlink()
    argv, settings, _ = sft_cli.split_kd_arguments(
        ["--model_name_or_path", "m", "--kd_config", str(FIXTURES / "kd_tiny.yaml"),
         "--teacher_model_name_or_path=t2"])
    assert argv == ["--model_name_or_path", "m"] and settings["teacher"] == "t2"
    assert [t.name for t in settings["kd_config"].terms] == ["dkd", "contrastive", "attention_relation"]
    with pytest.raises(ConfigError, match="kd_config"):
        sft_cli.split_kd_arguments(["--teacher_model_name_or_path", "t"])
    with pytest.raises(ConfigError, match="teacher_model_name_or_path"):
        sft_cli.split_kd_arguments(["--kd_config", str(FIXTURES / "kd_tiny.yaml")])


def test_missing_delegate_prints_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(cli._DELEGATED, "demo", ("kd_plugins.integrations.no_such_demo", "x"))
    assert cli.main(["demo"]) == 2
    assert "kd_plugins.integrations.no_such_demo is not available" in capsys.readouterr().err
