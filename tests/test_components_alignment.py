"""Module-level alignment terms, their builders, registration and projectors."""

from __future__ import annotations

import importlib
import math

import pluggy
import pytest
import torch
from torch import nn

from kd_plugins import hookspecs
from kd_plugins.components import alignment
from kd_plugins.components.alignment import (
    AttentionRelationLoss,
    ContrastiveAlignmentLoss,
    CosineAlignmentLoss,
    MSEAlignmentLoss,
    build_attention_relation,
    build_contrastive,
    build_cosine,
    build_mse,
)
from kd_plugins.errors import ConfigError
from kd_plugins.projectors import build_projector
from kd_plugins.types import BatchContext, ModelCapture, ModelInfo, Requirements
from tests.test_functional_alignment import naive_contrastive, naive_relation, naive_token_mean

B, T = 2, 5
# GQA student (q 3x2=6, k/v 1x2=2), MHA teacher (q/k/v 5x2=10)
STUDENT = ModelInfo(hidden_size=6, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=2, vocab_size=11, name="student")
TEACHER = ModelInfo(hidden_size=10, num_layers=4, num_heads=5, num_kv_heads=5, head_dim=2, vocab_size=11, name="teacher")


def _randn(*shape, seed, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def captures(grad=True):
    student = ModelCapture(info=STUDENT)
    teacher = ModelCapture(info=TEACHER)
    for layer in range(STUDENT.num_layers):
        student.hidden_states[layer] = _randn(B, T, 6, seed=layer, grad=grad)
        student.qkv[layer] = tuple(_randn(B, T, w, seed=10 + layer * 3 + i, grad=grad) for i, w in enumerate((6, 2, 2)))
    for layer in range(TEACHER.num_layers):
        teacher.hidden_states[layer] = _randn(B, T, 10, seed=100 + layer)
        teacher.qkv[layer] = tuple(_randn(B, T, 10, seed=200 + layer * 3 + i) for i in range(3))
    return student, teacher


def _affine(projector, x):
    """A linear projector applied by hand from its parameters (not through its forward)."""
    return x @ projector.weight.detach().T + projector.bias.detach()


def batch(all_masked=False):
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if all_masked:
        attention_mask = torch.zeros_like(attention_mask)
    return BatchContext.from_inputs(input_ids=torch.arange(B * T).reshape(B, T), attention_mask=attention_mask)


# --- registration -------------------------------------------------------------------------------------------


NAMES = {"contrastive", "mse", "cosine", "attention_relation"}


def test_registered_through_the_hook():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(alignment, name="kd_plugins.components.alignment")
    from kd_plugins.plugins import available_components

    assert available_components(pm)["alignment"] == {n: "kd_plugins.components.alignment" for n in NAMES}


def test_visible_in_default_registry(clean_plugin_manager):
    from kd_plugins.plugins import DEFAULT_PLUGINS, available_components

    for module in DEFAULT_PLUGINS:  # every built-in ships with the package: a broken one fails here
        importlib.import_module(module)
    clean_plugin_manager.setenv("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
    found = available_components()["alignment"]
    assert {n: found[n] for n in NAMES} == {n: "kd_plugins.components.alignment" for n in NAMES}


# --- contrastive --------------------------------------------------------------------------------------------


def test_contrastive_requirements_forward_and_gradients():
    term = build_contrastive(student=STUDENT, teacher=TEACHER, proj_dim=4, temperature=0.2, learn_temperature=True)
    assert isinstance(term, ContrastiveAlignmentLoss) and term.family == "alignment"
    assert term.layer_pairs == [(0, 1), (1, 3)]
    assert term.requirements() == Requirements(student_layers={0, 1}, teacher_layers={1, 3})
    student, teacher = captures()
    ctx = batch()
    loss = term(student, teacher, ctx)
    # independent of the term's code path: projections written out from the parameters, the naive InfoNCE loop
    want = sum(
        naive_contrastive(_affine(ps, student.hidden_states[s]), _affine(pt, teacher.hidden_states[t]),
                          ctx.token_mask, 0.2)
        for (s, t), ps, pt in zip(term.layer_pairs, term.student_projectors, term.teacher_projectors)
    ) / len(term.layer_pairs)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    for p in term.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert term.logit_scale.grad != 0
    assert student.hidden_states[0].grad is not None
    assert teacher.hidden_states[1].grad is None  # teacher features are detached
    assert term.extra_metrics()["temperature"] == pytest.approx(0.2)


def test_learned_temperature_is_clamped_like_clip():
    term = build_contrastive(student=STUDENT, teacher=TEACHER, layers="last", learn_temperature=True)
    with torch.no_grad():
        term.logit_scale.fill_(10.0)
    assert term.extra_metrics()["temperature"] == pytest.approx(0.01)


def test_contrastive_fixed_temperature_has_only_projector_parameters():
    term = build_contrastive(student=STUDENT, teacher=TEACHER, layers=[[-1, -1]], proj_dim=4, projector="mlp")
    names = {n.split(".")[0] for n, _ in term.named_parameters()}
    assert names == {"student_projectors", "teacher_projectors"}
    assert term.extra_metrics() == {"temperature": pytest.approx(0.07)}


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"layers": [[0, 4]]}, r"teacher layer 4 is out of range for 'teacher' with 4 layers"),
        ({"projector": "conv"}, "unknown kind 'conv'"),
        ({"projector": "identity"}, "equal widths"),
    ],
)
def test_contrastive_build_errors(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_contrastive(student=STUDENT, teacher=TEACHER, **options)


# --- mse / cosine -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder, cls, per_token", [
    (build_mse, MSEAlignmentLoss, lambda a, b: ((a - b) ** 2).sum() / a.numel()),
    (build_cosine, CosineAlignmentLoss, lambda a, b: 1 - torch.dot(a, b) / (a.norm() * b.norm())),
])
def test_regression_terms(builder, cls, per_token):
    term = builder(student=STUDENT, teacher=TEACHER, layers="uniform", num_pairs=1)
    assert isinstance(term, cls) and term.family == "alignment"
    assert term.requirements() == Requirements(student_layers={1}, teacher_layers={3})
    assert term.projectors[0].weight.shape == (10, 6)
    student, teacher = captures()
    ctx = batch()
    loss = term(student, teacher, ctx)
    want = naive_token_mean(_affine(term.projectors[0], student.hidden_states[1]), teacher.hidden_states[3],
                            ctx.token_mask, per_token)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())


