"""README's snippets run as written: the Python blocks in order in one namespace, then the `trl sft` YAML
through `kd-plugins sft`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("trl", reason="README snippets use TRL")

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_commands_are_the_ci_commands():
    bash = "\n".join(_blocks("bash"))
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert test_command in bash and test_command in ci
    assert "bash scripts/setup.sh && .venv/bin/kd-plugins demo" in bash


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = _blocks("python")
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    trainer = namespace["trainer"]  # the enable_distillation snippet: forward_kl, constant weight 1
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2  # max_steps=8, logging_steps=4
    for entry in logs:
        assert math.isfinite(entry["kd/loss/forward_kl"]) and entry["kd/loss/forward_kl"] > 0
        assert entry["kd/weight/forward_kl"] == 1.0
        assert entry["kd/transfer"] == pytest.approx(entry["kd/loss/forward_kl"], rel=1e-5)
    out = namespace["out"]  # the bare-Distiller snippet
    assert out.losses.keys() == {"dkd", "mse"} and out.weights == {"dkd": 1.0, "mse": 1.0}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in out.losses.values())
    transfer = out.losses["dkd"] + out.losses["mse"]
    torch.testing.assert_close(out.transfer.detach(), transfer, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.detach(), namespace["ce"].detach() + transfer, rtol=1e-5, atol=1e-7)


def test_sft_yaml_snippet_runs(tmp_path, monkeypatch):
    from kd_plugins import cli
    from kd_plugins.integrations import sft_cli

    from tests.integrations.conftest import tiny_model, tiny_texts, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    yaml_blocks = {block.splitlines()[0].split()[1]: block for block in _blocks("yaml")}
    assert set(yaml_blocks) == {"run.yaml", "kd.yaml"}
    for name, block in yaml_blocks.items():
        (tmp_path / name).write_text(block)
    tiny_model("llama", seed=0).save_pretrained("student")
    tiny_tokenizer().save_pretrained("student")
    tiny_model("llama", seed=1, hidden=48, layers=3).save_pretrained("teacher")
    Path("data").mkdir()
    Path("data/train.json").write_text("\n".join(json.dumps({"text": t}) for t in tiny_texts(16)))
    assert cli.main(["sft", "--config", "run.yaml"]) == 0
    yaml_run = yaml.safe_load(yaml_blocks["run.yaml"])
    logs = [entry for entry in sft_cli.last_trainer.state.log_history if "loss" in entry]
    assert len(logs) == yaml_run["max_steps"] // yaml_run["logging_steps"]
    kd_yaml = yaml.safe_load(yaml_blocks["kd.yaml"])
    for entry in logs:
        for term in kd_yaml["terms"]:
            value = entry[f"kd/loss/{term['name']}"]
            assert math.isfinite(value) and value > 0, (term, value)
    assert cli.main(["list"]) == 0
