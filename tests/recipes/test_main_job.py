"""The main-job demo end to end on a tiny random teacher (the GGUF teacher is never loaded in tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .conftest import tiny_model, tiny_tokenizer


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_teacher(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from kd_plugins.recipes import main_job as demo, smollm2 as models

    teacher = tiny_model(layers=4, hidden=32, tie_word_embeddings=True).eval()
    monkeypatch.setattr(models, "load_smollm2", lambda dtype=torch.float32: (teacher, tiny_tokenizer()))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tmp_path / "student"
    results = demo.run(demo.build_parser().parse_args([
        "--steps", "2", "--student-layers", "2", "--strategy", "block_influence", "--block-size", "16",
        "--batch-size", "2", "--eval-blocks", "4", "--calibration-blocks", "2", "--gen-prompts", "1",
        "--gen-tokens", "3", "--gen-repeats", "3", "--output-dir", str(out), "--max-minutes", "0",
        "--task-limit", "8", "--cache-dir", str(tmp_path / "cache"),
    ]))
    assert results["steps"] == 2 and results["kept_layers"][0] == 0 and results["kept_layers"][-1] == 3
    student = results["student"]
    for key in ("nll", "perplexity", "accuracy", "agreement", "kl_teacher_student"):
        assert math.isfinite(student[key]), (key, student[key])
    assert student["nll"] > 0 and student["perplexity"] == pytest.approx(math.exp(student["nll"]), rel=1e-3)
    assert 0 <= student["accuracy"] <= 1 and 0 <= student["agreement"] <= 1 and student["kl_teacher_student"] >= 0
    assert math.isfinite(results["retention"]["accuracy"])
    suite = results["retention_suite"]
    assert set(suite["domains"]) == {"pydoc_heldout", "wikipedia", "dialog"}
    assert set(suite["tasks"]) == {"kd_wiki_cloze", "kd_dialog_reply"}
    for task in suite["tasks"].values():
        assert task["items"] == 8 and 0.0 <= task["student"]["acc"] <= 1.0 and 0.0 <= task["teacher"]["acc"] <= 1.0
    # the suite's in-domain numbers are the main job's held-out numbers
    assert suite["domains"]["pydoc_heldout"]["student"]["accuracy"] == results["student"]["accuracy"]
    assert results["headline"]["in_domain_top1"] == pytest.approx(results["retention"]["accuracy"], nan_ok=True)
    speed = results["generation_speedup"]
    assert speed["repeats"] == 3 and len(speed["values"]) == 3 and speed["min"] <= speed["median"] <= speed["max"]
    assert results["teacher"]["generation"]["new_tokens"] == 3 * 3  # 1 prompt x 3 tokens x 3 repeats
    assert (out / "retention.json").is_file() and (out / "retention.png").stat().st_size > 0
    assert any((tmp_path / "cache").rglob("domain-wikipedia-*.pt"))  # the teacher's side was cached
    saved = json.loads((out / "results.json").read_text())
    assert saved["kept_layers"] == results["kept_layers"]
    assert "| teacher" in (out / "results.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    assert not any("distiller" in k or "projector" in k for k in reloaded.state_dict())
    for k, v in teacher.state_dict().items():  # the teacher is never trained
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_embedded_kd_config_is_valid_and_kept_layers_resolve(tmp_path):
    from kd_plugins.recipes.main_job import DEFAULT_KD_CONFIG, load_main_job_kd_config

    config = load_main_job_kd_config(None, [0, 3, 5], 6)
    assert config.terms
    path = tmp_path / "kd.yaml"
    path.write_text("ce_weight: 0.0\nterms:\n  - {name: cosine, weight: 0.1, layers: kept, projector: identity}\n")
    config = load_main_job_kd_config(str(path), [0, 3, 5], 6)
    assert config.terms[0].options["layers"] == [[0, 2], [1, 4], [2, 5]]
    assert DEFAULT_KD_CONFIG.startswith("ce_weight")
