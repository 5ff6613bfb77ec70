"""Distributed data parallel on CPU: ``torchrun --nproc_per_node 2`` (gloo) running ``_train_script.py``.

The Distiller (projectors, scheduler) is *not* part of the DDP-wrapped student, so DDP alone would leave each
rank's projectors training on its own gradients. The integration averages the Distiller's gradients across
ranks before every optimizer step (``DistillationCallback.on_pre_optimizer_step``); these tests check the
outcome from the outside:

* after N steps, every rank holds bit-identical student weights and projector parameters;
* the run matches a single process with the same global batch (2 ranks x 2 rows == 1 process x 4 rows):
  the logged losses, the rank-mean of each term's loss, the final weights;
* with ``gradnorm``, both ranks apply the same weights at every step and end with the same scheduler state,
  equal to the single process's, also when one rank skips the transfer terms (non-finite teacher).

Rows all have the same length, so per-rank means of the alignment terms average to the global mean (see
``test_grad_accum.py`` for the unequal case), and ``contrastive`` is left out of the comparison with a single
process: its negatives are the tokens of the same rank's micro-batch, so the loss depends on the split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = Path(__file__).with_name("_train_script.py")
REPO = SCRIPT.parents[2]
STEPS = 4

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *, ranks: int, batch: int, scheduler: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KD_PLUGINS_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    args = [str(SCRIPT), "--out", str(out), "--max-steps", str(STEPS), "--batch", str(batch), "--fixed-length",
            "--no-contrastive", "--scheduler", scheduler, *extra]
    if ranks > 1:
        # torchrun through this interpreter: a ``torchrun`` script on PATH (or beside the interpreter, in a copied
        # virtual environment) may start another Python that imports another checkout of kd_plugins
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    else:
        launcher = [sys.executable]
    log = open(out / "stdout.txt", "w")
    return subprocess.Popen([*launcher, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: Path) -> None:
    try:
        rc = proc.wait(timeout=600)  # generous: a loaded 2-core machine runs a wave of 5 processes slowly
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, (out / "stdout.txt").read_text()[-4000:]


def _result(out: Path, rank: int):
    logs = {e["step"]: e for e in map(json.loads, (out / f"log_rank{rank}.jsonl").read_text().splitlines())}
    return logs, load_file(out / f"final_rank{rank}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (rank0, rank1, single or None)}, each (logs, final tensors). Launched two at a time; the ``gradnorm``
    warm-up is compared with the ``linear`` single process (both ramp 0 -> base over 2 steps)."""
    root = tmp_path_factory.mktemp("ddp")
    plan = [[("linear", 2, ()), ("linear_single", 1, ()), ("skip_on_rank1", 2, ("--nan-teacher-rank", "1"))],
            [("unsynced", 2, ("--no-distiller-sync", "--max-grad-norm", "0")), ("gradnorm", 2, ()),
             ("gradnorm_single", 1, ())],
            [("gradnorm_skip_on_rank1", 2, ("--nan-teacher-rank", "1"))]]
    # the fused task loss: the student's backbone runs through the DDP wrapper, the CE comes from the dkd term
    fused = ("--fuse", "--count-matmuls")
    plan[-1] += [("fused", 2, fused), ("fused_single", 1, fused)]
    for wave in plan:
        procs = []
        for name, ranks, extra in wave:
            scheduler = ("gradnorm" if name.startswith("gradnorm") else "constant" if name.startswith("fused")
                         else "linear")
            out = root / name
            procs.append((_run(out, ranks=ranks, batch=4 // ranks, scheduler=scheduler, extra=extra), out))
        for proc, out in procs:
            _finish(proc, out)
    single = _result(root / "linear_single", 0)
    results = {name: (_result(root / name, 0), _result(root / name, 1), single)
               for name in ["linear", "unsynced", "skip_on_rank1"]}
    gradnorm_single = _result(root / "gradnorm_single", 0)
    for name in ["gradnorm", "gradnorm_skip_on_rank1"]:
        results[name] = (_result(root / name, 0), _result(root / name, 1), gradnorm_single)
    results["fused"] = (_result(root / "fused", 0), _result(root / "fused", 1), _result(root / "fused_single", 0))
    results["fused_matmuls"] = [json.loads((root / name / f"matmuls_rank{rank}.json").read_text())
                                for name, rank in (("fused", 0), ("fused", 1), ("fused_single", 0))]
    return results


@pytest.mark.parametrize("scheduler", ["linear", "gradnorm"])
def test_student_and_projectors_identical_on_both_ranks(runs, scheduler):
    (_, rank0), (_, rank1), _ = runs[scheduler]
    assert rank0.keys() == rank1.keys()
    projectors = [k for k in rank0 if k.startswith("kd.") and "projector" in k]
    assert projectors
    for key in [*projectors, *(k for k in rank0 if k.startswith("student."))]:
        assert torch.equal(rank0[key], rank1[key]), key


def test_without_the_integration_sync_ddp_leaves_projectors_diverged(runs):
    """Negative control: the Distiller is outside the DDP-wrapped model, so without the integration's gradient
    averaging each rank's projectors follow their own micro-batches (the student stays in sync via DDP). Run
    without clipping: the joint student+Distiller clip would otherwise also desynchronise the student."""
    (_, rank0), (_, rank1), _ = runs["unsynced"]
    projectors = [k for k in rank0 if k.startswith("kd.") and "projector" in k]
    students = [k for k in rank0 if k.startswith("student.")]
    assert projectors and students
    assert any(not torch.equal(rank0[k], rank1[k]) for k in projectors)
    assert all(torch.equal(rank0[k], rank1[k]) for k in students)


def test_a_rank_that_skips_the_transfer_terms_does_not_deadlock(runs):
    """Rank 1's teacher is NaN (``on_nonfinite_teacher: skip``): rank 1 trains on CE alone, rank 0 on CE + KD; the
    job finishes (the fixture waits at most 600 s) and both ranks still hold identical weights."""
    (logs0, rank0), (logs1, rank1), _ = runs["skip_on_rank1"]
    assert sorted(logs0) == sorted(logs1) == list(range(1, STEPS + 1))
    assert all(logs1[step].get("kd/skipped_steps") == 1.0 for step in logs1)
    assert not any(logs0[step].get("kd/skipped_steps") for step in logs0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_ddp_matches_single_process_with_the_same_global_batch(runs):
    (logs0, final0), (logs1, _), (single_logs, single) = runs["linear"]
    assert sorted(logs0) == sorted(single_logs) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert logs0[step]["loss"] == pytest.approx(single_logs[step]["loss"], rel=1e-4), step
        for term in ("dkd", "mse"):
            key = f"kd/loss/{term}"
            rank_mean = (logs0[step][key] + logs1[step][key]) / 2  # each rank logs its own micro-batch
            assert rank_mean == pytest.approx(single_logs[step][key], rel=1e-3, abs=1e-6), (step, key)
    for key, value in single.items():
        torch.testing.assert_close(final0[key], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")


def test_gradient_aware_scheduler_state_identical_on_both_ranks(runs):
    """The Distiller gets a cross-rank mean as ``reduce``: both ranks' schedulers see the same losses and probe
    gradients, so they apply the same weights at every step and end with the same state -- the state is not
    synchronised after the fact, it is computed identically."""
    (logs0, rank0), (logs1, rank1), _ = runs["gradnorm"]
    scheduler = [k for k in rank0 if k.startswith("kd.scheduler.")]
    assert scheduler
    for key in scheduler:
        assert torch.equal(rank0[key], rank1[key]), key
    assert sorted(logs0) == sorted(logs1) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        weights = [k for k in logs0[step] if k.startswith("kd/weight/")]
        assert weights
        assert {k: logs0[step][k] for k in weights} == {k: logs1[step][k] for k in weights}, step
    assert int(rank0["kd.scheduler.num_updates"]) == 1  # warm-up 2 steps, then an update at step 2 (every=10)


def test_gradient_aware_run_matches_single_process_with_the_same_global_batch(runs):
    """Rank-mean losses and probe gradients equal the single process's on the whole global batch (rows of equal
    length; logit terms already carry the world factor), so weights, losses and state match it after the update
    too, not only during warm-up."""
    (logs0, final0), _, (single_logs, single) = runs["gradnorm"]
    for step in range(1, STEPS + 1):
        assert logs0[step]["loss"] == pytest.approx(single_logs[step]["loss"], rel=1e-4), step
        for key in [k for k in single_logs[step] if k.startswith("kd/weight/")]:
            assert logs0[step][key] == pytest.approx(single_logs[step][key], rel=1e-4), (step, key)
    for key in [k for k in single if k.startswith("kd.scheduler.")]:
        torch.testing.assert_close(final0[key], single[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_gradient_aware_scheduler_with_a_skipping_rank_does_not_deadlock(runs):
    """Rank 1's teacher is NaN at every step: it skips the transfer terms but still joins the scheduler's
    collectives (zero weight in the mean), so the job finishes and both schedulers hold rank 0's state."""
    (logs0, rank0), (logs1, rank1), _ = runs["gradnorm_skip_on_rank1"]
    assert sorted(logs0) == sorted(logs1) == list(range(1, STEPS + 1))
    assert all(logs1[step].get("kd/skipped_steps") == 1.0 for step in logs1)
    assert not any(logs0[step].get("kd/skipped_steps") for step in logs0)
    assert int(rank0["kd.scheduler.num_updates"]) == int(rank1["kd.scheduler.num_updates"]) == 1
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_distiller_gradient_sync_issues_the_same_collectives_on_every_rank(monkeypatch):
    """Collectives must not depend on rank-local state: before d6217e8 only parameters with a gradient were
    all-reduced, and a rank that skipped the transfer terms (``on_nonfinite_teacher: skip``) deadlocked the job."""
    import torch.distributed as dist

    from kd_plugins import Distiller, ModelInfo
    from kd_plugins.integrations.transformers import DistillationCallback

    info = ModelInfo(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=16)
    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(tuple(tensor.shape)))

    def collectives(has_grads: bool):
        calls.clear()
        distiller = Distiller({"terms": [{"name": "mse"}]}, student=info, teacher=info)
        if has_grads:  # this rank ran the transfer terms
            for p in distiller.parameters():
                p.grad = torch.ones_like(p)
        DistillationCallback(distiller).on_pre_optimizer_step(None, None, None)
        return list(calls)

    assert collectives(True) == collectives(False)


def test_fused_task_loss_under_ddp_matches_one_process_with_four_head_matmuls(runs):
    """fuse_task_loss under DDP: the student's backbone runs through the DDP wrapper and the CE comes from the dkd
    term's chunked pass, its gradient combined with dkd's (constant weights). Two ranks equal one process with the
    same global batch, and each micro-batch runs four LM-head-sized matmuls on every rank: the teacher's and the
    student's projections and the two gradients (the host path would add the CE's own three)."""
    (logs0, final0), (logs1, final1), (single_logs, single) = runs["fused"]
    assert sorted(logs0) == sorted(single_logs) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert logs0[step]["loss"] == pytest.approx(single_logs[step]["loss"], rel=1e-4), step
        rank_mean = (logs0[step]["kd/loss/dkd"] + logs1[step]["kd/loss/dkd"]) / 2
        assert rank_mean == pytest.approx(single_logs[step]["kd/loss/dkd"], rel=1e-3, abs=1e-6), step
    for key, value in single.items():
        torch.testing.assert_close(final0[key], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")
        assert torch.equal(final0[key], final1[key]), key
    ddp0, ddp1, one = runs["fused_matmuls"]
    assert ddp0 == ddp1 == one == [4] * STEPS
