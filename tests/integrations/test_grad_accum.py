"""Gradient accumulation: ``GA=4 x batch 2`` against ``GA=1 x batch 8`` on sequences of different lengths, so
the micro-batches hold different numbers of tokens.

Method: one optimizer step of plain SGD (``lr=1``, no clipping, no weight decay) from identical weights; the
change of every parameter (student and Distiller: projectors, scheduler parameters) is then exactly the
accumulated gradient. Samples are taken in order (a sequential sampler), so micro-batch ``k`` is rows
``2k, 2k+1``.

What is equivalent, and what is not:

* Logit terms (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``dkd``) are token sums divided by the
  host's ``num_items_in_batch`` (the target-token count of the whole accumulation step), exactly like the host's
  CE: ``GA=4 x 2 == GA=1 x 8`` for the total loss and for every gradient.
* Token-mean alignment terms (``mse``, ``cosine``, ``attention_relation``) divide their token sums by the
  valid-token count of the whole accumulation step (``BatchContext.num_tokens_in_batch``, counted by the mixin
  from the pre-fetched micro-batches): ``GA=4 x 2 == GA=1 x 8`` even though the micro-batches hold different
  numbers of tokens, and the step equals the token-count-weighted mean of four one-micro-batch steps.
* ``contrastive`` stays a *per-micro-batch mean*, divided by the accumulation steps: the step's gradient is the
  mean over micro-batches of each micro-batch's gradient (tested exactly). It can never match ``GA=1 x 8``: its
  negatives are the other tokens *of the same micro-batch*, so the loss itself depends on how the batch is split.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback

from kd_plugins.integrations.trl import KDSFTTrainer

from .conftest import kd_config, sft_args, tiny_model, tiny_texts, tiny_tokenizer

LOGIT_TERMS = [
    {"name": "forward_kl", "weight": 1.0, "temperature": 2.0},
    {"name": "reverse_kl", "weight": 0.5},
    {"name": "generalized_jsd", "weight": 0.7, "beta": 0.3},
    {"name": "dkd", "weight": 0.4, "alpha": 1.0, "beta": 2.0},
]
ALIGNMENT_TERMS = {
    "mse": {"name": "mse", "weight": 0.7, "layers": "uniform"},
    "cosine": {"name": "cosine", "weight": 0.9, "layers": "uniform"},
    "attention_relation": {"name": "attention_relation", "weight": 0.5, "relation_heads": 2},
    "contrastive": {"name": "contrastive", "weight": 0.5, "proj_dim": 8, "temperature": 0.2, "max_tokens": 4096},
}
TOL = dict(rtol=2e-4, atol=2e-6)


class _InOrder(KDSFTTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _texts():
    # lengths 3..14 words: every micro-batch of 2 has a different token count
    texts = tiny_texts(8, seed=3, min_len=3, max_len=14)
    lengths = [len(t.split()) for t in texts]
    pairs = [lengths[i] + lengths[i + 1] for i in range(0, 8, 2)]
    assert len(set(pairs)) > 1, pairs
    return texts


def _one_sgd_step(tmp_path, texts, *, terms, batch, ga, ce_weight=1.0, scheduler="constant", max_grad_norm=0.0,
                  record_grads=False):
    torch.manual_seed(0)
    student = tiny_model("llama", seed=0)
    teacher = tiny_model("llama", seed=1, hidden=48, layers=3, heads=4, kv_heads=2)
    trainer = _InOrder(
        model=student,
        args=sft_args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                      optim="sgd", learning_rate=1.0, max_grad_norm=max_grad_norm, weight_decay=0.0, logging_steps=1),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        teacher=teacher,
        kd_config=kd_config(terms, ce_weight=ce_weight, scheduler=scheduler),
    )
    torch.manual_seed(1)  # the Distiller's projectors were built above: make them identical across runs
    for p in trainer.distiller.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    before = _params(trainer)
    if record_grads:
        recorder = _RecordGrads(trainer)
        trainer.add_callback(recorder)  # after DistillationCallback: sees the gradients the optimizer uses
    trainer.train()
    after = _params(trainer)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    log["row_tokens"] = [len(ids) for ids in trainer.train_dataset["input_ids"]]  # no padding in the dataset
    if record_grads:
        return {"grads": recorder.grads}, log
    return {k: before[k] - after[k] for k in before}, log


def _params(trainer):
    out = {f"student.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    out.update({f"distiller.{n}": p.detach().clone() for n, p in trainer.distiller.named_parameters()})
    return out


def _assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    moved = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tol or TOL), msg=lambda m: f"{name}: {m}")
        moved += bool(want[name].abs().max() > 0)
    assert moved > len(want) // 2, "too few parameters received a gradient for the comparison to mean anything"


def test_logit_terms_ga4x2_equals_ga1x8(tmp_path):
    texts = _texts()
    full, full_log = _one_sgd_step(tmp_path / "full", texts, terms=LOGIT_TERMS, batch=8, ga=1)
    acc, acc_log = _one_sgd_step(tmp_path / "acc", texts, terms=LOGIT_TERMS, batch=2, ga=4)
    _assert_same(acc, full)
    for key in ["loss", "kd/transfer", *(f"kd/loss/{t['name']}" for t in LOGIT_TERMS)]:
        assert acc_log[key] == pytest.approx(full_log[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("term", ["contrastive"])
def test_alignment_terms_are_per_micro_batch_means_under_ga(tmp_path, term):
    """GA=4 x 2 == the mean of four single-micro-batch steps (pure transfer, ce_weight=0)."""
    texts = _texts()
    terms = [ALIGNMENT_TERMS[term]]
    acc, acc_log = _one_sgd_step(tmp_path / "acc", texts, terms=terms, batch=2, ga=4, ce_weight=0.0)
    parts = [_one_sgd_step(tmp_path / f"part{k}", texts[2 * k: 2 * k + 2], terms=terms, batch=2, ga=1,
                           ce_weight=0.0) for k in range(4)]
    mean = {name: sum(p[0][name] for p in parts) / 4 for name in acc}
    _assert_same(acc, mean)
    logged = sum(p[1][f"kd/loss/{term}"] for p in parts) / 4
    assert acc_log[f"kd/loss/{term}"] == pytest.approx(logged, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("term", ["attention_relation", "cosine", "mse"])
def test_token_mean_alignment_terms_weigh_micro_batches_by_tokens_under_ga(tmp_path, term):
    """GA=4 x 2 == the mean of four single-micro-batch steps weighted by each micro-batch's share of the valid
    tokens (pure transfer, ce_weight=0): every token weighs the same."""
    texts = _texts()
    terms = [ALIGNMENT_TERMS[term]]
    acc, acc_log = _one_sgd_step(tmp_path / "acc", texts, terms=terms, batch=2, ga=4, ce_weight=0.0)
    parts = [_one_sgd_step(tmp_path / f"part{k}", texts[2 * k: 2 * k + 2], terms=terms, batch=2, ga=1,
                           ce_weight=0.0) for k in range(4)]
    tokens = [sum(p[1]["row_tokens"]) for p in parts]
    assert len(set(tokens)) > 1, tokens
    share = [n / sum(tokens) for n in tokens]
    weighted = {name: sum(w * p[0][name] for w, p in zip(share, parts)) for name in acc}
    _assert_same(acc, weighted)
    logged = sum(w * p[1][f"kd/loss/{term}"] for w, p in zip(share, parts))
    assert acc_log[f"kd/loss/{term}"] == pytest.approx(logged, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("term", ["mse", "cosine", "attention_relation"])
def test_alignment_terms_ga4x2_equals_ga1x8_with_unequal_lengths(tmp_path, term):
    """Token-mean alignment terms divide their token sums by the valid-token count of the whole accumulation
    window (``BatchContext.num_tokens_in_batch``), so tokens weigh the same however the batch is split."""
    texts = _texts()
    terms = [ALIGNMENT_TERMS[term]]
    full, _ = _one_sgd_step(tmp_path / "full", texts, terms=terms, batch=8, ga=1, ce_weight=0.0)
    acc, _ = _one_sgd_step(tmp_path / "acc", texts, terms=terms, batch=2, ga=4, ce_weight=0.0)
    _assert_same(acc, full)


def test_learned_scheduler_weights_see_one_step_not_four(tmp_path):
    """The ``uncertainty`` scheduler's regulariser ``sum_i base_i * s_i`` must be counted once per optimizer step,
    whatever the accumulation; its log-variances must move as in the GA=1 x 8 run."""
    texts = _texts()
    terms = LOGIT_TERMS[:2]
    scheduler = {"name": "uncertainty"}
    full, _ = _one_sgd_step(tmp_path / "full", texts, terms=terms, batch=8, ga=1, scheduler=scheduler)
    acc, _ = _one_sgd_step(tmp_path / "acc", texts, terms=terms, batch=2, ga=4, scheduler=scheduler)
    _assert_same(acc, full)


def test_distiller_gradients_are_clipped_with_the_students(tmp_path):
    """``max_grad_norm`` clips the joint gradient of the student and the Distiller (projectors): the gradients the
    optimizer steps with have a combined norm of at most ``max_grad_norm``, every parameter (projectors included)
    is scaled by the same factor, and the logged ``grad_norm`` is the joint pre-clip norm."""
    texts = _texts()
    terms = [ALIGNMENT_TERMS["mse"], LOGIT_TERMS[0]]
    raw, _ = _one_sgd_step(tmp_path / "raw", texts, terms=terms, batch=4, ga=2, record_grads=True)
    max_norm = 1e-3
    clipped, log = _one_sgd_step(tmp_path / "clip", texts, terms=terms, batch=4, ga=2, max_grad_norm=max_norm,
                                 record_grads=True)
    raw, clipped = raw["grads"], clipped["grads"]
    norm = _norm(raw.values())
    assert _norm(v for k, v in raw.items() if k.startswith("distiller.")) > 10 * max_norm, (
        "the projectors alone must exceed the bound for the test to mean anything")
    assert log["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert float(_norm(clipped.values())) <= max_norm * (1 + 1e-5)
    assert float(_norm(clipped.values())) == pytest.approx(max_norm, rel=1e-4)
    scale = max_norm / float(norm)
    for name in raw:
        torch.testing.assert_close(clipped[name], raw[name] * scale, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _norm(tensors):
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))


class _RecordGrads(TrainerCallback):
    """The gradients the optimizer is about to step with (after clipping), by parameter name."""

    def __init__(self, trainer):
        self.trainer, self.grads = trainer, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        named = [(f"student.{n}", p) for n, p in self.trainer.model.named_parameters()]
        named += [(f"distiller.{n}", p) for n, p in self.trainer.distiller.named_parameters()]
        self.grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
