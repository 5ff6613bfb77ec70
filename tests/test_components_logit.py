"""Module-level logit terms: forward over hand-built captures, builders, plugin registration."""

from __future__ import annotations

import pluggy
import pytest
import torch

import kd_plugins.components.logit as logit_plugin
from kd_plugins import hookspecs
from kd_plugins.components.logit import (
    DecoupledKDLoss,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    ReverseKLLoss,
    build_dkd,
    build_forward_kl,
    build_generalized_jsd,
    build_reverse_kl,
)
from kd_plugins.errors import IncompatibleModelsError
from kd_plugins.functional import dkd, forward_kl, generalized_jsd, reverse_kl
from kd_plugins.plugins import available_components, build_registry
from kd_plugins.types import BatchContext, ModelCapture, ModelInfo, Requirements

V = 19
STUDENT = ModelInfo(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=V, name="tiny-s")
TEACHER = ModelInfo(hidden_size=12, num_layers=3, num_heads=3, num_kv_heads=3, head_dim=4, vocab_size=V, name="tiny-t")

TERMS = [
    (ForwardKLLoss, build_forward_kl, forward_kl, {}),
    (ReverseKLLoss, build_reverse_kl, reverse_kl, {}),
    (GeneralizedJSDLoss, build_generalized_jsd, generalized_jsd, {"beta": 0.4}),
    (DecoupledKDLoss, build_dkd, dkd, {"alpha": 1.0, "beta": 0.5}),
]
IDS = [cls.__name__ for cls, *_ in TERMS]


