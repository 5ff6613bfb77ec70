"""The distilling trainers' FSDP / DeepSpeed code paths (``integrations/sharding.py`` and the mixin), exercised with
fakes of the accelerator state: the Trainer takes these paths only on GPUs, so here they are unit-tested, not run
(the same mechanics under real FSDP2 on CPU: ``test_fsdp.py``)."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer
from trl import SFTTrainer

from kd_plugins import ConfigError
from kd_plugins.integrations import sharding
from kd_plugins.integrations.transformers import KD_STATE_NAME
from kd_plugins.integrations.trl import enable_distillation

from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

MSE = {"name": "mse", "weight": 1.0, "layers": "uniform"}
FKL = {"name": "forward_kl", "weight": 1.0}


def _accelerator(kind, *, fsdp_version=2, zero_stage=3):
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                            deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(distributed_type=kind, state=state)


def _trainer(tmp_path, **args):
    return SFTTrainer(model=tiny_model(), args=sft_args(tmp_path, **args), train_dataset=tiny_dataset(8),
                      processing_class=tiny_tokenizer())


class Wrapped(nn.Module):
    """What a wrapper returns (like a DeepSpeed engine: the model under ``.module``, no ``config``)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.fixture
def prepared(monkeypatch):
    """Record TRL's prepare_fsdp / prepare_deepspeed calls; each returns the model in a :class:`Wrapped`."""
    import trl.models.utils as trl_utils

    calls = []

    def fake(name):
        def prepare(model, accelerator):
            calls.append((name, model, accelerator))
            return Wrapped(model).eval()
        return prepare

    monkeypatch.setattr(trl_utils, "prepare_fsdp", fake("fsdp"))
    monkeypatch.setattr(trl_utils, "prepare_deepspeed", fake("deepspeed"))
    return calls


@pytest.mark.parametrize("kind, expected", [(DistributedType.FSDP, "fsdp"), (DistributedType.DEEPSPEED, "deepspeed"),
                                            (DistributedType.MULTI_GPU, None), (DistributedType.NO, None)])
def test_a_live_teacher_is_prepared_by_the_accelerator(tmp_path, prepared, kind, expected):
    trainer = _trainer(tmp_path)
    trainer.accelerator = _accelerator(kind, zero_stage=3)
    teacher = tiny_model(seed=3, hidden=48, layers=3)
    enable_distillation(trainer, teacher=teacher, config=kd_config([MSE]))
    if expected is None:  # one process / DDP: replicated, never wrapped
        assert prepared == [] and trainer.kd_teacher.model is teacher
        return
    assert [(name, model) for name, model, _ in prepared] == [(expected, teacher)]
    assert prepared[0][2] is trainer.accelerator
    assert isinstance(trainer.kd_teacher.model, Wrapped) and trainer.kd_teacher.model.module is teacher
    # the captures read through the wrapper: a teacher capture runs and has the hidden states mse needs
    ids = torch.randint(4, 60, (2, 6))
    capture = trainer.kd_teacher.capture({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                         trainer.distiller.requirements())
    assert capture.hidden_states and all(h.shape[:2] == (2, 6) for h in capture.hidden_states.values())


def test_a_teacher_cache_is_not_prepared(tmp_path, prepared):
    """Only live teachers are wrapped; a cache is read on every rank (nothing to shard)."""
    from kd_plugins.integrations.teachers import LiveTeacher

    trainer = _trainer(tmp_path)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([MSE]))
    trainer.accelerator = _accelerator(DistributedType.FSDP)
    prepared.clear()
    source = SimpleNamespace()  # not a LiveTeacher: returned as it is
    assert trainer._kd_prepare_teacher(source) is source
    self_teacher = LiveTeacher(trainer.model, is_self=True)
    assert trainer._kd_prepare_teacher(self_teacher) is self_teacher  # 'self' is the student, wrapped with it
    assert prepared == []


def test_logit_terms_under_zero3_are_refused_before_training(tmp_path, prepared):
    trainer = _trainer(tmp_path)
    trainer.accelerator = _accelerator(DistributedType.DEEPSPEED, zero_stage=3)
    with pytest.raises(ConfigError, match="ZeRO-3 partitions") as error:
        enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([FKL]))
    assert "ZeRO stage 1 or 2" in str(error.value) and "FSDP" in str(error.value)
    # hidden-state terms under ZeRO-3, and logit terms under ZeRO-2, are accepted
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([MSE]))
    trainer.accelerator = _accelerator(DistributedType.DEEPSPEED, zero_stage=2)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([FKL]))


def test_zero_stage_is_read_from_the_plugin_or_its_config():
    assert sharding.zero_stage(_accelerator(DistributedType.DEEPSPEED, zero_stage=2)) == 2
    plugin = SimpleNamespace(zero_stage=None, deepspeed_config={"zero_optimization": {"stage": 3}})
    assert sharding.zero_stage(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                               state=SimpleNamespace(deepspeed_plugin=plugin))) == 3
    assert sharding.zero_stage(_accelerator(DistributedType.FSDP)) is None


def _with_grads(seed):
    torch.manual_seed(seed)
    student, distiller = nn.Linear(6, 5), nn.Linear(3, 4)
    for p in [*student.parameters(), *distiller.parameters()]:
        p.grad = torch.randn_like(p)
    return student, distiller


