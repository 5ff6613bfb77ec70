"""GPT-2-style models (``transformer.h``, ``Conv1D``, ``ln_f``, fused ``c_attn``) are captured and distilled --
attention relations included, q/k/v split from ``c_attn`` by width -- and an unsupported layout is refused with the
list of supported architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig

from kd_plugins import IncompatibleModelsError, ModelInfo
from kd_plugins.capture import SUPPORTED_ARCHITECTURES, FeatureCapture, run_backbone
from kd_plugins.integrations.trl import KDSFTTrainer

from .conftest import KD_TERMS, kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer


def tiny_gpt2(seed=0, *, hidden=32, layers=2, heads=4):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config).float()


def test_capture_reads_blocks_final_norm_head_and_split_qkv():
    model = tiny_gpt2().eval()
    info = ModelInfo.from_config(model.config)
    assert (info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (32, 2, 4, 4, 8)
    capture = FeatureCapture(model, info=info, layers=[0, 1], qkv_layers=[1], final_hidden=True)
    x = torch.randint(0, 128, (2, 7))
    seen = {}
    model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    with torch.no_grad(), capture.recording():
        out = model(x, output_hidden_states=True)
    result = capture.result()
    torch.testing.assert_close(result.hidden_states[0], out.hidden_states[1])
    torch.testing.assert_close(result.final_hidden @ result.lm_head_weight.T, out.logits)
    q, k, v = result.qkv[1]
    torch.testing.assert_close(torch.cat([q, k, v], -1), seen["qkv"])  # [q | k | v] side by side
    assert q.shape == k.shape == v.shape == (2, 7, 32)
    torch.testing.assert_close(run_backbone(model, {"input_ids": x}), result.final_hidden)


@pytest.mark.parametrize("pair", ["gpt2_gpt2", "llama_student_gpt2_teacher"])
def test_gpt2_models_distil_with_every_term_family(tmp_path, pair):
    student = tiny_gpt2(0) if pair == "gpt2_gpt2" else tiny_model(seed=0)
    terms = KD_TERMS + [{"name": "mse", "weight": 0.5, "layers": "uniform"}]
    trainer = KDSFTTrainer(model=student, args=sft_args(tmp_path, max_steps=3, learning_rate=1e-2),
                           train_dataset=tiny_dataset(16), processing_class=tiny_tokenizer(),
                           teacher=tiny_gpt2(1, hidden=48, layers=3), kd_config=kd_config(terms))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for key in ("kd/loss/dkd", "kd/loss/contrastive", "kd/loss/attention_relation", "kd/loss/mse"):
        assert all(torch.isfinite(torch.tensor(e[key])) for e in logs), key
    assert logs[-1]["kd/loss/attention_relation"] > 0


def test_an_unsupported_layout_lists_the_supported_architectures():
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    info = ModelInfo.from_config(config)
    with pytest.raises(IncompatibleModelsError) as info_error:
        FeatureCapture(model, info=info, final_hidden=True)
    message = str(info_error.value)
    assert "expected the final norm at 'gpt_neox.norm' (or 'gpt_neox.ln_f') in GPTNeoXModel" in message
    for architecture in SUPPORTED_ARCHITECTURES:
        assert architecture in message
    with pytest.raises(IncompatibleModelsError) as info_error:
        FeatureCapture(model, info=info, qkv_layers=[0])
    assert "expected an attention module at 'gpt_neox.layers.0.self_attn'" in str(info_error.value)


def test_a_fused_qkv_whose_width_does_not_split_is_refused():
    model = tiny_gpt2()
    info = ModelInfo(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, vocab_size=128, name="g")
    with pytest.raises(IncompatibleModelsError, match=r"'transformer\.h\.0\.attn\.c_attn' has 96 output features, "
                                                      r"not the q/k/v widths \(32, 8, 8\)"):
        FeatureCapture(model, info=info, qkv_layers=[0])
