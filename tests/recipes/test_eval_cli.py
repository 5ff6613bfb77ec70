"""``kd-plugins eval``: every option documented in --help, and a tiny end-to-end evaluation of a saved student."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import tiny_model, tiny_tokenizer

from kd_plugins.cli import main as cli_main  # noqa: E402
from kd_plugins.recipes import eval_cli  # noqa: E402


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = eval_cli.build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help text"
    for word in ("--student", "--teacher", "--tasks", "--domains", "smollm2", "kd_wiki_cloze", "wikipedia", "CC BY-SA"):
        assert word in text


def _saved_student(tmp_path, vocab=128):
    folder = tmp_path / "student"
    tiny_model(layers=2, seed=0, vocab=vocab).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_tiny_end_to_end_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder = _saved_student(tmp_path)
    teacher = tiny_model(layers=3, seed=1)
    args = eval_cli.build_parser().parse_args([
        "--student", str(folder), "--block-size", "16", "--max-blocks", "3", "--task-limit", "6",
        "--task-batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
        "--no-progress",
    ])
    report = eval_cli.run(args, load_teacher=lambda: (teacher, tiny_tokenizer()))
    assert set(report["domains"]) == {"pydoc_heldout", "wikipedia", "dialog"}
    assert all(d["blocks"] == 3 and d["tokens"] == 3 * 15 for d in report["domains"].values())
    assert {t: v["items"] for t, v in report["tasks"].items()} == {"kd_wiki_cloze": 6, "kd_dialog_reply": 6}
    out = capsys.readouterr().out
    assert "| wikipedia | out-of-domain | top-1 |" in out and "kd_dialog_reply (6 items)" in out
    saved = json.loads((tmp_path / "out" / "retention.json").read_text())
    assert saved["summary"] == pytest.approx(report["summary"], nan_ok=True)
    assert (tmp_path / "out" / "retention.png").stat().st_size > 0
    # a second run reads the teacher's side from the cache and gives the same numbers
    again = eval_cli.run(args, load_teacher=lambda: (teacher, tiny_tokenizer()))
    assert again["domains"]["dialog"]["student"] == report["domains"]["dialog"]["student"]
    assert again["tasks"]["kd_wiki_cloze"]["teacher"] == report["tasks"]["kd_wiki_cloze"]["teacher"]
    assert "teacher_tasks" not in again["seconds"]  # not recomputed


def test_eval_refuses_bad_input_before_evaluating(tmp_path):
    parser = eval_cli.build_parser()
    with pytest.raises(SystemExit, match="no such folder"):
        eval_cli.run(parser.parse_args(["--student", str(tmp_path / "missing")]))
    folder = _saved_student(tmp_path, vocab=96)
    with pytest.raises(SystemExit, match="vocabulary"):
        eval_cli.run(parser.parse_args(["--student", str(folder), "--no-cache"]),
                     load_teacher=lambda: (tiny_model(layers=3, seed=1), tiny_tokenizer()))
    with pytest.raises(SystemExit, match="unknown task"):
        eval_cli.run(parser.parse_args(["--student", str(folder), "--tasks", "hellaswag"]),
                     load_teacher=lambda: (tiny_model(layers=3, seed=1), tiny_tokenizer()))
