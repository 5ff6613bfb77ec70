"""README's snippets run as written: the Python blocks in order in one namespace, then the `trl sft` YAML
through `kd-plugins sft`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
    trainer = namespace["trainer"]
    assert any("kd/loss/forward_kl" in entry for entry in trainer.state.log_history)
    assert namespace["out"].losses.keys() == {"dkd", "mse"}


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
    logs = sft_cli.last_trainer.state.log_history
    assert any("kd/loss/attention_relation" in entry for entry in logs)
    assert cli.main(["list"]) == 0
