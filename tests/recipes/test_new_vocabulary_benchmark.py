"""benchmarks/new_vocabulary.py end to end on a tiny teacher with an in-test byte-level BPE: both students per seed,
bits/char per domain with the teacher's retention ratio, mean ± sd over seeds, resume without retraining."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl", reason="the benchmark trains through KDSFTTrainer")

from tests.integrations._two_tokenizers import byte_bpe  # noqa: E402
from tests.integrations.conftest import tiny_model  # noqa: E402
from tests._bench import load_benchmark  # noqa: E402

TRAIN = ["the cat sat on the mat and the dog sat on the log " * 4, "a cat and a dog are friends of the log " * 4,
         "unbelievably long words are split into pieces " * 4]
HELDOUT = ["the dog sat on the mat", "a cat sat on the log"]
OTHER = {"wikipedia": ["naïve café — déjà vu, the cat"], "dialog": ["hello? the dog is fun\nyes it is"]}


def _bench():
    return load_benchmark("new_vocabulary")


def _models():
    tokenizer = byte_bpe(300, corpus=TRAIN + HELDOUT)
    return tiny_model(vocab=len(tokenizer), layers=4), tokenizer


def _run(bench, tmp_path, seeds=("0", "1")):
    args = bench.build_parser().parse_args([
        "--steps", "2", "--seeds", *seeds, "--vocab-size", "280", "--student-layers", "2", "--batch-size", "2",
        "--block-size", "8", "--eval-chars", "200", "--threads", "1", "--out", str(tmp_path / "out")])
    return bench.run(args, load_models=_models, load_corpus=lambda: (TRAIN, HELDOUT),
                     load_domain=lambda name: OTHER[name])


def test_both_students_per_seed_scored_per_domain_and_resumed(tmp_path):
    bench = _bench()
    results = _run(bench, tmp_path)
    assert set(results["static"]) == {"teacher", "same vocabulary, before KD", "new vocabulary, before KD"}
    runs = results["runs"]
    assert sorted((r["student"], r["seed"]) for r in runs) == [
        ("new vocabulary", 0), ("new vocabulary", 1), ("same vocabulary", 0), ("same vocabulary", 1)]
    for r in runs:
        assert r["steps"] == 2 and r["train_chars"] > 0
        assert set(r["bits_per_char"]) == {"pydoc_heldout", "wikipedia", "dialog"}
        assert all(math.isfinite(v) and v > 0 for v in r["bits_per_char"].values())
    new = next(r for r in runs if r["student"] == "new vocabulary")
    same = next(r for r in runs if r["student"] == "same vocabulary")
    assert new["vocab"] < same["vocab"] and new["total_reduction"] > same["total_reduction"]
    assert new["non_embedding_reduction"] == same["non_embedding_reduction"]  # the same kept blocks

    # the summary is the mean and sample sd over seeds of teacher bits/char / student bits/char
    teacher = results["static"]["teacher"]["bits_per_char"]["wikipedia"]
    ratios = [teacher / r["bits_per_char"]["wikipedia"] for r in runs if r["student"] == "new vocabulary"]
    cell = results["summary"]["new vocabulary"]["retention/wikipedia"]
    assert cell["mean"] == pytest.approx(sum(ratios) / 2)
    assert cell["sd"] == pytest.approx(abs(ratios[0] - ratios[1]) / math.sqrt(2))
    table = (tmp_path / "out" / "results.md").read_text()
    assert "new vocabulary, distilled (seeds 0, 1)" in table and "wikipedia bits/char (ret.)" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"] == results["summary"]

    # a rerun with one more seed trains only that seed's two runs; finished ones are kept as they were
    before = {(r["student"], r["seed"]): r["finished_at"] for r in runs}
    again = _run(bench, tmp_path, seeds=("0", "1", "2"))
    assert len(again["runs"]) == 6
    assert {(r["student"], r["seed"]): r["finished_at"] for r in again["runs"] if r["seed"] < 2} == before


def test_other_settings_start_a_new_record(tmp_path):
    bench = _bench()
    _run(bench, tmp_path, seeds=("0",))
    args = bench.build_parser().parse_args([
        "--steps", "1", "--seeds", "0", "--vocab-size", "280", "--student-layers", "2", "--batch-size", "2",
        "--block-size", "8", "--eval-chars", "200", "--threads", "1", "--out", str(tmp_path / "out")])
    results = bench.run(args, load_models=_models, load_corpus=lambda: (TRAIN, HELDOUT),
                        load_domain=lambda name: OTHER[name])
    assert [r["steps"] for r in results["runs"]] == [1, 1]


def test_no_seed_is_refused_before_anything_loads(tmp_path):
    bench = _bench()
    args = bench.build_parser().parse_args(["--steps", "0", "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="need at least one seed and one step"):
        bench.run(args, load_models=lambda: pytest.fail("loaded models"))
    assert not (tmp_path / "out").exists()
