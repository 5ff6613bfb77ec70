"""``kd-plugins report``: plots from a synthetic trainer_state.json, and clear errors without a usable log."""

from __future__ import annotations

import json

import pytest

from kd_plugins.report import ReportError, find_trainer_state, kd_series, main, write_report

pytest.importorskip("matplotlib", reason="report plots need matplotlib (eval extra)")


def _history(steps: int = 20) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        history.append({
            "step": step, "epoch": step / steps, "loss": 5.0 / step ** 0.5, "learning_rate": 1e-3,
            "kd/loss/dkd": 2.0 / step, "kd/loss/contrastive": 4.0 - step * 0.1,
            "kd/weight/dkd": min(1.0, step / 10), "kd/weight/contrastive": 0.5,
            "kd/transfer": 1.0,
        })
    history.append({"step": steps, "train_runtime": 12.0, "train_loss": 1.2})  # the Trainer's final summary
    return history


def _write_state(directory, history):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))


def test_writes_readable_pngs(tmp_path):
    run = tmp_path / "run"
    _write_state(run, _history())
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["kd_losses.png", "kd_weighted.png", "kd_weights.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_reads_the_latest_checkpoint_and_defaults_out_to_run_plots(tmp_path):
    run = tmp_path / "run"
    _write_state(run / "checkpoint-5", _history(5))
    _write_state(run / "checkpoint-20", _history(20))
    (run / "checkpoint-30").mkdir()  # no state inside: skipped
    assert find_trainer_state(run) == run / "checkpoint-20" / "trainer_state.json"
    written = write_report(run)
    assert all(p.parent == run / "plots" for p in written)


def test_series_split_by_term():
    losses, weights, host = kd_series(_history(3))
    assert set(losses) == {"dkd", "contrastive"} and set(weights) == {"dkd", "contrastive"}
    assert losses["dkd"] == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert [s for s, _ in host] == [1, 2, 3]


def test_errors_name_what_is_missing(tmp_path, capsys):
    with pytest.raises(ReportError, match="no trainer_state.json"):
        write_report(tmp_path)
    _write_state(tmp_path, [])
    with pytest.raises(ReportError, match="no log_history"):
        write_report(tmp_path)
    _write_state(tmp_path, [{"step": 1, "loss": 2.0}])
    with pytest.raises(ReportError, match="no kd_plugins keys.*loss"):
        write_report(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_dispatches_report(tmp_path):
    from kd_plugins import cli

    run = tmp_path / "run"
    _write_state(run, _history())
    assert cli.main(["report", str(run), "--out", str(tmp_path / "cli_plots")]) == 0
    assert (tmp_path / "cli_plots" / "kd_weights.png").exists()