class FakeFSDP1(nn.Module):
    """FSDP1's ``clip_grad_norm_``: the global norm of the model's (flat, sharded) gradients; kd_plugins calls it
    with ``inf`` only to measure."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def clip_grad_norm_(self, max_norm):
        self.calls.append(max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])


@pytest.mark.parametrize("version", [1, 2])
def test_joint_clip_under_fsdp_equals_one_clip_over_student_and_distiller(version):
    student, distiller = _with_grads(0)
    reference = copy.deepcopy([*student.parameters(), *distiller.parameters()])
    for p, q in zip(reference, [*student.parameters(), *distiller.parameters()]):
        p.grad = q.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    model = FakeFSDP1(student) if version == 1 else student
    norm = sharding.clip_jointly(model, distiller.parameters(), 0.5,
                                 _accelerator(DistributedType.FSDP, fsdp_version=version))
    assert float(norm) == pytest.approx(float(expected), rel=1e-6) and float(norm) > 0.5  # clipping was active
    for p, q in zip(reference, [*student.parameters(), *distiller.parameters()]):
        torch.testing.assert_close(q.grad, p.grad)
    if version == 1:
        assert model.calls == [float("inf")]  # measured, never clipped by FSDP1 alone


def test_the_trainer_clips_jointly_under_fsdp(tmp_path, prepared):
    trainer = _trainer(tmp_path)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3),
                        config=kd_config([MSE]))
    trainer.accelerator = _accelerator(DistributedType.FSDP, fsdp_version=2)
    params = [*trainer.model.parameters(), *(p for p in trainer.distiller.parameters() if p.requires_grad)]
    assert len(params) > len(list(trainer.model.parameters()))  # the projector is trainable
    torch.manual_seed(1)
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    expected = torch.nn.utils.get_total_norm(reference)
    trainer.args.max_grad_norm = 1.0
    norm = trainer._clip_grad_norm(trainer.model)
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    scale = 1.0 / (float(expected) + 1e-6)
    for p, g in zip(params, reference):
        torch.testing.assert_close(p.grad, g * scale)


def test_gradient_probe_parameters_are_resolved_after_the_forward_under_fsdp(tmp_path, prepared):
    """FSDP replaces the student's parameters when it wraps it, so the ones resolved at setup are stale: under FSDP
    they are resolved again on the steps that probe (gradnorm's update steps), and not at all on the others (its
    warm-up)."""
    trainer = _trainer(tmp_path)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3),
                        config=kd_config([MSE, FKL], scheduler={"name": "gradnorm", "every": 2, "warmup_steps": 2}))
    assert trainer._kd_probe_params(0) is trainer._kd_shared_params  # without FSDP: those of the setup
    trainer.accelerator = _accelerator(DistributedType.FSDP)
    block = trainer.model.model.layers[-1]
    for name, param in list(block.mlp.down_proj.named_parameters()):  # what a wrapper does: new parameter objects
        setattr(block.mlp.down_proj, name, nn.Parameter(param.detach().clone()))
    scheduler = trainer.distiller.scheduler
    probing = next(s for s in range(8) if scheduler.needs_gradients(s))
    quiet = next(s for s in range(8) if not scheduler.needs_gradients(s))
    fresh = trainer._kd_probe_params(probing)
    assert any(p is block.mlp.down_proj.weight for p in fresh)
    assert not any(p is block.mlp.down_proj.weight for p in trainer._kd_shared_params)
    assert trainer._kd_probe_params(quiet) is None  # not an update step: nothing resolved


def test_kd_state_restored_on_a_deepspeed_resume(tmp_path, prepared, monkeypatch):
    """Under DeepSpeed the Trainer loads checkpoints with deepspeed_load_checkpoint and never calls
    _load_from_checkpoint: the KD state is restored from _load_optimizer_and_scheduler, once."""
    teacher = tiny_model(seed=3, hidden=48, layers=3)
    config = kd_config([MSE])
    first = _trainer(tmp_path / "first", max_steps=2, save_strategy="steps", save_steps=2)
    enable_distillation(first, teacher=teacher, config=config)
    first.train()
    folder = os.path.join(first.args.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(folder, KD_STATE_NAME))
    saved = first.distiller.kd_state_dict()

    second = _trainer(tmp_path / "second")
    enable_distillation(second, teacher=teacher, config=config)
    assert any(not torch.equal(v, saved[k]) for k, v in second.distiller.kd_state_dict().items())
    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", lambda self, checkpoint: None)
    reads = []
    original = second.kd_callback.read
    monkeypatch.setattr(second.kd_callback, "read", lambda *a, **k: (reads.append(a), original(*a, **k))[1])
    second._load_optimizer_and_scheduler(folder)  # what the DeepSpeed resume path reaches
    for key, value in second.distiller.kd_state_dict().items():
        assert torch.equal(value, saved[key]), key
    second._load_optimizer_and_scheduler(folder)  # already restored from this checkpoint: not read again
    assert len(reads) == 1
    second._load_optimizer_and_scheduler(None)  # no checkpoint: nothing
    assert len(reads) == 1


def test_kd_state_is_written_by_the_saving_process_only(tmp_path, prepared, monkeypatch):
    """A rank other than the saving one (``args.should_save`` and ``is_world_process_zero`` False, as on rank 1)
    writes no KD state: neither the mixin's early save nor the callback's ``on_save``."""
    trainer = _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    enable_distillation(trainer, teacher=tiny_model(seed=3, hidden=48, layers=3), config=kd_config([MSE]))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    monkeypatch.setattr(type(trainer), "is_world_process_zero", lambda self: False)
    writes = []
    monkeypatch.setattr(trainer.kd_callback, "save", lambda folder: writes.append(folder))
    trainer.train()
    assert writes == []
