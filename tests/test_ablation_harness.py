"""benchmarks/ablation.py end to end on a tiny random Llama teacher (no GGUF): outputs and resume."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the ablation harness needs trl")
pytest.importorskip("matplotlib", reason="the ablation harness plots")
pytest.importorskip("evaluate", reason="the ablation harness uses the bundled evaluate metrics")

from tests.integrations.conftest import tiny_model, tiny_texts, tiny_tokenizer  # noqa: E402
from tests._bench import load_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    return load_benchmark("ablation")


@functools.lru_cache(maxsize=None)
def _models():
    """A tiny Llama teacher, briefly fitted to the test texts so its top-1 accuracy (retention's denominator) is
    not zero."""
    teacher = tiny_model(layers=4, hidden=32, tie_word_embeddings=True)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([tokenizer(t)["input_ids"][:20] for t in _corpus()[0]])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, loaded machine: more threads only oversubscribe
    try:
        for _ in range(40):
            loss = teacher(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return teacher.eval(), tokenizer, "tiny Llama fitted to the test texts (test)"


def _corpus():
    texts = tiny_texts(60, seed=3, min_len=20, max_len=40)
    return texts[:50], texts[50:], "tiny arithmetic-progression texts (test)"


def _args(ablation, tmp_path, rows):
    return ablation.build_parser().parse_args([
        "--quick", "--rows", *rows, "--seeds", "0", "--steps", "3", "--student-layers", "2",
        "--block-size", "16", "--batch-size", "2", "--eval-blocks", "4", "--calibration-blocks", "2",
        "--gen-prompts", "1", "--gen-tokens", "3", "--k", "8", "--probe-steps", "1",
        "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--threads", "1",
    ])


def test_rows_are_valid_kd_configs():
    from kd_plugins.integrations.trl import load_kd_config

    ablation = _harness()
    rows = ablation.load_rows()
    assert list(rows) == ["untrained", "ce", "fkl", "dkd", "dkd_mse", "dkd_contrastive", "dkd_contrastive_attn",
                          "full_plain", "full"]
    for name, row in rows.items():
        assert row["description"]
        if row["kd"] is not None:
            config = load_kd_config(ablation.resolve_kd_config(row["kd"], [0, 1, 20, 23, 24, 29], 30, steps=50))
            assert config.ce_weight in (0.0, 1.0)
    full = ablation.resolve_kd_config(rows["full"]["kd"], [0, 1, 20, 23, 24, 29], 30, steps=50)
    assert full["scheduler"]["warmup_steps"] == 5 and full["scheduler"]["anchor"] == "dkd"
    assert full["terms"][1]["layers"] == [[0, 0], [1, 19], [2, 22], [3, 23], [4, 28], [5, 29]]
    assert ablation.needs_live_teacher(rows["full"]["kd"]) and not ablation.needs_live_teacher(rows["dkd"]["kd"])


def test_heldout_teacher_reproduces_the_teacher_logits():
    ablation = _harness()
    teacher, tokenizer, _ = _models()
    blocks = torch.randint(0, 128, (5, 12))
    wrapped = ablation.HeldoutTeacher(teacher, blocks, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=blocks[1:4]).logits, teacher(input_ids=blocks[1:4]).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        wrapped(input_ids=torch.zeros(1, 12, dtype=torch.long))


def test_quick_run_writes_outputs_and_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    ablation = _harness()
    summary = ablation.run(_args(ablation, tmp_path, ["dkd_contrastive", "full"]), load_models=_models,
                           load_corpus=_corpus)
    out = tmp_path / "out"
    assert set(summary["rows"]) == {"dkd_contrastive", "full"} and not summary["missing_runs"]
    assert summary["rows"]["dkd_contrastive"]["teacher_source"] == ["cache"]  # hidden states from the cache
    assert summary["rows"]["full"]["teacher_source"] == ["live"]  # attention relation needs q/k/v
    for row in summary["rows"].values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["retention_accuracy"]["mean"] > 0
        assert row["accuracy"]["std"] is None  # one seed: no spread
    assert summary["parameters"]["student"]["non_embedding"] < summary["parameters"]["teacher"]["non_embedding"]
    assert summary["generation_speedup"] > 0

    records = json.loads((out / "ablation_runs.json").read_text())
    assert sorted((r["row"], r["seed"]) for r in records) == [("dkd_contrastive", 0), ("full", 0)]
    assert all(r["complete"] and r["steps"] == 3 for r in records)
    full_record = next(r for r in records if r["row"] == "full")
    assert any(k.startswith("kd/weight/") for h in full_record["log_history"] for k in h)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["kind"].startswith("smoke")
    markdown = (out / "ablation.md").read_text()
    assert "| dkd_contrastive |" in markdown and "| full |" in markdown and "not ablation results" in markdown
    for name in ("ablation_retention.png", "ablation_full_kd_losses.png", "ablation_full_kd_weights.png"):
        assert (out / name).stat().st_size > 1000 and name in saved["plots"]
    capsys.readouterr()

    # rerun with two more rows: the two finished pairs are skipped, only the new rows run
    summary = ablation.run(_args(ablation, tmp_path, ["untrained", "ce", "dkd_contrastive", "full"]),
                           load_models=_models, load_corpus=_corpus)
    printed = capsys.readouterr().out
    assert "skip dkd_contrastive seed 0" in printed and "skip full seed 0" in printed
    assert "run 1/2: untrained seed 0" in printed and "run 2/2: ce seed 0" in printed
    after = json.loads((out / "ablation_runs.json").read_text())
    assert len(after) == 4
    assert [r for r in after if r["row"] not in ("untrained", "ce")] == records  # finished runs untouched
    assert list(summary["rows"]) == ["untrained", "ce", "dkd_contrastive", "full"]
    assert summary["rows"]["untrained"]["teacher_source"] == ["-"] == summary["rows"]["ce"]["teacher_source"]
    assert next(r for r in after if r["row"] == "untrained")["steps"] == 0
    assert next(r for r in after if r["row"] == "ce")["steps"] == 3

    # re-render only (no model): the same rows come back from the JSON files
    (out / "ablation.md").unlink()
    again = ablation.report_only(out, tmp_path / "work")
    assert list(again["rows"]) == list(summary["rows"]) and (out / "ablation.md").is_file()
    assert again["rows"]["full"]["accuracy"] == summary["rows"]["full"]["accuracy"]


def test_max_minutes_cap_starts_no_run_past_it(tmp_path, capsys):
    ablation = _harness()
    args = _args(ablation, tmp_path, ["fkl"])
    args.max_minutes = 1e-6
    summary = ablation.run(args, load_models=_models, load_corpus=_corpus)
    assert summary["rows"] == {} and [tuple(m) for m in summary["missing_runs"]] == [("fkl", 0)]
    assert "not starting fkl seed 0" in capsys.readouterr().out
    assert "Missing" in (tmp_path / "out" / "ablation.md").read_text()


def test_rows_file_and_validation_split(tmp_path, capsys):
    ablation = _harness()
    extra = tmp_path / "rows.yaml"
    extra.write_text("anchored:\n  description: anchored gradnorm\n  kd:\n    ce_weight: 0.0\n    terms:\n"
                     "      - {name: forward_kl}\n      - {name: mse, weight: 0.5, layers: kept}\n"
                     "    scheduler: {name: gradnorm, anchor: forward_kl, every: 1, warmup_steps: auto}\n")
    args = _args(ablation, tmp_path, ["fkl", "anchored"])
    args.rows_file, args.eval_split = extra, "validation"
    summary = ablation.run(args, load_models=_models, load_corpus=_corpus)
    assert list(summary["rows"]) == ["fkl", "anchored"] and summary["setup"]["eval_split"] == "validation"
    assert "validation blocks" in capsys.readouterr().out
    assert "Evaluated on the validation split" in (tmp_path / "out" / "ablation.md").read_text()
    # the validation blocks are training-split blocks that are not trained on, and not the held-out blocks
    heldout = ablation.run(_args(ablation, tmp_path / "h", ["fkl"]), load_models=_models, load_corpus=_corpus)
    assert heldout["setup"]["signature"] != summary["setup"]["signature"]

    clash = tmp_path / "clash.yaml"
    clash.write_text("fkl:\n  kd: {terms: [{name: forward_kl}]}\n")
    with pytest.raises(SystemExit, match=r"row name\(s\) \['fkl'\] already exist"):
        ablation.load_rows(clash)
    bad = ablation.build_parser().parse_args(["--rows", "nope"])
    with pytest.raises(SystemExit, match=r"unknown row\(s\) \['nope'\]"):
        ablation.finalize_args(bad)


def test_candidate_rows_file_is_valid():
    from kd_plugins.integrations.trl import load_kd_config

    ablation = _harness()
    rows = ablation.load_rows(ROOT / "benchmarks" / "ablation_candidates.yaml")
    for name in ("full_anchor", "full_anchor_b1", "full_conflict", "fkl_align_anchor", "fkl_contrastive", "fkl_ce", "full_ce"):
        load_kd_config(ablation.resolve_kd_config(rows[name]["kd"], [0, 1, 20, 23, 24, 29], 30, steps=50))