def test_mse_equal_widths_starts_from_identity_projector():
    student, _ = captures()
    same = ModelCapture(info=STUDENT, hidden_states={k: v.detach().clone() for k, v in student.hidden_states.items()})
    term = build_mse(student=STUDENT, teacher=STUDENT)
    assert term(student, same, batch()).item() == pytest.approx(0.0, abs=1e-7)
    assert build_cosine(student=STUDENT, teacher=STUDENT, projector="identity")(student, same, batch()).item() == pytest.approx(0.0, abs=1e-6)


def test_bf16_captures_with_fp32_projectors():
    student, teacher = captures(grad=False)
    student.hidden_states = {k: v.bfloat16() for k, v in student.hidden_states.items()}
    teacher.hidden_states = {k: v.bfloat16() for k, v in teacher.hidden_states.items()}
    for builder in (build_mse, build_cosine, build_contrastive):
        loss = builder(student=STUDENT, teacher=TEACHER)(student, teacher, batch())
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- attention relation -------------------------------------------------------------------------------------


def test_attention_relation_term():
    term = build_attention_relation(student=STUDENT, teacher=TEACHER)
    assert isinstance(term, AttentionRelationLoss) and term.family == "alignment"
    assert (term.student_layer, term.teacher_layer, term.relation_heads) == (1, 3, 2)  # gcd(6, 2, 10) = 2
    assert term.requirements() == Requirements(student_qkv_layers={1}, teacher_qkv_layers={3})
    assert list(term.parameters()) == []
    student, teacher = captures()
    ctx = batch()
    loss = term(student, teacher, ctx)
    want = naive_relation(student.qkv[1], teacher.qkv[3], 2, ctx.sequence_ids)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.qkv[1][0].grad is not None


