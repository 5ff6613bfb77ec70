"""Representation terms across tokenizers: ``contrastive``, ``mse`` and ``cosine`` on a batch whose
``alignment`` is set compare span-pooled hidden states. Each against a float64 loop over the spans (pooling, the
term's own projector applied by hand, the loss), gradients included; masks; the all-masked batch is a finite 0."""

from __future__ import annotations

import pytest
import torch

from kd_plugins.alignment_spans import SpanAlignment
from kd_plugins.components.alignment import build_contrastive, build_cosine, build_mse
from kd_plugins.errors import ConfigError
from kd_plugins.types import BatchContext, ModelCapture, ModelInfo
from tests.test_functional_alignment import naive_infonce

STUDENT = ModelInfo(hidden_size=6, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=2, vocab_size=11, name="student")
TEACHER = ModelInfo(hidden_size=10, num_layers=3, num_heads=5, num_kv_heads=5, head_dim=2, vocab_size=17,
                    name="teacher")
TS, TT = 7, 5
# row 0: student splits what the teacher keeps whole and the other way round; row 1: padding on both sides
SPANS = [[(0, 2, 0, 1), (2, 3, 1, 3), (3, 6, 3, 4), (6, 7, 4, 5)], [(1, 2, 0, 1), (2, 4, 1, 2)]]


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = ModelCapture(info=STUDENT)
    teacher = ModelCapture(info=TEACHER)
    student.hidden_states[1] = torch.randn(2, TS, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher.hidden_states[2] = torch.randn(2, TT, 10, generator=g, dtype=torch.float64)
    alignment = SpanAlignment.from_spans(SPANS, student_length=TS, teacher_length=TT)
    mask = torch.tensor([[1] * TS, [1, 1, 1, 1, 0, 0, 0]])
    batch = BatchContext.from_inputs(input_ids=torch.zeros(2, TS, dtype=torch.long), attention_mask=mask)
    return student, teacher, BatchContext(**{**batch.__dict__, "alignment": alignment})


def _pooled(x, rows, side, mode):
    out = []
    for b, row in enumerate(rows):
        for s0, s1, t0, t1 in row:
            lo, hi = (s0, s1) if side == "student" else (t0, t1)
            out.append(x[b, lo:hi].mean(0) if mode == "mean" else x[b, hi - 1])
    return out


def _linear(projector, x):
    return x @ projector.weight.T + projector.bias


@pytest.mark.parametrize("mode", ["mean", "last"])
@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_regression_terms_match_a_loop_over_spans(name, mode):
    student, teacher, batch = _setup()
    build = {"mse": build_mse, "cosine": build_cosine}[name]
    term = build(student=STUDENT, teacher=TEACHER, layers=[[1, 2]], span_pooling=mode).double()
    with torch.no_grad():
        term.projectors[0].weight.normal_(generator=torch.Generator().manual_seed(3))
    loss = term(student, teacher, batch)
    hs, ht = student.hidden_states[1], teacher.hidden_states[2]
    s_spans, t_spans = _pooled(hs, SPANS, "student", mode), _pooled(ht, SPANS, "teacher", mode)
    sizes = [s1 - s0 for row in SPANS for s0, s1, _, _ in row]
    values = []
    for s, t in zip(s_spans, t_spans):
        p = _linear(term.projectors[0], s)
        values.append((p - t).pow(2).mean() if name == "mse" else 1 - torch.nn.functional.cosine_similarity(p, t, 0))
    reference = sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    (g_term,) = torch.autograd.grad(loss, hs, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, hs)
    torch.testing.assert_close(g_term, g_ref, rtol=1e-10, atol=1e-12)
    # the window's token count replaces this batch's count (a TOKENS term)
    windowed = term(student, teacher, BatchContext(**{**batch.__dict__, "num_tokens_in_batch": 40}))
    torch.testing.assert_close(windowed, reference * sum(sizes) / 40, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["mean", "last"])
def test_contrastive_matches_infonce_over_spans(mode):
    student, teacher, batch = _setup(1)
    term = build_contrastive(student=STUDENT, teacher=TEACHER, layers=[[1, 2]], proj_dim=4, temperature=0.5,
                             span_pooling=mode, max_tokens=64).double()
    loss = term(student, teacher, batch)
    hs, ht = student.hidden_states[1], teacher.hidden_states[2]
    s = [_linear(term.student_projectors[0], x) for x in _pooled(hs, SPANS, "student", mode)]
    t = [_linear(term.teacher_projectors[0], x) for x in _pooled(ht, SPANS, "teacher", mode)]
    reference = naive_infonce(s, t, 0.5)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    (g_term,) = torch.autograd.grad(loss, hs, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, hs)
    torch.testing.assert_close(g_term, g_ref, rtol=1e-10, atol=1e-12)


def test_masked_spans_are_left_out():
    student, teacher, batch = _setup(2)
    term = build_mse(student=STUDENT, teacher=TEACHER, layers=[[1, 2]]).double()
    restricted = batch.alignment.restricted_to(torch.tensor([[1] * TS, [1, 1, 1, 0, 0, 0, 0]]))  # row 1 span 1 cut
    loss = term(student, teacher, BatchContext(**{**batch.__dict__, "alignment": restricted}))
    kept = [SPANS[0], SPANS[1][:1]]
    s = _pooled(student.hidden_states[1], kept, "student", "mean")
    t = _pooled(teacher.hidden_states[2], kept, "teacher", "mean")
    sizes = [s1 - s0 for row in kept for s0, s1, _, _ in row]
    values = [(_linear(term.projectors[0], a) - b).pow(2).mean() for a, b in zip(s, t)]
    torch.testing.assert_close(loss, sum(v * n for v, n in zip(values, sizes)) / sum(sizes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", [build_mse, build_cosine, build_contrastive], ids=["mse", "cosine", "contrastive"])
def test_all_masked_spans_give_a_finite_zero_with_zero_gradients(build):
    student, teacher, batch = _setup(3)
    student.hidden_states[1].data[1] = float("nan")  # garbage in padding never leaks
    empty = batch.alignment.restricted_to(torch.zeros(2, TS, dtype=torch.bool))
    term = build(student=STUDENT, teacher=TEACHER, layers=[[1, 2]]).double()
    loss = term(student, teacher, BatchContext(**{**batch.__dict__, "alignment": empty}))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, student.hidden_states[1])
    assert torch.equal(grad, torch.zeros_like(grad))
    no_spans = SpanAlignment.from_spans([[], []], student_length=TS, teacher_length=TT)
    loss = term(student, teacher, BatchContext(**{**batch.__dict__, "alignment": no_spans}))
    assert loss.item() == 0.0


def test_the_span_terms_declare_cross_tokenizer_and_check_the_pooling():
    for build in (build_mse, build_cosine, build_contrastive):
        assert build(student=STUDENT, teacher=TEACHER, layers=[[1, 2]]).cross_tokenizer is True
        with pytest.raises(ConfigError, match=r"span_pooling='max' is invalid; expected one of \('mean', 'last'\)"):
            build(student=STUDENT, teacher=TEACHER, layers=[[1, 2]], span_pooling="max")
