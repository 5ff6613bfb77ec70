"""benchmarks/equal_compute.py end to end on a tiny random Llama teacher: equal CPU budgets, LR chosen on the
validation split, the suite on every seed at the chosen LR, resume."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl", reason="the equal-compute ablation needs trl")
pytest.importorskip("matplotlib", reason="the equal-compute ablation plots")

from tests.test_ablation_harness import _corpus as fitted_corpus, _models as fitted_models  # noqa: E402
from tests._bench import load_benchmark  # noqa: E402

BUDGET = 1.5  # CPU-seconds per run


def _harness():
    return load_benchmark("equal_compute")


def _models():
    """The ablation test's tiny teacher, fitted to the test texts (its top-1 accuracy, retention's denominator, is
    not zero)."""
    teacher, tokenizer, _ = fitted_models()
    return teacher, tokenizer


def _corpus():
    train, heldout, _ = fitted_corpus()
    return train, heldout


def _suite_blocks():
    g = torch.Generator().manual_seed(0)
    return {d: torch.randint(4, 128, (4, 16), generator=g).tolist() for d in ("wikipedia", "dialog")}


def _args(harness, tmp_path, rows, seeds=("0", "1")):
    return harness.build_parser().parse_args([
        "--rows", *rows, "--seeds", *seeds, "--lrs", "2e-3", "5e-4", "--budget-cpu-s", str(BUDGET),
        "--student-layers", "2", "--block-size", "16", "--batch-size", "2", "--validation-blocks", "4",
        "--eval-blocks", "4", "--calibration-blocks", "2", "--probe-steps", "4", "--threads", "1",
        "--width-heads", "2", "--width-kv-heads", "1", "--width-intermediate", "16", "--repair-cache-blocks", "8",
        "--repair-steps", "50", "--gen-prompts", "4", "--gen-tokens", "6", "--tasks", "none",
        "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "ref"),
    ])


def _run(harness, args):
    return harness.run(args, load_models=_models, load_corpus=_corpus, suite_blocks=_suite_blocks())


def test_split_validation_and_choose_lr():
    harness = _harness()
    blocks = [[i] for i in range(20)]
    train, validation = harness.split_validation(blocks, 4)
    assert len(validation) == 4 and len(train) == 16
    assert not {b[0] for b in train} & {b[0] for b in validation}
    assert sorted(b[0] for b in train + validation) == list(range(20))
    with pytest.raises(ValueError, match="validation blocks"):
        harness.split_validation(blocks, 20)
    assert harness.choose_lr({1e-3: {"accuracy": 0.2, "agreement": 0.1}, 2e-3: {"accuracy": 0.3}}) == 2e-3
    assert harness.choose_lr({1e-3: {"accuracy": 0.3, "agreement": 0.5}, 2e-3: {"accuracy": 0.3,
                                                                                "agreement": 0.4}}) == 1e-3


def test_rows_are_valid_kd_configs():
    from kd_plugins.integrations.trl import load_kd_config
    from kd_plugins.recipes.training import resolve_kd_config

    rows = _harness().load_rows()
    assert list(rows) == list(_harness().ROW_ORDER)
    for name, row in rows.items():
        if row["kd"] is not None:
            load_kd_config(resolve_kd_config(row["kd"], [0, 29], 30, steps=100))
    assert rows["repair_fkl_ce"]["repair"] and rows["gen_fkl_ce"]["data"] == "generated"
    assert rows["width_fkl_ce"]["student"] == "width"


def test_equal_budgets_lr_on_validation_suite_per_seed_and_resume(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    harness = _harness()
    rows = ["untrained", "ce", "gen_fkl_ce", "repair_fkl_ce", "width_fkl_ce"]
    summary = _run(harness, _args(harness, tmp_path, rows))
    out = tmp_path / "out"
    records = json.loads((out / "equal_compute_runs.json").read_text())
    state = json.loads((out / "equal_compute_state.json").read_text())
    assert set(summary["rows"]) == set(rows)

    for name in rows[1:]:
        mine = [r for r in records if r["row"] == name]
        select = {r["lr"]: r for r in mine if r["seed"] == 0}
        assert set(select) == {2e-3, 5e-4}  # seed 0 at both LRs, each scored on validation
        chosen = harness.choose_lr({lr: r["validation"] for lr, r in select.items()})
        assert [lr for lr, r in select.items() if r.get("suite")] == [chosen]  # the suite only at the chosen LR
        seed1 = [r for r in mine if r["seed"] == 1]
        assert len(seed1) == 1 and seed1[0]["lr"] == chosen and seed1[0]["suite"]
        plan = state["plans"][name]
        for r in mine:
            train = r["train"]
            assert train["planned_steps"] == plan["steps"] >= 1  # one step count per row
            assert train["steps"] == plan["steps"] or train["capped"]
            # the budget holds up to one step past the cap (the cap is checked after each step)
            assert train["cpu_s"] <= BUDGET + 3 * plan["probe_cpu_per_step"] + 0.5
        assert summary["rows"][name]["lr"] == chosen and summary["rows"][name]["seeds"] == [0, 1]
        metrics = summary["rows"][name]["metrics"]["in-domain top-1 ret."]
        assert metrics["n"] == 2 and metrics["std"] is not None
    repair = [r for r in records if r["row"] == "repair_fkl_ce"]
    for r in repair:  # stage 1 inside the run's budget, within its share
        assert r["train"]["stage1"]["blocks"] and r["train"]["stage1"]["cpu_s"] <= 0.3 * BUDGET + 0.5
        assert r["train"]["cpu_s"] >= r["train"]["stage1"]["cpu_s"]
    assert {"generated", "repair_cache"} <= set(state["oneoff"])
    untrained = next(r for r in records if r["row"] == "untrained")
    assert untrained["train"]["steps"] == 0 and untrained["suite"]["summary"]["in_domain_top1"] is not None
    markdown = (out / "equal_compute.md").read_text()
    assert all(f"| {name} |" in markdown for name in rows)
    assert (out / "equal_compute.png").stat().st_size > 1000
    assert not list((tmp_path / "work" / "states").glob("*.pt"))  # selection states removed once chosen
    capsys.readouterr()

    # resume: nothing trains again; one more seed trains only that seed, at each row's chosen LR
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(harness, "_train_row", no_training)
    again = _run(harness, _args(harness, tmp_path, rows))
    assert again["rows"]["ce"]["metrics"] == summary["rows"]["ce"]["metrics"]
    monkeypatch.undo()
    trained = []
    original = harness._train_row
    monkeypatch.setattr(harness, "_train_row", lambda ctx, name, row, kd, lr, seed: (
        trained.append((name, lr, seed)), original(ctx, name, row, kd, lr, seed))[1])
    _run(harness, _args(harness, tmp_path, ["ce"], seeds=("0", "1", "2")))
    assert trained == [("ce", summary["rows"]["ce"]["lr"], 2)]

    (out / "equal_compute.md").unlink()
    rendered = harness.run(harness.build_parser().parse_args(["--report-only", "--out-dir", str(out)]))
    assert (out / "equal_compute.md").is_file() and rendered["rows"]["ce"]["seeds"] == [0, 1, 2]


def test_bad_arguments_stop_before_any_work(tmp_path):
    harness = _harness()
    for flags, message in ((["--budget-cpu-s", "0"], "budget"), (["--lrs", "1e-3", "1e-3"], "lrs"),
                           (["--repair-share", "1"], "repair-share"), (["--probe-steps", "1"], "probe-steps")):
        args = harness.build_parser().parse_args(flags + ["--out-dir", str(tmp_path)])
        with pytest.raises(SystemExit, match=message):
            harness.run(args, load_models=lambda: pytest.fail("models loaded"))


def test_the_suite_score_and_the_ranking_rule():
    harness = _harness()

    def report(in_domain, ood, tasks):
        return {"summary": {"in_domain_top1": in_domain, "out_of_domain_top1": ood, "tasks_acc_above_chance": tasks}}

    assert harness.suite_score(report(0.6, 0.3, 0.3)) == pytest.approx(0.4)
    assert harness.suite_score(report(0.6, 0.3, None)) is None  # no tasks: no score, never a two-part mean
    assert harness.suite_score(report(0.6, float("nan"), 0.3)) is None

    def row(lr, *scores):
        return {"lr": lr, "score": harness._stats(scores)}

    table = {"untrained": row(None, 0.9), "ce": row(2e-3, 0.40, 0.42, 0.41), "fkl_ce": row(2e-3, 0.45, 0.47, 0.46),
             "full": row(5e-4, 0.30, 0.35, 0.40)}
    ranking = harness.rank_rows(table)
    assert ranking["order"] == ["fkl_ce", "ce", "full"]  # untrained rows are not candidates, whatever they score
    assert ranking["best"] == "fkl_ce" and ranking["runner_up"] == "ce"
    assert ranking["gap"] == pytest.approx(0.05) and ranking["spread"] == pytest.approx(0.01)
    assert ranking["separated"] is True
    assert "**fkl_ce** (46.0% ± 1.0%), ahead of ce (41.0% ± 1.0%) by 5.0% -- more than the seeds' spread" in \
        ranking["sentence"]
    close = harness.rank_rows({"a": row(1e-3, 0.50, 0.40), "b": row(1e-3, 0.44, 0.45)})
    assert close["best"] == "a" and close["separated"] is False and "within the seeds' spread" in close["sentence"]
    assert harness.rank_rows({"untrained": row(None, 0.1)}) is None
