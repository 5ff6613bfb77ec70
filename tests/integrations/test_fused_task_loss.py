"""``KDConfig.fuse_task_loss``: the student's LM head runs once per training step, with the same loss and
gradients as the host's own ``compute_loss``.

Method: one optimizer step of plain SGD (``lr=1``, no clipping, no weight decay) from identical weights, once with
``fuse_task_loss: true`` (the default) and once with ``false`` (the host's compute_loss); the change of every
parameter (student and Distiller) is the accumulated gradient, and must agree to fp32 tolerance. The mode each
micro-batch ran in is recorded, so a test cannot pass by silently falling back to the host path.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler

from kd_plugins.errors import ConfigError
from kd_plugins.integrations.trl import KDSFTTrainer, KDTrainer

from .conftest import kd_config, sft_args, tiny_model, tiny_texts, tiny_tokenizer

TOL = dict(rtol=2e-4, atol=2e-6)
DKD_MSE = [{"name": "dkd", "weight": 0.4, "alpha": 1.0, "beta": 2.0}, {"name": "mse", "weight": 0.7, "layers": "uniform"}]


class _Recording:
    """Records the student mode of every training micro-batch; samples in order."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def _kd_run_student(self, plan, *args, **kwargs):
        self.kd_modes = [*getattr(self, "kd_modes", []), plan.student_mode.value]
        return super()._kd_run_student(plan, *args, **kwargs)


class _SFT(_Recording, KDSFTTrainer):
    pass


class _Plain(_Recording, KDTrainer):
    pass


def _texts():
    return tiny_texts(8, seed=3, min_len=3, max_len=14)


def _one_sgd_step(tmp_path, *, fuse, terms, ce_weight=1.0, scheduler="constant", batch=2, ga=4, teacher=None,
                  trainer_cls=_SFT, dataset=None, max_steps=1):
    torch.manual_seed(0)
    student = tiny_model("llama", seed=0)
    if teacher is None:
        teacher = tiny_model("llama", seed=1, hidden=48, layers=3, heads=4, kv_heads=2)
    args = sft_args(tmp_path, max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                    optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1)
    extra = {}
    if trainer_cls is _Plain:
        from transformers import TrainingArguments

        args = TrainingArguments(**{k: getattr(args, k) for k in (
            "output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "optim",
            "learning_rate", "max_grad_norm", "weight_decay", "logging_steps", "save_strategy", "report_to",
            "use_cpu", "seed", "lr_scheduler_type", "disable_tqdm")}, remove_unused_columns=False)
    trainer = trainer_cls(
        model=student, args=args,
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"text": _texts()}),
        processing_class=tiny_tokenizer(), teacher=teacher,
        kd_config=kd_config(terms, ce_weight=ce_weight, scheduler=scheduler, fuse_task_loss=fuse), **extra,
    )
    torch.manual_seed(1)  # identical projectors in both runs
    for p in trainer.distiller.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    before = _params(trainer)
    trainer.train()
    after = _params(trainer)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: before[k] - after[k] for k in before}, log, trainer.kd_modes


