"""End-to-end: distillation through the real TRL SFTTrainer / transformers Trainer on tiny random models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTTrainer

from kd_plugins import BatchContext, Distiller, IncompatibleModelsError, ModelInfo
from kd_plugins.capture import FeatureCapture, run_backbone
from kd_plugins.integrations.transformers import KD_STATE_NAME
from kd_plugins.integrations.trl import (
    KDDistillationTrainer,
    KDSFTTrainer,
    KDTrainer,
    NonFiniteTeacherError,
    enable_distillation,
)

from .conftest import (
    KD_TERMS,
    StepRecorder,
    kd_config,
    sft_args,
    tiny_dataset,
    tiny_model,
    tiny_texts,
    tiny_tokenizer,
)


def _kd_trainer(tmp_path, *, arch="llama", teacher=None, config=None, dataset=None, **args):
    student = tiny_model(arch, seed=0)
    if teacher is None:
        teacher = tiny_model(arch, seed=1, hidden=48, layers=3, heads=4, kv_heads=2)
    return KDSFTTrainer(
        model=student,
        args=sft_args(tmp_path, **args),
        train_dataset=dataset if dataset is not None else tiny_dataset(32),
        processing_class=tiny_tokenizer(),
        teacher=teacher,
        kd_config=config if config is not None else kd_config(),
    )


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_end_to_end(tmp_path, arch):
    trainer = _kd_trainer(tmp_path, arch=arch, max_steps=20, learning_rate=1e-2)
    projectors = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items() if "projector" in k}
    assert projectors, "contrastive should own projectors"
    trainer.train()

    logs = _train_logs(trainer)
    assert len(logs) == 20
    for key in ("kd/loss/dkd", "kd/loss/contrastive", "kd/loss/attention_relation", "kd/weight/dkd",
                "kd/weight/contrastive", "kd/weight/attention_relation", "kd/transfer", "num_tokens"):
        assert key in logs[-1], key
    first, last = [sum(e["loss"] for e in chunk) / 4 for chunk in (logs[:4], logs[-4:])]
    assert last < first, (first, last)
    after = trainer.distiller.state_dict()
    assert any(not torch.equal(projectors[k], after[k].cpu()) for k in projectors), "projectors did not train"

    export = tmp_path / "export"
    trainer.save_model(str(export))
    reloaded = AutoModelForCausalLM.from_pretrained(str(export))
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "projector" in k or "distiller" in k or "kd" in k.split(".")[0]]
    assert set(keys) == set(tiny_model(arch).state_dict())
    x = torch.randint(4, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, trainer.model.cpu()(x).logits)


def _sgd_first_step(tmp_path, batch, ga):
    torch.manual_seed(0)
    fixed = tiny_texts(8, min_len=10, max_len=10)  # equal lengths: every micro-batch has the same token count
    from datasets import Dataset

    terms = [KD_TERMS[0], {"name": "mse", "weight": 0.7, "layers": "uniform"}, KD_TERMS[2]]
    trainer = _kd_trainer(
        tmp_path, config=kd_config(terms), dataset=Dataset.from_dict({"text": fixed}), max_steps=1,
        per_device_train_batch_size=batch, gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0,
        max_grad_norm=0.0,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}
    return delta, _train_logs(trainer)[0]


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full, full_log = _sgd_first_step(tmp_path / "a", batch=4, ga=1)
    accumulated, acc_log = _sgd_first_step(tmp_path / "b", batch=2, ga=2)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("loss", "kd/loss/dkd", "kd/loss/mse", "kd/loss/attention_relation", "kd/transfer"):
        assert acc_log[key] == pytest.approx(full_log[key], rel=1e-4), key


def test_resume_reproduces_uninterrupted_run(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    straight = _kd_trainer(tmp_path / "straight", **common)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / KD_STATE_NAME).is_file()

    resumed = _kd_trainer(tmp_path / "resumed", **common)
    ran = StepRecorder().attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # a resume, not a restart: only the steps after the checkpoint ran (a deterministic restart from step 0 would
    # log the same values at steps 4-6), one loss computation each
    assert ran.steps == [4, 5, 6] and ran.loss_calls == 3
    want = {e["step"]: e for e in _train_logs(straight) if e["step"] > 3}
    got = {e["step"]: e for e in _train_logs(resumed)[3:]}  # log_history restored from the checkpoint first
    assert sorted(got) == [4, 5, 6]
    assert [e["step"] for e in _train_logs(resumed)] == [1, 2, 3, 4, 5, 6]  # restored history, then new entries
    for step in (4, 5, 6):
        for key in ("loss", "kd/loss/dkd", "kd/loss/contrastive", "kd/loss/attention_relation"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_logged_step_equals_a_direct_distiller_call_on_the_same_batch(tmp_path):
    """Step 1 of a KDSFTTrainer run recomputed outside the trainer: the same initial student and teacher, the batch
    the trainer's ``compute_loss`` received, a Distiller holding the trainer's initial state (projectors). Every
    logged term loss, the transfer and the loss (host CE + transfer) match."""
    config = kd_config(KD_TERMS + [{"name": "mse", "weight": 0.7, "layers": "uniform"}])
    trainer = _kd_trainer(tmp_path, config=config, dataset=tiny_dataset(4), max_steps=1)
    initial = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    (log,) = _train_logs(trainer)
    (inputs,) = seen

    student, teacher = tiny_model(seed=0), tiny_model(seed=1, hidden=48, layers=3, heads=4, kv_heads=2)
    s_info, t_info = ModelInfo.from_config(student.config), ModelInfo.from_config(teacher.config)
    distiller = Distiller(config, student=s_info, teacher=t_info)
    distiller.load_state_dict(initial)
    req = distiller.requirements()
    s_cap = FeatureCapture(student, info=s_info, layers=req.student_layers, qkv_layers=req.student_qkv_layers,
                           final_hidden=True)
    t_cap = FeatureCapture(teacher, info=t_info, layers=req.teacher_layers, qkv_layers=req.teacher_qkv_layers,
                           final_hidden=True)
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        with s_cap.recording():
            ce = student(**model_inputs, labels=inputs["labels"], use_cache=False).loss
        with t_cap.recording():
            run_backbone(teacher, inputs)
        batch = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs.get("attention_mask"),
                                         position_ids=inputs.get("position_ids"), step=0)
        out = distiller(s_cap.result(), t_cap.result(), batch, task_loss=ce)
    labels = [t["name"] for t in config["terms"]]
    assert set(out.losses) == set(labels)
    for label in labels:
        assert log[f"kd/loss/{label}"] == pytest.approx(out.losses[label].item(), rel=1e-4, abs=1e-6), label
        assert log[f"kd/weight/{label}"] == pytest.approx(out.weights[label], rel=1e-6), label
    assert log["kd/transfer"] == pytest.approx(out.transfer.item(), rel=1e-4)
    assert log["loss"] == pytest.approx(out.loss.item(), abs=2e-4)  # transformers rounds it to 4 decimals
    assert out.transfer.item() > 1e-3


def test_lora_student_with_self_teacher(tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA test needs peft")
    config = kd_config([KD_TERMS[0], KD_TERMS[2], {"name": "cosine", "weight": 0.5, "layers": "uniform"}])
    trainer = KDSFTTrainer(
        model=tiny_model("llama"),
        args=sft_args(tmp_path, max_steps=4, learning_rate=1e-2),
        train_dataset=tiny_dataset(16),
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        teacher="self",
        kd_config=config,
    )
    assert trainer.kd_teacher.is_self
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    logs = _train_logs(trainer)
    # LoRA B starts at zero: at step 1 the student *is* its base, so every transfer term is zero
    assert logs[0]["kd/loss/dkd"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["kd/loss/attention_relation"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["kd/loss/dkd"] > 0
    assert any(not torch.equal(lora[n], p.detach()) for n, p in trainer.model.named_parameters() if n in lora)
    assert trainer.model.training  # the teacher forward restored train mode


def test_self_teacher_needs_peft(tmp_path):
    with pytest.raises(ValueError, match="PEFT"):
        _kd_trainer(tmp_path, teacher="self")


def _assert_first_step_is_task_loss_plus_transfer(kd_log, plain_log, labels, ce_weight=1.0):
    """Step 1 (same initial student, same batch): the logged loss is ``ce_weight * host loss + transfer``, and the
    transfer is the weighted sum of the logged term losses; every term loss is finite and positive."""
    for label in labels:
        assert math.isfinite(kd_log[f"kd/loss/{label}"]) and kd_log[f"kd/loss/{label}"] > 0, label
    weighted = sum(kd_log[f"kd/weight/{label}"] * kd_log[f"kd/loss/{label}"] for label in labels)
    assert kd_log["kd/transfer"] == pytest.approx(weighted, rel=1e-4)
    assert kd_log["kd/transfer"] > 1e-3
    # the logged "loss" is rounded by transformers to 4 decimals
    assert kd_log["loss"] == pytest.approx(ce_weight * plain_log["loss"] + kd_log["kd/transfer"], abs=2e-4)


# Every batch of these tests is the whole 4-row dataset, so the distilling and the plain run see the same first
# batch whatever random numbers the Distiller's construction consumed (token means do not depend on row order).


def test_enable_distillation_on_built_sft_trainer(tmp_path):
    plain = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path / "plain", max_steps=1),
                       train_dataset=tiny_dataset(4), processing_class=tiny_tokenizer())
    plain.train()
    trainer = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path, max_steps=3), train_dataset=tiny_dataset(4),
                         processing_class=tiny_tokenizer())
    returned = enable_distillation(trainer, teacher=tiny_model(seed=3, layers=3), config=kd_config())
    assert returned is trainer and isinstance(trainer, SFTTrainer)
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    _assert_first_step_is_task_loss_plus_transfer(logs[0], _train_logs(plain)[0], [t["name"] for t in KD_TERMS])
    opt_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in opt_params for p in trainer.distiller.parameters())


def test_transformers_trainer_path(tmp_path):
    tok = tiny_tokenizer()
    data = tiny_dataset(4).map(lambda row: tok(row["text"]), remove_columns=["text"])

    def args(out, steps):
        return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)

    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    plain = Trainer(model=tiny_model("qwen2"), args=args(tmp_path / "plain", 1), train_dataset=data,
                    data_collator=collator)
    plain.train()
    trainer = KDTrainer(model=tiny_model("qwen2"), args=args(tmp_path, 3), train_dataset=data, data_collator=collator,
                        teacher=tiny_model("qwen2", seed=2), kd_config=kd_config(projector_lr=3e-3))
    assert isinstance(trainer, Trainer)
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 3
    _assert_first_step_is_task_loss_plus_transfer(logs[0], _train_logs(plain)[0], [t["name"] for t in KD_TERMS])
    kd_groups = [g for g in trainer.optimizer.param_groups if g["initial_lr"] == pytest.approx(3e-3)]
    assert kd_groups, "projector_lr group missing"


def test_incompatible_vocab_raises_before_training(tmp_path):
    with pytest.raises(IncompatibleModelsError, match=r"student.*128.*teacher.*256"):
        _kd_trainer(tmp_path, teacher=tiny_model(seed=1, vocab=256))


def test_teacher_is_frozen_and_loadable_from_path(tmp_path):
    teacher = tiny_model(seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = _kd_trainer(tmp_path / "run", teacher=str(tmp_path / "teacher"), max_steps=1)
    assert not any(p.requires_grad for p in trainer.kd_teacher.model.parameters())
    assert not trainer.kd_teacher.model.training


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_teacher(tmp_path, mode):
    teacher = tiny_model(seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
    trainer = _kd_trainer(tmp_path, teacher=teacher, config=kd_config(on_nonfinite_teacher=mode), max_steps=2)
    if mode == "raise":
        with pytest.raises(NonFiniteTeacherError):
            trainer.train()
    else:
        trainer.train()
        logs = _train_logs(trainer)
        assert logs[-1]["kd/skipped_steps"] == 1.0 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


@pytest.mark.parametrize("packing", [True, False], ids=["packing", "padding_free_only"])
def test_sft_packing_padding_free_trains(tmp_path, packing):
    seen = []
    teacher = tiny_model(seed=1, layers=3)
    teacher.model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(k for k, v in kw.items() if v is not None)),
                                            with_kwargs=True)
    extra = {} if packing else {"max_length": None}  # TRL: padding-free without packing cannot truncate
    trainer = _kd_trainer(tmp_path, teacher=teacher, packing=packing, padding_free=True, max_steps=2,
                          per_device_train_batch_size=2, **extra)
    trainer.train()
    assert "position_ids" in seen[0] and "attention_mask" not in seen[0]
    logs = _train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        for term in KD_TERMS:
            value = entry[f"kd/loss/{term['name']}"]
            assert math.isfinite(value) and value > 0, (term["name"], value)


def test_packed_and_padded_batches_give_the_same_kd_losses():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1, hidden=48, layers=3)
    s_info, t_info = ModelInfo.from_config(student.config), ModelInfo.from_config(teacher.config)
    terms = KD_TERMS + [{"name": "mse", "weight": 1.0, "layers": "uniform"}]
    distiller = Distiller(kd_config(terms), student=s_info, teacher=t_info)
    req = distiller.requirements()
    s_cap = FeatureCapture(student, info=s_info, layers=req.student_layers, qkv_layers=req.student_qkv_layers,
                           final_hidden=True)
    t_cap = FeatureCapture(teacher, info=t_info, layers=req.teacher_layers, qkv_layers=req.teacher_qkv_layers,
                           final_hidden=True)
    torch.manual_seed(0)
    seqs = [torch.randint(4, 128, (n,)) for n in (7, 11, 5)]
    width = max(len(s) for s in seqs)
    padded = {
        "input_ids": torch.stack([torch.nn.functional.pad(s, (0, width - len(s))) for s in seqs]),
        "attention_mask": torch.stack([(torch.arange(width) < len(s)).long() for s in seqs]),
    }
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    packed_ids = torch.cat(seqs)[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]
    packed = {"input_ids": packed_ids, "labels": labels,
              "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}

    def losses(inputs):
        with s_cap.recording():
            # use_cache=False like every trainer: with a cache, transformers ignores packed position_ids
            student(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        with torch.no_grad(), t_cap.recording():
            run_backbone(teacher, inputs)
        batch = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs.get("attention_mask"),
                                         position_ids=inputs.get("position_ids"))
        return distiller(s_cap.result(), t_cap.result(), batch).losses

    a, b = losses(padded), losses(packed)
    for key in ("dkd", "attention_relation", "contrastive", "mse"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(KDDistillationTrainer is None, reason="this TRL has no DistillationTrainer")
def test_kd_distillation_trainer_steps(tmp_path):
    from datasets import Dataset
    from trl import DistillationConfig

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                              logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                              gradient_checkpointing=False, max_completion_length=4, disable_tqdm=True)
    prompts = Dataset.from_dict({"prompt": tiny_texts(4, min_len=3, max_len=5)})
    trainer = KDDistillationTrainer(model=tiny_model(), teacher_model=tiny_model(seed=1), args=args,
                                    train_dataset=prompts, processing_class=tok,
                                    kd_config=kd_config([KD_TERMS[0], KD_TERMS[2]]))
    trainer.train()
    (log,) = _train_logs(trainer)
    for label in ("dkd", "attention_relation"):
        assert math.isfinite(log[f"kd/loss/{label}"]) and log[f"kd/loss/{label}"] > 0, label
    weighted = sum(log[f"kd/weight/{label}"] * log[f"kd/loss/{label}"] for label in ("dkd", "attention_relation"))
    assert log["kd/transfer"] == pytest.approx(weighted, rel=1e-4) and math.isfinite(log["loss"])


@pytest.mark.gpu
def test_flash_attention_2_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("flash_attn", reason="needs the flash-attn package (pip install kd_plugins[flash])")
    student = tiny_model("llama").to("cuda", torch.bfloat16)
    teacher = tiny_model("llama", seed=1, layers=3).to("cuda", torch.bfloat16)
    for model in (student, teacher):
        model.set_attn_implementation("flash_attention_2")
    trainer = KDSFTTrainer(model=student, args=sft_args(tmp_path, max_steps=3, use_cpu=False, bf16=True,
                                                        packing=True, padding_free=True),
                           train_dataset=tiny_dataset(16), processing_class=tiny_tokenizer(), teacher=teacher,
                           kd_config=kd_config())
    trainer.train()
    assert "kd/loss/attention_relation" in _train_logs(trainer)[-1]
