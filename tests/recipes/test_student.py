"""derive_student: weight copying, layer-selection strategies, width and mixed pruning, parameter counts, saving and
loading, and argument errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kd_plugins.recipes.student import (  # noqa: E402
    count_parameters,
    derive_student,
    kept_layer_pairs,
    layer_importance,
    select_layers,
    width_importance,
)


def _teacher(layers: int = 6, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # random init gives near-identity blocks; make them distinct and non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _calibration(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_student_blocks_are_copies_of_kept_teacher_blocks(tied):
    teacher = _teacher(tied=tied)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, kept = derive_student(teacher, keep_layers=[0, 3, 5])
    assert kept == [0, 3, 5]
    assert student.config.num_hidden_layers == 3 and student.config.kd_kept_layers == [0, 3, 5]
    assert student.training and not teacher.training
    for k, t in enumerate(kept):
        s_block, t_block = student.model.layers[k].state_dict(), teacher.model.layers[t].state_dict()
        assert s_block.keys() == t_block.keys()
        for name in s_block:
            torch.testing.assert_close(s_block[name], t_block[name], rtol=0, atol=0)
        assert student.model.layers[k].self_attn.layer_idx == k
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    # fresh copies: training the student never touches the teacher
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_all_layers_kept_reproduces_the_teacher_and_generation_works():
    teacher = _teacher()
    student, kept = derive_student(teacher, num_layers=6)
    assert kept == list(range(6))
    x = _calibration(2, 12)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x).logits, teacher(input_ids=x).logits)
    small, _ = derive_student(teacher, num_layers=2)
    small.eval()
    out = small.generate(input_ids=x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)  # the KV cache works with renumbered layers


def test_uniform_keeps_first_and_last_evenly_spaced():
    teacher = _teacher(layers=30)
    assert select_layers(teacher, 6) == [0, 6, 12, 17, 23, 29]
    assert select_layers(teacher, 2) == [0, 29]
    kept = select_layers(teacher, 5, keep_first_last=False)
    assert len(kept) == 5 and 0 < kept[0] and kept[-1] < 29


@pytest.mark.parametrize("strategy", ["block_influence", "angular"])
def test_data_driven_strategies(strategy):
    teacher = _teacher(layers=8)
    cal = _calibration()
    kept = select_layers(teacher, 4, strategy=strategy, calibration=cal)
    assert len(kept) == 4 and kept == sorted(set(kept)) and kept[0] == 0 and kept[-1] == 7
    student, kept2 = derive_student(teacher, num_layers=4, strategy=strategy, calibration=cal)
    assert kept2 == kept and student.config.num_hidden_layers == 4
    if strategy == "angular":  # a contiguous run was removed
        removed = sorted(set(range(8)) - set(kept))
        assert removed == list(range(removed[0], removed[0] + 4))


def test_block_influence_keeps_the_most_influential_blocks():
    teacher = _teacher(layers=8)
    cal = _calibration()
    scores = layer_importance(teacher, cal)
    assert len(scores) == 8 and all(0.0 <= s <= 2.0 for s in scores)
    inner = sorted(range(1, 7), key=lambda i: -scores[i])[:2]
    assert select_layers(teacher, 4, strategy="block_influence", calibration=cal) == sorted({0, 7, *inner})
    # list-of-lists calibration gives the same scores as a tensor
    assert layer_importance(teacher, cal.tolist()) == pytest.approx(scores, abs=1e-5)
    angular = layer_importance(teacher, cal, metric="angular")
    assert all(0.0 <= a <= 1.0 for a in angular)


def test_block_influence_matches_a_naive_computation():
    teacher = _teacher(layers=3)
    cal = _calibration(2, 10)
    with torch.no_grad():
        hs = teacher(input_ids=cal, output_hidden_states=True).hidden_states
    # hidden_states[i] is block i's input for i < L; the last entry is after the final norm, so check the inner ones
    for i in range(2):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert layer_importance(teacher, cal)[i] == pytest.approx(float(1 - cos.mean()), abs=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_count_parameters(tied):
    teacher = _teacher(tied=tied)
    counts = count_parameters(teacher)
    unique = {id(p): p.numel() for p in teacher.parameters()}
    assert counts["total"] == sum(unique.values())
    embedding = 64 * 32 * (1 if tied else 2)
    assert counts["non_embedding"] == counts["total"] - embedding
    blocks = sum(p.numel() for p in teacher.model.layers.parameters()) + teacher.model.norm.weight.numel()
    assert counts["non_embedding"] == blocks
    student, _ = derive_student(teacher, num_layers=2)
    per_block = sum(p.numel() for p in teacher.model.layers[0].parameters())
    assert count_parameters(student)["non_embedding"] == counts["non_embedding"] - 4 * per_block


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=7), "1..6"),
        (dict(num_layers=0), "1..6"),
        (dict(num_layers=2.5), "1..6"),
        (dict(keep_layers=[0, 2, 2]), "more than once"),
        (dict(keep_layers=[0, -1, 5]), "more than once"),
        (dict(keep_layers=[0, 6]), "out of range"),
        (dict(keep_layers=[]), "empty"),
        (dict(keep_layers=[0, 1], num_layers=3), "disagrees"),
        (dict(), "num_layers or keep_layers"),
        (dict(num_layers=3, strategy="random"), "strategy"),
        (dict(num_layers=3, strategy="block_influence"), "calibration"),
        (dict(num_layers=1), "keep_first_last"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        derive_student(_teacher(), **kwargs)


def test_single_layer_student_without_keep_first_last():
    student, kept = derive_student(_teacher(), num_layers=1, keep_first_last=False)
    assert len(kept) == 1 and student.config.num_hidden_layers == 1


def test_kept_layer_pairs_follow_the_residual_stream():
    assert kept_layer_pairs([0, 3, 5], 6) == [(0, 2), (1, 4), (2, 5)]
    assert kept_layer_pairs([0, 1, 2], 3) == [(0, 0), (1, 1), (2, 2)]
    assert kept_layer_pairs([2, 4], 8) == [(0, 3), (1, 7)]


# --- width and mixed students -------------------------------------------------------------------------------


def _gqa_teacher(layers: int = 4, tied: bool = True, seed: int = 0, **extra) -> LlamaForCausalLM:
    """6 query heads in 2 key/value groups of 3 (SmolLM2's 9/3 layout, smaller), explicit head_dim."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, **extra,
    )
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def _naive_activations(teacher, calibration):
    """Per block: o_proj and down_proj inputs and both norms' outputs, recorded by hand (reference)."""
    records = {}
    handles = []
    for i, block in enumerate(teacher.model.layers):
        for name, module in (("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, i=i, name=name: records.setdefault((i, name), []).append(args[0].detach())))
        for name in ("input_layernorm", "post_attention_layernorm"):
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, args, out, i=i, name=name: records.setdefault((i, name), []).append(out.detach())))
    handles.append(teacher.model.norm.register_forward_hook(
        lambda m, args, out: records.setdefault(("final", "norm"), []).append(out.detach())))
    with torch.no_grad():
        teacher(input_ids=calibration)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for k, v in records.items()}


