"""Adaptive schedulers through the real KDSFTTrainer: weights move, stay bounded, are logged, and resume exactly."""

from __future__ import annotations

import math

import pytest

from kd_plugins.integrations.transformers import KD_STATE_NAME
from kd_plugins.integrations.trl import KDSFTTrainer

from .conftest import KD_TERMS, StepRecorder, kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

# dkd + contrastive: gradient norms of the same order, so the weights keep moving instead of pinning at a bound
# (attention_relation's is ~100x smaller and gradnorm drives it straight to max_weight)
TERMS = KD_TERMS[:2]
LABELS = [term["name"] for term in TERMS]
BOUNDS = (0.1, 1.4)
# last_layer: every term reaches it; the final norm would only see the logit term
GRADNORM = dict(terms=TERMS, scheduler={"name": "gradnorm", "every": 2, "min_weight": BOUNDS[0],
                                        "max_weight": BOUNDS[1]}, shared_params="last_layer")


def _trainer(output_dir, config, **args):
    return KDSFTTrainer(
        model=tiny_model("llama", seed=0),
        args=sft_args(output_dir, learning_rate=1e-2, **args),
        train_dataset=tiny_dataset(48),
        processing_class=tiny_tokenizer(),
        teacher=tiny_model("llama", seed=1, hidden=48, layers=3, heads=4, kv_heads=2),
        kd_config=kd_config(**config),
    )


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_gradnorm_weights_move_stay_bounded_and_resume_identically(tmp_path):
    common = dict(max_steps=12, save_strategy="steps", save_steps=6)
    straight = _trainer(tmp_path / "straight", GRADNORM, **common)
    straight.train()
    logs = _train_logs(straight)
    assert len(logs) == 12
    weights = [[entry[f"kd/weight/{label}"] for label in LABELS] for entry in logs]
    assert len({tuple(w) for w in weights}) >= 4, f"gradnorm weights hardly moved: {weights}"
    total = sum(term["weight"] for term in TERMS)
    for row in weights:
        assert all(BOUNDS[0] - 1e-6 <= w <= BOUNDS[1] + 1e-6 for w in row), row
        assert sum(row) == pytest.approx(total, rel=1e-4)
    for label in LABELS:
        assert logs[-1][f"kd/scheduler/grad_norm/{label}"] > 0, label
    assert logs[-1]["kd/scheduler/updates"] == 6

    checkpoint = tmp_path / "straight" / "checkpoint-6"
    assert (checkpoint / KD_STATE_NAME).is_file()
    resumed = _trainer(tmp_path / "resumed", GRADNORM, **common)
    ran = StepRecorder().attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert ran.steps == list(range(7, 13)) and ran.loss_calls == 6  # resumed at step 7, not restarted
    want = {e["step"]: e for e in logs if e["step"] > 6}
    got = {e["step"]: e for e in _train_logs(resumed) if e["step"] > 6}
    assert sorted(got) == list(range(7, 13))
    for step in got:
        for label in LABELS:
            key = f"kd/weight/{label}"
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize(
    "scheduler",
    [{"name": "conflict", "every": 2, "mode": "project"}, {"name": "dwa", "every": 2}, {"name": "uncertainty"}],
    ids=["conflict", "dwa", "uncertainty"],
)
def test_other_adaptive_schedulers_train(tmp_path, scheduler):
    trainer = _trainer(tmp_path, dict(scheduler=scheduler, shared_params="last_layer"), max_steps=6)
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 6
    labels = [term["name"] for term in KD_TERMS]
    weights = [[entry[f"kd/weight/{label}"] for label in labels] for entry in logs]
    assert all(math.isfinite(w) and w >= 0 for row in weights for w in row), weights
    # the weights adapt: some step applies weights other than the first step's
    assert any(row != pytest.approx(weights[0], rel=1e-3) for row in weights[1:]), weights
    metrics = {key: value for key, value in logs[-1].items() if key.startswith("kd/scheduler/")}
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    if scheduler["name"] == "uncertainty":
        assert trainer.distiller.scheduler.log_vars.abs().sum() > 0  # reached the optimizer and moved
