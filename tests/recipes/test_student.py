"""derive_student: weight copying, layer-selection strategies, parameter counts and argument errors."""

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
