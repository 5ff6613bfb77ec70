"""Crash and resume: a training process killed with SIGKILL resumes from its last checkpoint, with the KD state
(projectors, stateful scheduler) restored, and finishes exactly like a run that was never interrupted.

The runs are subprocesses of ``_train_script.py`` (KDTrainer, dkd + mse + contrastive projectors, a
``gradnorm`` scheduler when available, AdamW, checkpoints every 2 steps). Also: KD-state files are written
with write-then-rename and a truncated/corrupt one is refused rather than loaded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_plugins import ConfigError, Distiller, KDError, ModelInfo
from kd_plugins.integrations.transformers import KD_STATE_NAME, DistillationCallback

SCRIPT = Path(__file__).with_name("_train_script.py")
REPO = SCRIPT.parents[2]
MAX_STEPS, SAVE_STEPS = 8, 2


def _launch(out: Path, *extra: str, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "KD_PLUGINS_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--max-steps", str(MAX_STEPS),
               "--save-steps", str(SAVE_STEPS), "--sleep", str(sleep), *extra]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"stdout{len(list(out.glob('stdout*')))}.txt", "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _logs(out: Path) -> dict[int, dict]:
    path = out / "log_rank0.jsonl"
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {e["step"]: e for e in entries}  # a resumed run re-logs steps after the checkpoint: keep the last


def _steps_by_launch(out: Path) -> list[list[int]]:
    """The optimizer steps each launch ran, launch by launch (in order of their first step)."""
    runs: dict[int, list[int]] = {}
    for line in (out / "steps_rank0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        runs.setdefault(entry["pid"], []).append(entry["step"])
    return list(runs.values())


def _wait(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, "\n".join(p.read_text()[-3000:] for p in sorted(out.glob("stdout*.txt")))


@pytest.mark.slow
def test_sigkill_mid_run_resumes_with_kd_state_and_matches_uninterrupted(tmp_path):
    straight_dir, crash_dir = tmp_path / "straight", tmp_path / "crash"
    straight = _launch(straight_dir)
    crashing = _launch(crash_dir, sleep=0.4)

    # kill the second run once it has checkpointed step 4 and is training step 5 or later
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and crashing.poll() is None:
        if (crash_dir / "checkpoint-4" / KD_STATE_NAME).is_file() and max(_logs(crash_dir), default=0) >= 5:
            break
        time.sleep(0.05)
    assert crashing.poll() is None, "the run finished before it could be killed"
    crashing.send_signal(signal.SIGKILL)
    assert crashing.wait(timeout=30) == -signal.SIGKILL
    assert not (crash_dir / "final_rank0.safetensors").exists()
    killed_at = max(_logs(crash_dir))
    assert 5 <= killed_at < MAX_STEPS

    resumed = _launch(crash_dir, "--resume")
    _wait(straight, straight_dir)
    _wait(resumed, crash_dir)

    # the resumed run restarted from the last complete checkpoint and logged every later step again
    last_checkpoint = max(int(p.name.split("-")[1]) for p in crash_dir.glob("checkpoint-*")
                          if int(p.name.split("-")[1]) <= killed_at)
    want, got = _logs(straight_dir), _logs(crash_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    # a resume, not a restart (a deterministic restart from step 0 would log the same values): the killed launch
    # ran steps 1..killed_at, the resumed launch only the steps after the checkpoint
    killed_run, resumed_run = _steps_by_launch(crash_dir)
    assert killed_run[:killed_at] == list(range(1, killed_at + 1))
    assert resumed_run == list(range(last_checkpoint + 1, MAX_STEPS + 1)), resumed_run
    assert _steps_by_launch(straight_dir) == [list(range(1, MAX_STEPS + 1))]
    for step in range(last_checkpoint + 1, MAX_STEPS + 1):
        for key in ("loss", "kd/loss/dkd", "kd/loss/mse", "kd/loss/contrastive", "kd/transfer"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)
        scheduler_keys = [k for k in want[step] if k.startswith("kd/weight/") or k.startswith("kd/scheduler/")]
        for key in scheduler_keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)

    # final student weights and the whole KD state (projectors, scheduler buffers) match
    final_want = load_file(straight_dir / "final_rank0.safetensors")
    final_got = load_file(crash_dir / "final_rank0.safetensors")
    assert final_got.keys() == final_want.keys()
    assert any(k.startswith("kd.") and "projector" in k for k in final_want)
    for key, value in final_want.items():
        torch.testing.assert_close(final_got[key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # and the checkpoint written after the resume carries the same KD state as the uninterrupted run's
    for step in range(last_checkpoint + SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS):
        a = load_file(straight_dir / f"checkpoint-{step}" / KD_STATE_NAME)
        b = load_file(crash_dir / f"checkpoint-{step}" / KD_STATE_NAME)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{step} {key}: {m}")


# --- the KD-state file itself -----------------------------------------------------------------------------------

STUDENT = ModelInfo(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=128)
TEACHER = ModelInfo(hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, vocab_size=128)


def _distiller(seed=0):
    torch.manual_seed(seed)
    return Distiller({"terms": [{"name": "mse"}, {"name": "contrastive", "proj_dim": 8}]},
                     student=STUDENT, teacher=TEACHER)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header_only"])
def test_corrupt_kd_state_is_refused_and_nothing_is_loaded(tmp_path, damage):
    path = Path(DistillationCallback(_distiller(0)).save(str(tmp_path)))
    raw = path.read_bytes()
    damaged = {
        "truncated": raw[: len(raw) // 2],  # a kill in the middle of a non-atomic write
        "garbage": b"\x00\x01garbage" * 20,
        "empty": b"",
        "header_only": raw[:8],
    }[damage]
    path.write_bytes(damaged)
    target = _distiller(1)
    before = {k: v.clone() for k, v in target.kd_state_dict().items()}
    with pytest.raises(KDError, match=rf"{re.escape(str(path))} is unreadable \(SafetensorError: .*\); it may have "
                       r"been cut short by a crash: resume from an earlier checkpoint") as info:
        DistillationCallback(target).load(str(tmp_path))
    assert type(info.value) is KDError  # not a subclass raised by some other check (ConfigError, ...)
    assert type(info.value.__cause__).__name__ == "SafetensorError"  # the reader's own error, kept chained
    after = target.kd_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused file must not change the Distiller"


def test_corrupt_kd_state_error_names_the_file(tmp_path):
    path = Path(DistillationCallback(_distiller(0)).save(str(tmp_path)))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(KDError, match=rf"{KD_STATE_NAME} is unreadable .*earlier checkpoint"):
        DistillationCallback(_distiller(1)).load(str(tmp_path))


def test_kd_state_write_is_atomic_when_the_writer_dies(tmp_path, monkeypatch):
    """A writer that dies half-way leaves the previous complete file in place (write-then-rename)."""
    callback = DistillationCallback(_distiller(0))
    path = Path(callback.save(str(tmp_path)))
    good = path.read_bytes()

    import kd_plugins.integrations.transformers as glue

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(glue, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        DistillationCallback(_distiller(5)).save(str(tmp_path))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [KD_STATE_NAME], "temporary file left behind"
    fresh = _distiller(7)
    DistillationCallback(fresh).load(str(tmp_path))
    assert all(torch.equal(fresh.kd_state_dict()[k], v) for k, v in _distiller(0).kd_state_dict().items())


def test_kd_state_of_another_config_is_refused(tmp_path):
    DistillationCallback(_distiller(0)).save(str(tmp_path))
    other = Distiller({"terms": [{"name": "cosine"}]}, student=STUDENT, teacher=TEACHER)
    with pytest.raises(ConfigError, match=r"was saved with another KD configuration.*\n  terms\[contrastive\]: "
                                          r"'contrastive' \(weight 1.0\) -> \(absent\)"):
        DistillationCallback(other).load(str(tmp_path))


def _sft_trainer(out):
    from kd_plugins.integrations.trl import KDSFTTrainer

    from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

    return KDSFTTrainer(model=tiny_model(seed=0), args=sft_args(out, max_steps=2, save_strategy="steps", save_steps=1),
                        train_dataset=tiny_dataset(8), processing_class=tiny_tokenizer(),
                        teacher=tiny_model(seed=1, hidden=48, layers=3), kd_config=kd_config())


def test_kd_state_is_on_disk_before_the_checkpoint_is_marked_complete(tmp_path, monkeypatch):
    """``trainer_state.json`` is what makes a checkpoint resumable; the KD state must already be there (and old
    checkpoints must not have been rotated away) when it is written -- otherwise a kill in between leaves a
    resumable checkpoint without KD state."""
    from transformers import TrainerState

    seen = []
    real = TrainerState.save_to_json

    def recording_save_to_json(self, json_path):
        seen.append((Path(json_path).parent.name, (Path(json_path).parent / KD_STATE_NAME).is_file()))
        return real(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", recording_save_to_json)
    _sft_trainer(tmp_path).train()
    checkpoints = [(name, has_kd) for name, has_kd in seen if name.startswith("checkpoint-")]
    assert [name for name, _ in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert all(has_kd for _, has_kd in checkpoints), checkpoints


def test_resume_from_checkpoint_without_kd_state_is_refused(tmp_path):
    _sft_trainer(tmp_path).train()
    checkpoint = tmp_path / "checkpoint-1"
    (checkpoint / KD_STATE_NAME).unlink()  # what a kill before the KD state was written would leave
    with pytest.raises(FileNotFoundError, match=rf"{KD_STATE_NAME} not found: .*cannot be restored"):
        _sft_trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