def make_captures(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    student = ModelCapture(
        info=STUDENT,
        final_hidden=torch.randn(2, 5, 8, generator=g).requires_grad_(True),
        lm_head_weight=(torch.randn(V, 8, generator=g) * 0.5).requires_grad_(True),
        lm_head_bias=torch.randn(V, generator=g).requires_grad_(True) if bias else None,
        logit_scale=0.9,
        logit_softcap=4.0,
    )
    teacher = ModelCapture(
        info=TEACHER,
        final_hidden=torch.randn(2, 5, 12, generator=g),
        lm_head_weight=torch.randn(V, 12, generator=g) * 0.5,
        logit_scale=1.2,
        logit_softcap=None,
    )
    hf_labels = torch.randint(0, V, (2, 5), generator=g)
    hf_labels[0, :2] = -100
    return student, teacher, hf_labels


def explicit_logits(capture):
    logits = torch.nn.functional.linear(capture.final_hidden, capture.lm_head_weight, capture.lm_head_bias)
    logits = logits * capture.logit_scale
    if capture.logit_softcap is not None:
        logits = capture.logit_softcap * torch.tanh(logits / capture.logit_softcap)
    return logits


@pytest.mark.parametrize("cls, builder, fn, options", TERMS, ids=IDS)
def test_term_matches_functional_on_model_logits(cls, builder, fn, options):
    student, teacher, hf_labels = make_captures()
    batch = BatchContext.from_inputs(labels=hf_labels, num_items_in_batch=11)
    term = builder(student=STUDENT, teacher=TEACHER, temperature=2.0, chunk_size=3, **options)
    assert isinstance(term, cls) and term.family == "logit"
    assert term.requirements() == Requirements(final_hidden=True)
    loss = term(student, teacher, batch)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    # HF (unshifted) labels: logits[:, :-1] predict labels[:, 1:]
    want = fn(
        explicit_logits(student)[:, :-1], explicit_logits(teacher).detach()[:, :-1], hf_labels[:, 1:],
        temperature=2.0, num_items_in_batch=11, **options,
    )
    params = [student.final_hidden, student.lm_head_weight, student.lm_head_bias]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_only_student_gets_gradients():
    student, teacher, hf_labels = make_captures(bias=False)
    teacher.final_hidden.requires_grad_(True)
    teacher.lm_head_weight.requires_grad_(True)
    ForwardKLLoss()(student, teacher, BatchContext.from_inputs(labels=hf_labels)).backward()
    assert student.final_hidden.grad is not None and student.lm_head_weight.grad is not None
    assert teacher.final_hidden.grad is None and teacher.lm_head_weight.grad is None


@pytest.mark.parametrize("cls, builder, fn, options", TERMS, ids=IDS)
def test_all_masked_batch_is_zero(cls, builder, fn, options):
    student, teacher, hf_labels = make_captures()
    batch = BatchContext.from_inputs(labels=torch.full_like(hf_labels, -100))
    loss = cls(**options)(student, teacher, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.final_hidden.grad, torch.zeros_like(student.final_hidden))


def test_missing_final_hidden_is_a_clear_error():
    student, teacher, hf_labels = make_captures()
    teacher.final_hidden = None
    with pytest.raises(ValueError, match="teacher's final hidden states.*'tiny-t'"):
        ForwardKLLoss()(student, teacher, BatchContext.from_inputs(labels=hf_labels))


@pytest.mark.parametrize("cls, builder, fn, options", TERMS, ids=IDS)
def test_builder_rejects_vocabulary_mismatch(cls, builder, fn, options):
    other = ModelInfo(hidden_size=12, num_layers=3, num_heads=3, num_kv_heads=3, head_dim=4, vocab_size=32, name="big")
    with pytest.raises(IncompatibleModelsError, match=r"'tiny-s'.*vocab_size=19.*'big'.*vocab_size=32.*same tokenizer"):
        builder(student=STUDENT, teacher=other)


@pytest.mark.parametrize("cls, builder, fn, options", TERMS, ids=IDS)
def test_builder_rejects_unknown_and_bad_options(cls, builder, fn, options):
    with pytest.raises(TypeError, match="gamma"):
        builder(student=STUDENT, teacher=TEACHER, gamma=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        builder(student=STUDENT, teacher=TEACHER, temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        builder(student=STUDENT, teacher=TEACHER, chunk_size=0)


def test_loss_specific_option_validation():
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.2"):
        GeneralizedJSDLoss(beta=1.2)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        DecoupledKDLoss(alpha=-1)
    assert "beta=0.5" in repr(DecoupledKDLoss(beta=0.5))


def test_registered_through_the_plugin_hook():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(logit_plugin, name="kd_plugins.components.logit")
    registry = build_registry(pm)["logit"]
    assert {name: c.builder for name, c in registry.items()} == {
        "forward_kl": build_forward_kl,
        "reverse_kl": build_reverse_kl,
        "generalized_jsd": build_generalized_jsd,
        "dkd": build_dkd,
    }


def test_available_components_lists_the_builtins():
    logit = available_components()["logit"]
    for name in ("forward_kl", "reverse_kl", "generalized_jsd", "dkd"):
        assert logit[name] == "kd_plugins.components.logit"


@pytest.mark.parametrize("cls, builder, fn, options", TERMS, ids=IDS)
@pytest.mark.parametrize("k", [V, 6])
def test_term_uses_the_sparse_path_for_a_cached_teacher(cls, builder, fn, options, k):
    student, teacher, hf_labels = make_captures()
    batch = BatchContext.from_inputs(labels=hf_labels, num_items_in_batch=11)
    term = builder(student=STUDENT, teacher=TEACHER, temperature=2.0, chunk_size=3, **options)
    dense = term(student, teacher, batch)
    top = torch.log_softmax(explicit_logits(teacher).detach().double(), -1).topk(k, -1)
    cached = ModelCapture(info=TEACHER, topk_logprobs=top.values.float(), topk_indices=top.indices.int())
    sparse = term(student, cached, batch)
    params = [student.final_hidden, student.lm_head_weight, student.lm_head_bias]
    if k == V:  # the whole vocabulary cached: the dense loss
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        for got, ref in zip(torch.autograd.grad(sparse, params), torch.autograd.grad(dense, params)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    else:  # against the independent float64 reference of the bucket formulas (values and gradients)
        from tests.test_functional_sparse import sparse_reference_float64

        inputs = dict(student_hidden=student.final_hidden, student_weight=student.lm_head_weight,
                      topk_logprobs=cached.topk_logprobs, topk_indices=cached.topk_indices, labels=batch.labels,
                      student_bias=student.lm_head_bias)
        want, want_grads = sparse_reference_float64(term.loss_name, inputs, loss_kwargs=term.loss_kwargs,
                                                    temperature=2.0, student_logit_scale=0.9, student_softcap=4.0,
                                                    num_items_in_batch=11)
        assert sparse.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
        for got, ref in zip(torch.autograd.grad(sparse, params), want_grads):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-9)
        assert sparse.item() != pytest.approx(dense.item(), rel=1e-3)  # really the top-k form


def test_teacher_without_hidden_or_topk_is_a_clear_error():
    student, _, hf_labels = make_captures()
    with pytest.raises(ValueError, match="top-k log-probs"):
        DecoupledKDLoss()(student, ModelCapture(info=TEACHER), BatchContext.from_inputs(labels=hf_labels))
