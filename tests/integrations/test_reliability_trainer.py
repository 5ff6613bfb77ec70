"""The trainer integration refuses or survives what a user can get wrong: ``enable_distillation`` run
twice (replaced, not stacked), a ``shared_params`` typo, an all-masked micro-batch under ``KDTrainer``, a teacher
object in another dtype (never converted in place), a teacher that shares tensors with the student."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainingArguments
from trl import SFTTrainer

from kd_plugins import ConfigError
from kd_plugins.integrations.transformers import KD_STATE_NAME, DistillationCallback
from kd_plugins.integrations.trl import KDSFTTrainer, KDTrainer, enable_distillation

from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

MSE = {"name": "mse", "weight": 1.0, "layers": "uniform"}
CONTRASTIVE = {"name": "contrastive", "weight": 0.5, "proj_dim": 16, "max_tokens": 64}
DKD = {"name": "dkd", "weight": 1.0}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _callbacks(trainer) -> list:
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, DistillationCallback)]


def _sft(tmp_path, **args):
    return SFTTrainer(model=tiny_model(), args=sft_args(tmp_path, **args), train_dataset=tiny_dataset(8),
                      processing_class=tiny_tokenizer())


# --- enable_distillation twice ------------------------------------------------------------------------------------


def test_enable_distillation_twice_replaces_the_first_setup(tmp_path):
    teacher = tiny_model(seed=3, hidden=48, layers=3)
    reference, reference_teacher = _sft(tmp_path / "ref"), tiny_model(seed=3, hidden=48, layers=3)
    enable_distillation(reference, teacher=reference_teacher, config=kd_config([CONTRASTIVE]))
    once = (_hooks(reference.model), len(reference.callback_handler.callbacks), _hooks(reference_teacher))

    trainer = _sft(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    student_hooks, callbacks = _hooks(trainer.model), len(trainer.callback_handler.callbacks)
    enable_distillation(trainer, teacher=teacher, config=kd_config([MSE, DKD]))
    first_class, first_callback = type(trainer), trainer.kd_callback
    assert _hooks(trainer.model) > student_hooks and _hooks(teacher) > 0
    enable_distillation(trainer, teacher=teacher, config=kd_config([CONTRASTIVE]))  # the re-run notebook cell

    assert type(trainer) is first_class  # not a subclass of a subclass
    assert _callbacks(trainer) == [trainer.kd_callback] and trainer.kd_callback is not first_callback
    assert len(trainer.callback_handler.callbacks) == callbacks + 1 == once[1]
    assert _hooks(trainer.model) == once[0]  # the first setup's student hooks are gone
    assert _hooks(teacher) == once[2]  # and the teacher's
    trainer.train()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "checkpoint-1" / KD_STATE_NAME), "pt") as f:
        keys = set(f.keys())
    assert keys == set(trainer.distiller.kd_state_dict()) and not any(k.startswith("terms.mse") for k in keys)
    assert any(k.startswith("terms.contrastive") for k in keys)


def test_enable_distillation_twice_replaces_the_optimizer_group(tmp_path):
    trainer = _sft(tmp_path, max_steps=1)
    trainer.create_optimizer()
    groups = len(trainer.optimizer.param_groups)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([MSE]))
    first = {id(p) for p in trainer.distiller.parameters()}
    assert len(trainer.optimizer.param_groups) == groups + 1
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3),
                        config=kd_config([CONTRASTIVE], projector_lr=1e-3))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert len(trainer.optimizer.param_groups) == groups + 1  # replaced, not added
    assert not first & in_optimizer
    assert all(id(p) in in_optimizer for p in trainer.distiller.parameters())
    assert trainer.optimizer.param_groups[-1]["lr"] == 1e-3
    trainer.train()


def test_enable_distillation_twice_with_a_self_teacher_removes_its_hooks(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path, max_steps=1), train_dataset=tiny_dataset(8),
                         processing_class=tiny_tokenizer(),
                         peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    bare = _hooks(trainer.model)
    enable_distillation(trainer, teacher="self", config=kd_config([MSE, DKD]))
    once = _hooks(trainer.model)
    enable_distillation(trainer, teacher="self", config=kd_config([MSE, DKD]))
    assert once > bare and _hooks(trainer.model) == once  # student and self-teacher hooks replaced, not stacked
    trainer.train()


def test_a_refused_second_call_leaves_the_first_setup(tmp_path):
    trainer = _sft(tmp_path, max_steps=1)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([MSE]))
    setup = (trainer.distiller, trainer.kd_callback, _hooks(trainer.model))
    with pytest.raises(ConfigError, match="unknown option"):
        enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3),
                            config=kd_config([{"name": "mse", "layrs": "uniform"}]))
    assert (trainer.distiller, trainer.kd_callback, _hooks(trainer.model)) == setup
    assert _callbacks(trainer) == [trainer.kd_callback]
    trainer.train()
    assert "kd/loss/mse" in [e for e in trainer.state.log_history if "loss" in e][-1]


def test_a_refused_first_call_leaves_the_trainer_a_plain_trainer(tmp_path):
    trainer = _sft(tmp_path)
    with pytest.raises(ConfigError):
        enable_distillation(trainer, teacher=tiny_model(seed=3), config=kd_config([{"name": "mse", "layrs": 1}]))
    assert type(trainer) is SFTTrainer and not _callbacks(trainer)


# --- shared_params ------------------------------------------------------------------------------------------------


def test_a_shared_params_typo_names_the_value_and_the_close_names(tmp_path):
    with pytest.raises(ConfigError) as info:
        KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path), train_dataset=tiny_dataset(8),
                     processing_class=tiny_tokenizer(), teacher=tiny_model(seed=1),
                     kd_config=kd_config([DKD], shared_params="layers.1.mlp.down_poj", scheduler={"name": "gradnorm"}))
    message = str(info.value)
    assert message.startswith("shared_params='layers.1.mlp.down_poj' matches no parameter name of the student "
                              "(LlamaForCausalLM, ")
    assert "'layers.1.mlp.down_proj' (e.g. 'model.layers.1.mlp.down_proj.weight')" in message
    assert "use 'last_layer', 'final_norm' or a substring of a parameter name" in message


def test_shared_params_substring_that_matches_is_used(tmp_path):
    trainer = KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path), train_dataset=tiny_dataset(8),
                           processing_class=tiny_tokenizer(), teacher=tiny_model(seed=1),
                           kd_config=kd_config([DKD], shared_params="layers.1.mlp.down_proj"))
    assert [p.shape for p in trainer._kd_shared_params] == [trainer.model.model.layers[1].mlp.down_proj.weight.shape]


# --- an all-masked micro-batch under KDTrainer ---------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    """Four rows whose labels are all -100: one all-masked micro-batch of four."""

    def __init__(self, n=4, seq=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = torch.full_like(self.ids[i], -100)
        return {"input_ids": self.ids[i], "labels": labels, "attention_mask": torch.ones_like(self.ids[i])}


def _kd_trainer(tmp_path, config, **args):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, learning_rate=1e-3)
    kwargs.update(args)
    return KDTrainer(model=tiny_model(), args=TrainingArguments(**kwargs), train_dataset=_Rows(),
                     teacher=tiny_model(seed=1, hidden=48, layers=3), kd_config=config)


@pytest.mark.parametrize("scheduler", ["constant", "gradnorm"])
def test_an_all_masked_micro_batch_logs_the_transfer_not_zero(tmp_path, caplog, scheduler):
    torch.manual_seed(0)
    sched = {"name": scheduler, "every": 1} if scheduler == "gradnorm" else {"name": scheduler}
    trainer = _kd_trainer(tmp_path, kd_config([DKD, MSE], scheduler=sched))
    with caplog.at_level(logging.WARNING, logger="kd_plugins"):
        trainer.train()
    first = [e for e in trainer.state.log_history if "loss" in e][0]
    assert first["kd/all_masked_micro_batches"] == 1.0
    assert first["kd/loss/dkd"] == 0.0 and first["kd/loss/mse"] > 0
    assert first["loss"] == pytest.approx(first["kd/transfer"], rel=1e-4)  # the step's loss: its transfer terms
    assert first["loss"] > 0 and torch.isfinite(torch.tensor(first["grad_norm"]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    messages = [r.getMessage() for r in caplog.records]
    assert any("has no target token (all labels -100); its task loss is 0 (the host's was nan)" in m for m in messages)
    assert not any("shared_params" in m for m in messages), messages


# --- teacher objects ----------------------------------------------------------------------------------------------


def test_a_bf16_teacher_object_is_not_converted_and_trains(tmp_path):
    teacher = tiny_model(seed=1, hidden=48, layers=3).to(torch.bfloat16)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(8),
                           processing_class=tiny_tokenizer(), teacher=teacher,
                           kd_config=kd_config([DKD, MSE, CONTRASTIVE]))
    assert trainer.kd_teacher.model is teacher
    trainer.train()
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(e[k])) for e in logs for k in ("loss", "kd/loss/dkd", "kd/loss/mse"))


def test_a_teacher_sharing_tensors_with_the_student_is_refused(tmp_path):
    student, teacher = tiny_model(), tiny_model(seed=1)
    teacher.model.layers[0] = student.model.layers[0]  # e.g. a student sliced out of the teacher without copying
    with pytest.raises(ConfigError) as info:
        KDSFTTrainer(model=student, args=sft_args(tmp_path), train_dataset=tiny_dataset(8),
                     processing_class=tiny_tokenizer(), teacher=teacher, kd_config=kd_config([DKD]))
    message = str(info.value)
    assert "the teacher shares 9 parameter tensors with the student (e.g. 'model.layers.0." in message
    assert "copy.deepcopy(teacher)" in message