def test_width_at_full_size_reproduces_the_teacher():
    teacher = _gqa_teacher()
    student, kept = derive_student(teacher, strategy="width", calibration=_calibration(), num_heads=6,
                                   num_kv_heads=2, intermediate_size=40, hidden_size=24)
    assert kept == [0, 1, 2, 3]
    x = _calibration(2, 12)
    torch.testing.assert_close(_logits(student, x), _logits(teacher, x), rtol=0, atol=0)


def test_width_importance_matches_a_naive_computation():
    teacher = _gqa_teacher(layers=2)
    cal = _calibration()
    importance = width_importance(teacher, cal)
    acts = _naive_activations(teacher, cal)
    for i in range(2):
        o = acts[(i, "o")].reshape(-1, 6, 8)
        torch.testing.assert_close(importance.heads[i], o.norm(dim=-1).mean(0))
        torch.testing.assert_close(importance.mlp[i], acts[(i, "down")].abs().mean(0))
        channels = acts[(i, "input_layernorm")].abs().mean(0) + acts[(i, "post_attention_layernorm")].abs().mean(0)
        torch.testing.assert_close(importance.channels[i], channels)
    torch.testing.assert_close(importance.channels[2], acts[("final", "norm")].abs().mean(0))


def test_width_keeps_the_most_important_heads_channels_and_groups():
    teacher = _gqa_teacher(layers=3)
    cal = _calibration()
    importance = width_importance(teacher, cal)
    student, _ = derive_student(teacher, strategy="width", calibration=cal, num_heads=2, num_kv_heads=1,
                                intermediate_size=16, hidden_size=20)
    channels = sorted((importance.channels[:3].sum(0) + importance.channels[3]).topk(20).indices.tolist())
    assert student.config.kd_kept_channels == channels
    ch = torch.tensor(channels)
    for i in range(3):
        heads = importance.heads[i]
        # best two heads inside each group of three; the group whose best two weigh more wins
        best = [sorted(sorted(range(g * 3, g * 3 + 3), key=lambda h: -float(heads[h]))[:2]) for g in range(2)]
        group = max(range(2), key=lambda g: float(heads[best[g]].sum()))
        rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in best[group]])
        kv_rows = torch.arange(group * 8, group * 8 + 8)
        neurons = sorted(importance.mlp[i].topk(16).indices.tolist())
        s, t = student.model.layers[i], teacher.model.layers[i]
        torch.testing.assert_close(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[rows][:, ch])
        torch.testing.assert_close(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv_rows][:, ch])
        torch.testing.assert_close(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv_rows][:, ch])
        torch.testing.assert_close(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[ch][:, rows])
        torch.testing.assert_close(s.mlp.gate_proj.weight, t.mlp.gate_proj.weight[neurons][:, ch])
        torch.testing.assert_close(s.mlp.up_proj.weight, t.mlp.up_proj.weight[neurons][:, ch])
        torch.testing.assert_close(s.mlp.down_proj.weight, t.mlp.down_proj.weight[ch][:, neurons])
        torch.testing.assert_close(s.input_layernorm.weight, t.input_layernorm.weight[ch])
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, ch])
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight[ch])
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_pruning_dead_channels_and_groups_leaves_the_output_unchanged():
    """MLP channels whose up-projection is zero and a GQA group whose values are zero contribute nothing: they are
    the least important, so pruning them must give exactly the teacher's logits."""
    teacher = _gqa_teacher(layers=2)
    with torch.no_grad():
        for block in teacher.model.layers:
            block.mlp.up_proj.weight[:15] = 0.0  # channels 0..14 never fire
            block.self_attn.v_proj.weight[8:] = 0.0  # group 1 (query heads 3..5) outputs zero
    student, _ = derive_student(teacher, strategy="width", calibration=_calibration(), num_heads=3,
                                num_kv_heads=1, intermediate_size=25)
    for block in student.model.layers:
        assert block.self_attn.q_proj.weight.shape == (24, 24) and block.mlp.up_proj.weight.shape == (25, 24)
    x = _calibration(2, 12)
    torch.testing.assert_close(_logits(student, x), _logits(teacher, x), rtol=1e-5, atol=1e-5)