def _params(trainer):
    out = {f"student.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    out.update({f"distiller.{n}": p.detach().clone() for n, p in trainer.distiller.named_parameters()})
    return out


def _assert_same(got, want):
    assert got.keys() == want.keys()
    moved = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")
        moved += bool(want[name].abs().max() > 0)
    assert moved > len(want) // 2, "too few parameters received a gradient for the comparison to mean anything"


def _compare(tmp_path, expected_mode, keys=("loss", "kd/transfer"), **kwargs):
    fused, fused_log, modes = _one_sgd_step(tmp_path / "fused", fuse=True, **kwargs)
    host, host_log, host_modes = _one_sgd_step(tmp_path / "host", fuse=False, **kwargs)
    assert set(host_modes) == {"host"}
    assert set(modes) == {expected_mode}, modes
    _assert_same(fused, host)
    for key in keys:
        assert fused_log[key] == pytest.approx(host_log[key], rel=1e-4, abs=1e-6), key
    return fused_log, host_log


@pytest.mark.parametrize("loss", ["forward_kl", "dkd", "generalized_jsd"])
def test_fused_ce_equals_host_ce_under_grad_accumulation(tmp_path, loss):
    """ce_weight > 0: the CE from the logit term's pass, GA=4 x 2 with micro-batches of different token counts
    (num_items_in_batch normalisation), temperature != 1 for the KD term (the CE stays at temperature 1)."""
    terms = [{"name": loss, "weight": 0.6, "temperature": 2.0}, {"name": "mse", "weight": 0.7, "layers": "uniform"}]
    _compare(tmp_path, "fused_ce", terms=terms, ce_weight=0.8, keys=("loss", "kd/transfer", f"kd/loss/{loss}"))


@pytest.fixture
def grad_ratios(monkeypatch):
    """The ``task_grad_ratio`` of every fused logit-term call, in order."""
    import kd_plugins.components.logit as logit_module

    seen = []
    real = logit_module.fused_linear_kd

    def recording(*args, **kwargs):
        if kwargs.get("return_task_loss"):
            seen.append(kwargs.get("task_grad_ratio"))
        return real(*args, **kwargs)

    monkeypatch.setattr(logit_module, "fused_linear_kd", recording)
    return seen


def test_constant_weights_combine_the_ce_gradient_before_the_lm_head(tmp_path, grad_ratios):
    """With weights known before the forward (constant scheduler) the CE gradient is added to the KD gradient
    with ratio ce_weight / weight and projected once; the step still equals the host's."""
    _compare(tmp_path, "fused_ce", terms=DKD_MSE, ce_weight=0.8, ga=2, batch=4)
    assert grad_ratios == [pytest.approx(0.8 / 0.4)] * 2


def test_gradnorm_combines_only_between_its_update_steps(tmp_path, grad_ratios):
    """gradnorm (every=2) probes the terms separately on its update steps (0 and 2): no combination there; on
    steps 1 and 3 its stored weights are known in advance and the gradients are combined. Four optimizer steps
    equal the host path's, weights included."""
    scheduler = {"name": "gradnorm", "every": 2}
    fused_log, _ = _compare(tmp_path, "fused_ce", terms=DKD_MSE, scheduler=scheduler, ga=1, batch=4, max_steps=4,
                            keys=("loss", "kd/transfer", "kd/weight/dkd", "kd/weight/mse"))
    assert [r is None for r in grad_ratios] == [True, False, True, False]
    # step 1 reuses the weights set on step 0 (the first log entry); ce_weight is 1
    assert fused_log["kd/weight/dkd"] != pytest.approx(0.4)  # gradnorm moved it, so the ratio is not the base one
    assert grad_ratios[1] == pytest.approx(1.0 / fused_log["kd/weight/dkd"], rel=1e-4)


def test_fused_ce_with_conflict_probe(tmp_path):
    """``conflict`` probes each term and the task loss separately on its update step: the fused CE keeps its own
    gradient, so the probe (and the weights it sets) are those of the host path."""
    scheduler = {"name": "conflict", "every": 1}
    _compare(tmp_path, "fused_ce", terms=DKD_MSE, scheduler=scheduler, ga=2, batch=4,
             keys=("loss", "kd/transfer", "kd/weight/dkd", "kd/weight/mse"))


def test_ce_weight_zero_runs_the_backbone_only(tmp_path):
    """ce_weight 0 with gradnorm: no task loss at all (no LM head, no CE), same step as the host path."""
    scheduler = {"name": "gradnorm", "every": 1}
    _compare(tmp_path, "backbone", terms=DKD_MSE, ce_weight=0.0, scheduler=scheduler, ga=2, batch=4,
             keys=("loss", "kd/transfer", "kd/weight/dkd", "kd/weight/mse"))


def test_conflict_with_ce_weight_zero_keeps_the_host_loss(tmp_path):
    """``conflict`` reads the task loss's gradient even at ce_weight 0; without a carrier the host runs."""
    scheduler = {"name": "conflict", "every": 1}
    _, _, modes = _one_sgd_step(tmp_path, fuse=True, terms=[DKD_MSE[1]], ce_weight=0.0, scheduler=scheduler,
                                batch=4, ga=1)
    assert set(modes) == {"host"}


def test_fused_ce_with_offline_teacher_cache(tmp_path):
    """The sparse (top-k) path carries the CE too."""
    from kd_plugins.integrations.teacher_cache import cache_teacher

    teacher = tiny_model("llama", seed=1, hidden=48, layers=3, heads=4, kv_heads=2)
    probe = _SFT(model=tiny_model("llama", seed=0), args=sft_args(tmp_path / "probe", max_steps=1),
                 train_dataset=Dataset.from_dict({"text": _texts()}), processing_class=tiny_tokenizer(),
                 teacher=teacher, kd_config=kd_config(DKD_MSE[:1]))
    rows = list(probe.train_dataset["input_ids"])
    cache = cache_teacher(teacher, tiny_tokenizer(), rows, tmp_path / "cache", k=8, progress=False)
    _compare(tmp_path, "fused_ce", terms=DKD_MSE[:1], teacher=cache)


def test_plain_trainer_all_masked_micro_batch(tmp_path):
    """transformers.Trainer host (the model's own CE), GA=2 x 2 where the second micro-batch has no target at all:
    it contributes exactly nothing to either path."""
    rows = [[(5 * i + j) % 60 + 2 for j in range(10)] for i in range(4)]
    labels = [list(r) for r in rows]
    labels[2] = [-100] * 10
    labels[3] = [-100] * 10
    labels[0][:4] = [-100] * 4
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 10] * 4, "labels": labels})
    _compare(tmp_path, "fused_ce", terms=DKD_MSE, trainer_cls=_Plain, dataset=dataset, batch=2, ga=2)


def test_opt_out_keeps_trl_metrics_and_validation(tmp_path):
    """fuse_task_loss false runs TRL's own compute_loss (its entropy / mean_token_accuracy are logged); the fused
    steps still log num_tokens; a non-boolean value is refused naming the field."""
    _, fused_log, _ = _one_sgd_step(tmp_path / "a", fuse=True, terms=DKD_MSE, ga=1, batch=4)
    _, host_log, _ = _one_sgd_step(tmp_path / "b", fuse=False, terms=DKD_MSE, ga=1, batch=4)
    assert "mean_token_accuracy" in host_log and "entropy" in host_log
    assert "mean_token_accuracy" not in fused_log
    assert fused_log["num_tokens"] == host_log["num_tokens"]
    from kd_plugins import KDConfig

    with pytest.raises(ConfigError, match="fuse_task_loss"):
        KDConfig(terms=DKD_MSE, fuse_task_loss="yes")
