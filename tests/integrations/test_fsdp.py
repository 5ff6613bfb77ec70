"""FSDP2 in the core path on CPU: ``torchrun --nproc_per_node 2`` (gloo) running ``_fsdp_script.py``, a plain
PyTorch loop over the core API with student and teacher sharded by ``torch.distributed.fsdp.fully_shard``.

Two ranks of 2 rows equal one process with the same 4 rows per step, over 4 steps: the logged losses (rank means),
every student and Distiller gradient of every step, clipped jointly to ``max_grad_norm`` (``clip_grad_norm_jointly``
against ``torch.nn.utils.clip_grad_norm_`` over both in one process), the pre-clip norms, the scheduler's weights
and the final weights and KD state.

* ``contrastive`` (forward KL + contrastive + CE): the single process runs the ranks' two micro-batches, gradients
  accumulated (the contrastive negatives are one micro-batch's tokens); the student's LM head is its own
  resharding FSDP unit, so the logit term reads it through ``gather_sharded`` (all-gather, gradient
  reduce-scattered back as a mean).
* ``gradnorm`` (forward KL + mse + CE): one process on all 4 rows; the scheduler probes the last block's unsharded
  parameters (``probe_parameters``; that block does not reshard after its forward) with the rank-mean ``reduce``.
* A negative control: the same gradnorm run with the last block resharding after its forward is refused with a
  message on the first step (its gradients would silently be zero).

The KD state is written once, by rank 0 (``save_kd_state``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_plugins import Distiller, ModelInfo
from kd_plugins.integrations.transformers import DistillationCallback

from .test_distributed import _finish, _free_port

SCRIPT = Path(__file__).with_name("_fsdp_script.py")
REPO = SCRIPT.parents[2]
STEPS = 4
MAX_NORM = 0.5  # below every step's gradient norm (about 1.2): clipping is active at every step

pytestmark = pytest.mark.slow


def _launch(out: Path, *, ranks: int, case: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KD_PLUGINS_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if ranks > 1:  # torchrun through this interpreter (see test_distributed)
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                     "--master_port", str(_free_port())]
    args = [str(SCRIPT), "--out", str(out), "--case", case, "--steps", str(STEPS), "--max-grad-norm", str(MAX_NORM),
            *extra]
    log = open(out / "stdout.txt", "w")
    return subprocess.Popen([*launcher, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _result(out: Path, rank: int):
    return (json.loads((out / f"log_rank{rank}.json").read_text()), load_file(out / f"grads_rank{rank}.safetensors"),
            load_file(out / f"final_rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    plan = {"contrastive_fsdp": (2, "contrastive", ()), "contrastive_single": (1, "contrastive", ()),
            "gradnorm_fsdp": (2, "gradnorm", ()), "gradnorm_single": (1, "gradnorm", ()),
            "gradnorm_resharded": (2, "gradnorm", ("--reshard-probe-block",))}
    procs = {name: _launch(root / name, ranks=ranks, case=case, extra=extra)
             for name, (ranks, case, extra) in plan.items()}
    codes = {}
    for name, proc in procs.items():
        if name == "gradnorm_resharded":
            codes[name] = proc.wait(timeout=600)
        else:
            _finish(proc, root / name)
    return root, codes


@pytest.mark.parametrize("case", ["contrastive", "gradnorm"])
def test_fsdp2_equals_one_process(runs, case):
    root, _ = runs
    (logs0, grads0, final0), (logs1, grads1, final1) = _result(root / f"{case}_fsdp", 0), _result(root / f"{case}_fsdp", 1)
    single_logs, single_grads, single_final = _result(root / f"{case}_single", 0)
    assert [e["step"] for e in logs0] == [e["step"] for e in single_logs] == list(range(STEPS))
    for fsdp, other, single in zip(logs0, logs1, single_logs):
        assert fsdp["loss"] == other["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert fsdp["losses"].keys() == single["losses"].keys()
        for label, value in single["losses"].items():
            assert fsdp["losses"][label] == pytest.approx(value, rel=1e-5, abs=1e-7), (fsdp["step"], label)
        assert fsdp["weights"] == other["weights"]
        assert fsdp["weights"] == pytest.approx(single["weights"], rel=1e-6), fsdp["step"]
        # the joint clip (sharded student + replicated Distiller) measures the single process's norm and clips
        assert fsdp["grad_norm"] == other["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
        assert fsdp["grad_norm"] > MAX_NORM
    # every parameter's gradient at every step, the LM head's included (it is the logit term's), and the projectors'
    assert grads0.keys() == single_grads.keys()
    assert any(".lm_head." in k for k in grads0) and any(k.split(".", 1)[1].startswith("kd.") for k in grads0)
    for key, value in single_grads.items():
        torch.testing.assert_close(grads0[key], value, rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
        assert torch.equal(grads0[key], grads1[key]), key
    for key, value in single_final.items():
        torch.testing.assert_close(final0[key], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")
        assert torch.equal(final0[key], final1[key]), key


def test_gradnorm_weights_move_and_its_state_is_the_single_process_state(runs):
    """The check above is not vacuous for the scheduler: gradnorm changed the weights (updates at steps 0 and 2)
    and its state tensors equal the single process's on both ranks."""
    root, _ = runs
    (logs0, _, final0), (_, _, final1) = _result(root / "gradnorm_fsdp", 0), _result(root / "gradnorm_fsdp", 1)
    _, _, single = _result(root / "gradnorm_single", 0)
    assert logs0[0]["weights"] != {"forward_kl": 1.0, "mse": 0.5}
    assert logs0[2]["weights"] != logs0[1]["weights"]
    state = [k for k in single if k.startswith("kd.scheduler.")]
    assert state
    for key in state:
        torch.testing.assert_close(final0[key], single[key], rtol=1e-5, atol=1e-7)
        assert torch.equal(final0[key], final1[key]), key


def test_a_resharded_probe_block_is_refused(runs):
    """Negative control: with the last block resharding after its forward, its parameters are DTensor shards by
    the time gradnorm probes them -- no gradient reaches them -- and the run stops with the fix in the message."""
    root, codes = runs
    assert codes["gradnorm_resharded"] != 0
    log = (root / "gradnorm_resharded" / "stdout.txt").read_text()
    assert "sharded by FSDP2" in log and "reshard_after_forward=False" in log


@pytest.mark.parametrize("case", ["contrastive", "gradnorm"])
def test_kd_state_written_once_and_loadable(runs, case):
    root, _ = runs
    out = root / f"{case}_fsdp"
    assert [json.loads((out / f"saves_rank{r}.json").read_text()) for r in (0, 1)] == [1, 0]
    final = load_file(out / "final_rank0.safetensors")
    sys.path.insert(0, str(SCRIPT.parent))
    from _fsdp_script import CONFIGS
    from _train_script import tiny_llama

    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48, layers=3)
    distiller = Distiller(CONFIGS[case], student=ModelInfo.from_config(student.config),
                          teacher=ModelInfo.from_config(teacher.config))
    assert DistillationCallback(distiller).load(str(out / "ckpt"))  # verified (checksum, config) and applied
    for key, value in distiller.kd_state_dict().items():
        assert torch.equal(value, final[f"kd.{key}"]), key