def test_attention_relation_defaults_and_subsets():
    assert build_attention_relation(student=TEACHER, teacher=TEACHER).relation_heads == 5
    wide = ModelInfo(hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, vocab_size=11)
    assert build_attention_relation(student=wide, teacher=wide).relation_heads == 8
    term = build_attention_relation(student=STUDENT, teacher=TEACHER, student_layer=0, teacher_layer=-2, relation_heads=1, relations=["k"])
    assert (term.student_layer, term.teacher_layer, term.relations) == (0, 2, ("k",))
    # q widths 6 and 10 share no divisor but 1, k/v of the student is 2: R=2 only divides with relations k, v
    assert build_attention_relation(student=STUDENT, teacher=TEACHER, relation_heads=2, relations=("k", "v")).relation_heads == 2


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"relation_heads": 3}, r"relation_heads: 3 does not divide the student \('student'\) k width 2 .*GQA"),
        ({"relation_heads": 0}, "relation_heads: must be a positive int"),
        ({"relations": ("q", "x")}, "relations"),
        ({"relations": ()}, "relations"),
        ({"student_layer": 2}, r"student_layer: layer 2 is out of range for 'student' with 2 layers \(allowed: -2\.\.1\)"),
        ({"teacher_layer": -5}, "teacher_layer"),
    ],
)
def test_attention_relation_build_errors(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_attention_relation(student=STUDENT, teacher=TEACHER, **options)


# --- shared contracts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_contrastive, build_mse, build_cosine, build_attention_relation])
def test_all_masked_batch_is_exact_zero(builder):
    term = builder(student=STUDENT, teacher=TEACHER)
    student, teacher = captures()
    loss = term(student, teacher, batch(all_masked=True))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in term.parameters()] + [x.grad for x in student.hidden_states.values()]
    assert all(g is None or (torch.all(g == 0)) for g in grads)


def test_missing_capture_names_the_layer():
    term = build_mse(student=STUDENT, teacher=TEACHER, layers="last")
    student, teacher = captures()
    del teacher.hidden_states[3]
    with pytest.raises(KeyError, match="teacher capture has no hidden state for layer 3"):
        term(student, teacher, batch())


# --- projectors ---------------------------------------------------------------------------------------------


def test_projectors():
    linear = build_projector(6, 6)
    torch.testing.assert_close(linear.weight, torch.eye(6))
    assert torch.all(linear.bias == 0)
    rect = build_projector(6, 4, init="identity")
    torch.testing.assert_close(rect.weight, torch.eye(4, 6))
    assert not torch.equal(build_projector(6, 4).weight, torch.eye(4, 6))
    mlp = build_projector(6, 4, kind="mlp", hidden_dim=3, bias=False)
    assert isinstance(mlp[1], nn.GELU) and mlp[0].weight.shape == (3, 6) and mlp[0].bias is None
    assert mlp(torch.zeros(2, 6)).shape == (2, 4)
    assert isinstance(build_projector(5, 5, kind="identity"), nn.Identity)
    with pytest.raises(ConfigError, match="kind='identity' needs equal widths, got 6 -> 4"):
        build_projector(6, 4, kind="identity")
    with pytest.raises(ConfigError, match="unknown kind"):
        build_projector(6, 4, kind="attention")
    with pytest.raises(ConfigError, match="init"):
        build_projector(6, 4, init="orthogonal")
    with pytest.raises(ConfigError, match="in_dim"):
        build_projector(0, 4)