def test_mixed_student_prunes_depth_then_width_and_counts_parameters():
    teacher = _gqa_teacher(layers=6, tied=False)
    cal = _calibration()
    student, kept = derive_student(teacher, num_layers=3, strategy="mixed", calibration=cal, num_heads=4,
                                   num_kv_heads=2, intermediate_size=20, hidden_size=16)
    assert kept == select_layers(teacher, 3, strategy="block_influence", calibration=cal)
    assert student.config.kd_kept_layers == kept
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size) == (3, 16, 4, 2, 8, 20)
    per_block = 16 * (4 * 8) * 2 + 16 * (2 * 8) * 2 + 3 * 16 * 20 + 2 * 16  # q, o; k, v; gate/up/down; two norms
    counts = count_parameters(student)
    assert counts["non_embedding"] == 3 * per_block + 16
    assert counts["total"] == counts["non_embedding"] + 2 * 64 * 16
    # width arguments with a depth strategy make the same kind of student
    other, kept2 = derive_student(teacher, num_layers=3, strategy="uniform", calibration=cal, intermediate_size=20)
    assert kept2 == select_layers(teacher, 3) and other.config.intermediate_size == 20
    assert other.config.hidden_size == 24 and not hasattr(other.config, "kd_kept_channels")


@pytest.mark.parametrize("kind", ["depth", "width", "mixed"])
def test_derived_students_save_and_load_with_plain_auto_model(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    teacher = _gqa_teacher(layers=4)
    cal = _calibration()
    kwargs = {"depth": dict(num_layers=2, strategy="block_influence"),
              "width": dict(strategy="width", num_heads=3, num_kv_heads=1, intermediate_size=16, hidden_size=18),
              "mixed": dict(num_layers=2, strategy="mixed", num_heads=4, num_kv_heads=2, intermediate_size=24)}[kind]
    student, _ = derive_student(teacher, calibration=cal, **kwargs)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = _calibration(2, 12)
    torch.testing.assert_close(_logits(loaded, x), _logits(student, x), rtol=0, atol=0)
    assert loaded.config.kd_kept_layers == student.config.kd_kept_layers
    out = loaded.generate(input_ids=x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="width"), "at least one width size"),
        (dict(strategy="mixed", num_layers=2), "at least one width size"),
        (dict(strategy="width", num_layers=2, intermediate_size=8), "keeps every block"),
        (dict(strategy="width", intermediate_size=8, calibration=None), "calibration"),
        (dict(strategy="width", intermediate_size=41), r"1\.\.40"),
        (dict(strategy="width", num_heads=7), r"1\.\.6"),
        (dict(strategy="width", num_heads=5), "num_kv_heads"),
        (dict(strategy="width", num_heads=4, num_kv_heads=1), "query heads per key/value group"),
        (dict(strategy="width", num_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
        (dict(strategy="width", hidden_size=0), r"1\.\.24"),
        (dict(strategy="width", num_heads=3, num_kv_heads=1, hidden_size=20), "cannot be saved and loaded"),
    ],
)
def test_bad_width_arguments_raise_clear_errors(kwargs, message):
    kwargs = {"calibration": _calibration(), **kwargs}
    with pytest.raises(ValueError, match=message):
        derive_student(_gqa_teacher(), **kwargs)


def test_width_pruning_does_not_modify_the_teacher():
    teacher = _gqa_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = teacher.config.to_dict()
    derive_student(teacher, num_layers=2, strategy="mixed", calibration=_calibration(), intermediate_size=10,
                   hidden_size=12)
    assert teacher.config.to_dict() == config and not teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
