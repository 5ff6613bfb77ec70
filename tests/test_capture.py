"""FeatureCapture and run_backbone against a model's own outputs (tiny random Llama / Qwen2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the capture tests build tiny transformers models")

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

from kd_plugins import IncompatibleModelsError, ModelInfo  # noqa: E402
from kd_plugins.capture import FeatureCapture, logit_postprocessing, run_backbone  # noqa: E402


def _model(arch="llama", **extra):
    torch.manual_seed(0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_capture_matches_model_outputs(arch):
    model = _model(arch)
    info = ModelInfo.from_config(model.config)
    capture = FeatureCapture(model, info=info, layers=[0, -1], qkv_layers=[1], final_hidden=True)
    x = torch.randint(0, 96, (2, 7))
    with capture.recording():
        out = model(input_ids=x, output_hidden_states=True)
    got = capture.result()
    assert sorted(got.hidden_states) == [0, 2]
    torch.testing.assert_close(got.hidden_states[0], out.hidden_states[1])
    # HF's last hidden_states entry is after the final norm; ours is the last block's output (pre-norm)
    torch.testing.assert_close(model.model.norm(got.hidden_states[2]), out.hidden_states[3])
    q, k, v = got.qkv[1]
    assert q.shape == (2, 7, 32) and k.shape == v.shape == (2, 7, 16)
    attn = model.model.layers[1].self_attn
    h_in = model.model.layers[1].input_layernorm(out.hidden_states[1])
    torch.testing.assert_close(q, attn.q_proj(h_in))
    torch.testing.assert_close(got.final_hidden @ got.lm_head_weight.T, out.logits, rtol=1e-5, atol=1e-5)
    assert got.logit_scale == 1.0 and got.logit_softcap is None
    assert got.final_hidden.requires_grad  # the student's graph is kept


def test_records_only_while_recording_and_remove_detaches():
    model = _model()
    capture = FeatureCapture(model, info=ModelInfo.from_config(model.config), layers=[1], final_hidden=True)
    x = torch.randint(0, 96, (1, 5))
    model(input_ids=x)
    with pytest.raises(RuntimeError, match="recording"):
        capture.result()
    with capture.recording():
        model(input_ids=x)
    first = capture.result().hidden_states[1]
    with capture.recording():  # cleared per step
        model(input_ids=x[:, :3])
    assert capture.result().hidden_states[1].shape[1] == 3 and first.shape[1] == 5
    capture.remove()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_run_backbone_equals_final_hidden_and_skips_labels():
    model = _model("qwen2")
    capture = FeatureCapture(model, info=ModelInfo.from_config(model.config), final_hidden=True)
    x = torch.randint(0, 96, (2, 6))
    with torch.no_grad(), capture.recording():
        hidden = run_backbone(model, {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x),
                                      "num_items_in_batch": 12})
    torch.testing.assert_close(hidden, capture.result().final_hidden)
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, ref)


def test_peft_model_is_unwrapped():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    capture = FeatureCapture(model, info=ModelInfo.from_config(model.config), qkv_layers=[0], final_hidden=True)
    with capture.recording():
        model(input_ids=torch.randint(0, 96, (1, 4)))
    assert capture.result().qkv[0][0].shape == (1, 4, 32)


def test_fused_qkv_and_unknown_layout_name_the_expected_path():
    model = _model()
    attn = model.model.layers[0].self_attn
    attn.qkv_proj = nn.Linear(32, 64)
    with pytest.raises(IncompatibleModelsError, match=r"model\.layers\.0\.self_attn\.qkv_proj.*q_proj"):
        FeatureCapture(model, info=ModelInfo.from_config(model.config), qkv_layers=[0])

    class NoDecoder(nn.Module):
        config = model.config

    with pytest.raises(IncompatibleModelsError, match="'model'"):
        FeatureCapture(NoDecoder(), info=ModelInfo.from_config(model.config), layers=[0])


def test_logit_postprocessing_reads_config():
    model = _model()
    model.config.logit_scale = 0.5
    model.config.final_logit_softcapping = 30.0
    assert logit_postprocessing(model) == (0.5, 30.0)


def test_lora_on_lm_head_is_part_of_the_captured_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # B starts at zero; make the adapter matter
    capture = FeatureCapture(model, info=ModelInfo.from_config(model.config), final_hidden=True)
    x = torch.randint(0, 96, (1, 6))
    with torch.no_grad(), capture.recording():
        logits = model(input_ids=x).logits
    got = capture.result()
    torch.testing.assert_close(got.final_hidden @ got.lm_head_weight.T, logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter(), capture.recording():
        base_logits = model(input_ids=x).logits
        off = capture.result()
    torch.testing.assert_close(off.final_hidden @ off.lm_head_weight.T, base_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base_logits)
