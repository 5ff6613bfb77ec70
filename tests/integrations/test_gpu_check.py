"""``benchmarks/gpu_check.py``: a clean exit with a clear message where CUDA is missing (this machine), its two parts
run on CPU with tiny shapes (a smoke test of the code a GPU run takes -- no GPU result), and the real check on a
CUDA machine (``gpu`` marker: skipped here)."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from .conftest import tiny_model
from tests._bench import load_benchmark

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    return load_benchmark("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the check runs for real")
def test_without_cuda_it_exits_cleanly_and_says_what_it_would_measure():
    result = SCRIPT.parent / "results" / "gpu_check.json"
    existed = result.exists()
    mtime = result.stat().st_mtime if existed else None
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "CUDA is not available" in out and "nothing was measured" in out
    for words in ("KDSFTTrainer", "bf16", "flash-attention 2", "SDPA", "LigerFusedLinearJSD", "fused_linear_kd",
                  "V=128256"):
        assert words in out, words
    assert result.exists() == existed and (not existed or result.stat().st_mtime == mtime)  # nothing written


def test_both_parts_run_on_cpu_with_tiny_shapes(monkeypatch):
    """The code path of a GPU run, on CPU: the full method (dkd + contrastive + attention relation under gradnorm,
    bf16, KDSFTTrainer) for 3 steps with a tiny 8-block teacher, and the loss timings at a tiny shape."""
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "_teacher", lambda attention: (tiny_model(layers=8, hidden=32), None, "tiny"))
    args = types.SimpleNamespace(steps=3, batch_size=2, block_size=16)
    training = gpu_check.train_full_method(args, device="cpu")
    assert training["steps"] == 3 and training["all_finite"] and training["attention"] == "sdpa"
    assert training["last_log"]["kd/scheduler/updates"] >= 1  # gradnorm's update step ran (every=2)
    assert {"kd/loss/dkd", "kd/loss/contrastive", "kd/loss/attention_relation"} <= set(training["last_log"])
    losses = gpu_check.time_losses(2, device="cpu", shapes={"tiny": (48, 16, 24, 128)})
    cases = losses["shapes"]["tiny"]["cases"]
    assert {"floor", "ours forward_kl", "ours jsd", "ours dkd"} <= set(cases)
    assert all(math.isfinite(row["median_ms"]) and row["x_floor"] > 0 for row in cases.values() if "error" not in row)
    assert not any("error" in cases[c] for c in ("floor", "ours forward_kl", "ours jsd", "ours dkd"))
    text = gpu_check.markdown({"device": "cpu (smoke)", "torch": torch.__version__, "cuda": None,
                               "training": training, "losses": losses})
    assert "ours dkd" in text and "n/a" in text


@pytest.mark.gpu
def test_gpu_check_runs_on_cuda():
    gpu_check = _module()
    assert gpu_check.main(["--steps", "4", "--repeats", "3"]) == 0
    assert (SCRIPT.parent / "results" / "gpu_check.json").exists()
