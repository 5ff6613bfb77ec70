"""Property tests (hypothesis) over every functional loss.

For random shapes, masks (including all-masked), temperatures and loss options:

* the loss is finite;
* divergence-type losses are >= 0 (up to float rounding) and 0 when student == teacher;
* appending masked (padding) positions holding random garbage changes nothing;
* with ``num_items_in_batch`` the loss is ``token sum / num_items_in_batch``, so it scales as ``1/n``;
* an all-masked batch gives an exact 0 with zero gradients.

Inputs are drawn as (sizes, seed) and built with a torch generator: hypothesis shrinks the sizes, the seed keeps
each example reproducible. Runs are derandomised so CI sees the same examples every time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_plugins import functional
from kd_plugins.functional import (
    attention_relation,
    contrastive,
    fused_linear_kd,
    hidden_cosine,
    hidden_mse,
    normalize_token_sum,
)

PROPERTY = settings(
    max_examples=35, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
ATOL = 1e-5

LOGIT_LOSSES = ["forward_kl", "reverse_kl", "generalized_jsd", "dkd"]


# --- drawing inputs -------------------------------------------------------------------------------------------


@st.composite
def logit_case(draw, *, min_valid: int = 0):
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    temperature = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
    mask_mode = draw(st.sampled_from(["random", "all", "none"]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g) * scale
    teacher = torch.randn(batch, seq, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    if mask_mode == "random":
        labels = labels.masked_fill(torch.rand(batch, seq, generator=g) < 0.4, -100)
    elif mask_mode == "none":
        labels = torch.full_like(labels, -100)
    if int((labels != -100).sum()) < min_valid:
        labels[0, 0] = 0
    return student, teacher, labels, temperature, seed


@st.composite
def loss_and_options(draw):
    name = draw(st.sampled_from(LOGIT_LOSSES))
    options = {}
    if name == "generalized_jsd":
        options["beta"] = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    elif name == "dkd":
        options["alpha"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        options["beta"] = draw(st.sampled_from([0.0, 1.0, 2.0, 8.0]))
    return name, options


def _logit_fn(name):
    return getattr(functional, name)


def _pad(x: torch.Tensor, extra: int, fill) -> torch.Tensor:
    """Append ``extra`` positions along dim 1, filled by ``fill(shape)``."""
    shape = list(x.shape)
    shape[1] = extra
    return torch.cat([x, fill(shape).to(x.dtype)], dim=1)



# --- logit losses ---------------------------------------------------------------------------------------------

@PROPERTY
@given(case=logit_case(), loss=loss_and_options())
def test_logit_losses_finite_nonnegative_and_zero_on_identity(case, loss):
    student, teacher, labels, temperature, _ = case
    name, options = loss
    fn = _logit_fn(name)
    value = fn(student, teacher, labels, temperature=temperature, **options)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert torch.isfinite(value)
    # KL-type: >= 0 up to rounding that grows with the logit scale (per-token lse cancellations)
    assert value >= -1e-4 * (1 + float(student.abs().max())), float(value)
    same = fn(teacher, teacher.clone(), labels, temperature=temperature, **options)
    assert abs(float(same)) < 1e-4 * (1 + float(teacher.abs().max()))


@PROPERTY
@given(case=logit_case(), loss=loss_and_options(), extra=st.integers(1, 4))
def test_logit_losses_ignore_padding(case, loss, extra):
    student, teacher, labels, temperature, seed = case
    name, options = loss
    fn = _logit_fn(name)
    g = torch.Generator().manual_seed(seed + 1)
    garbage = lambda shape: torch.randn(*shape, generator=g) * 1e3  # noqa: E731 - huge but finite
    student_p = _pad(student, extra, garbage)
    teacher_p = _pad(teacher, extra, garbage)
    labels_p = torch.cat([labels, torch.full((labels.shape[0], extra), -100)], dim=1)
    expected = fn(student, teacher, labels, temperature=temperature, **options)
    got = fn(student_p, teacher_p, labels_p, temperature=temperature, **options)
    assert torch.equal(expected, got) or torch.allclose(expected, got, rtol=1e-6, atol=1e-7)


@PROPERTY
@given(case=logit_case(min_valid=1), loss=loss_and_options(), n=st.integers(1, 64))
def test_logit_losses_scale_as_one_over_num_items(case, loss, n):
    student, teacher, labels, temperature, _ = case
    name, options = loss
    fn = _logit_fn(name)
    valid = int((labels != -100).sum())
    mean = fn(student, teacher, labels, temperature=temperature, **options)
    by_n = fn(student, teacher, labels, temperature=temperature, num_items_in_batch=n, **options)
    by_tensor = fn(student, teacher, labels, temperature=temperature, num_items_in_batch=torch.tensor(n), **options)
    # mean == sum / valid, by_n == sum / n
    torch.testing.assert_close(by_n * n, mean * valid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_tensor, by_n)


@PROPERTY
@given(loss=loss_and_options(), batch=st.integers(1, 3), seq=st.integers(1, 5), vocab=st.integers(2, 9),
       n=st.sampled_from([None, 0, 7]))
def test_logit_losses_all_masked_is_exact_zero_with_zero_grad(loss, batch, seq, vocab, n):
    name, options = loss
    student = torch.randn(batch, seq, vocab, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab)
    labels = torch.full((batch, seq), -100)
    value = _logit_fn(name)(student, teacher, labels, num_items_in_batch=n, **options)
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0


@PROPERTY
@given(case=logit_case(), loss=loss_and_options(), hidden=st.integers(1, 8), chunk=st.integers(1, 7),
       n=st.sampled_from([None, 5]))
def test_fused_linear_kd_properties(case, loss, hidden, chunk, n):
    _, _, labels, temperature, seed = case
    name, options = loss
    vocab = int(case[0].shape[-1])
    g = torch.Generator().manual_seed(seed)
    shape = (*labels.shape, hidden)
    h_s = torch.randn(*shape, generator=g, requires_grad=True)
    h_t = torch.randn(*shape, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    w_t = torch.randn(vocab, hidden, generator=g)
    kwargs = dict(loss=name, loss_kwargs=options, temperature=temperature, num_items_in_batch=n, chunk_size=chunk)
    value = fused_linear_kd(h_s, w_s, h_t, w_t, labels, **kwargs)
    assert torch.isfinite(value) and float(value.detach()) >= -1e-4 * (1 + float((h_s @ w_s.T).detach().abs().max()))
    # equal to the unfused functional on the materialised logits
    reference = _logit_fn(name)(h_s @ w_s.T, (h_t @ w_t.T).detach(), labels, temperature=temperature,
                                num_items_in_batch=n, **options)
    torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)
    # zero on identity
    same = fused_linear_kd(h_t, w_t, h_t, w_t, labels, **kwargs)
    assert abs(float(same)) < 1e-4 * (1 + float((h_t @ w_t.T).abs().max()))
    # padding invariance
    extra = 3
    pad_h = lambda shp: torch.randn(*shp, generator=g) * 100  # noqa: E731
    labels_p = torch.cat([labels, torch.full((labels.shape[0], extra), -100)], dim=1)
    padded = fused_linear_kd(_pad(h_s.detach(), extra, pad_h), w_s, _pad(h_t, extra, pad_h), w_t, labels_p, **kwargs)
    torch.testing.assert_close(padded, value, rtol=1e-6, atol=1e-7)
    # gradients: finite, and exactly zero when all-masked
    value.backward()
    assert torch.isfinite(h_s.grad).all() and torch.isfinite(w_s.grad).all()
    if not (labels != -100).any():
        assert value.item() == 0.0
        assert torch.count_nonzero(h_s.grad) == 0 and torch.count_nonzero(w_s.grad) == 0


# --- alignment losses -----------------------------------------------------------------------------------------


@st.composite
def feature_case(draw):
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 6))
    dim = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    mask_mode = draw(st.sampled_from(["random", "all", "none"]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, dim, generator=g) * scale
    teacher = torch.randn(batch, seq, dim, generator=g) * scale
    if mask_mode == "random":
        mask = torch.rand(batch, seq, generator=g) > 0.4
    else:
        mask = torch.full((batch, seq), mask_mode == "all")
    return student, teacher, mask, seed


def _pad_features(student, teacher, mask, extra, seed):
    g = torch.Generator().manual_seed(seed + 7)
    garbage = lambda shape: torch.randn(*shape, generator=g) * 1e3  # noqa: E731
    return (
        _pad(student, extra, garbage),
        _pad(teacher, extra, garbage),
        torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1),
    )


REGRESSION = {"hidden_mse": hidden_mse, "hidden_cosine": hidden_cosine}


@PROPERTY
@given(case=feature_case(), name=st.sampled_from(sorted(REGRESSION)), extra=st.integers(1, 4))
def test_regression_alignment_properties(case, name, extra):
    student, teacher, mask, seed = case
    fn = REGRESSION[name]
    value = fn(student, teacher, mask)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value >= -ATOL
    if not mask.any():
        assert value.item() == 0.0
    # zero on identity (cosine needs non-zero vectors: scale >= 0.01 and randn make that so)
    assert abs(float(fn(teacher, teacher.clone(), mask))) < 1e-5 * (1 + float(teacher.abs().max()) ** 2)
    # padding invariance, even with huge garbage
    padded = fn(*_pad_features(student, teacher, mask, extra, seed))
    torch.testing.assert_close(padded, value, rtol=1e-6, atol=1e-7)


@PROPERTY
@given(case=feature_case(), extra=st.integers(1, 4), temperature=st.sampled_from([0.05, 0.1, 0.5, 1.0]),
       symmetric=st.booleans())
def test_contrastive_properties(case, extra, temperature, symmetric):
    student, teacher, mask, seed = case
    student = student.clone().requires_grad_(True)
    kwargs = dict(temperature=temperature, max_tokens=4096, symmetric=symmetric)
    value = contrastive(student, teacher, mask, **kwargs)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value >= -ATOL  # a cross-entropy
    n = int(mask.sum())
    if n < 2:  # no negatives: defined as exact 0 with zero gradient
        assert value.item() == 0.0
        value.backward()
        assert student.grad is None or torch.count_nonzero(student.grad) == 0
    else:
        # InfoNCE is bounded by log(n) plus the temperature-scaled margin: log-softmax over n logits in
        # [-1/τ, 1/τ] costs at most log(n) + 2/τ
        assert value <= math.log(n) + 2 / temperature + 1e-4
    # all tokens kept (max_tokens >= n): no sampling, so padding changes nothing
    padded = contrastive(*_pad_features(student.detach(), teacher, mask, extra, seed), **kwargs)
    torch.testing.assert_close(padded, value.detach(), rtol=1e-6, atol=1e-6)


@st.composite
def relation_case(draw):
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 6))
    heads = draw(st.sampled_from([1, 2]))
    width_s = heads * draw(st.integers(1, 4))
    width_t = heads * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    packed = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    student = tuple(torch.randn(batch, seq, width_s, generator=g) for _ in range(3))
    teacher = tuple(torch.randn(batch, seq, width_t, generator=g) * 2 for _ in range(3))
    if packed:
        starts = torch.rand(batch, seq, generator=g) < 0.3
        starts[:, 0] = True
        sequence_ids = torch.cumsum(starts.long(), dim=1) - 1
    else:
        sequence_ids = torch.zeros(batch, seq, dtype=torch.long)
    pad = torch.rand(batch, seq, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    sequence_ids = sequence_ids.masked_fill(pad, -1)
    relations = draw(st.sampled_from([("q", "k", "v"), ("q",), ("k", "v")]))
    return student, teacher, heads, sequence_ids, relations, seed


@PROPERTY
@given(case=relation_case(), extra=st.integers(1, 4))
def test_attention_relation_properties(case, extra):
    student, teacher, heads, sequence_ids, relations, seed = case
    kwargs = dict(relation_heads=heads, relations=relations)
    value = attention_relation(student, teacher, sequence_ids=sequence_ids, **kwargs)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value >= -ATOL
    if not (sequence_ids >= 0).any():
        assert value.item() == 0.0
    same = attention_relation(teacher, tuple(t.clone() for t in teacher), sequence_ids=sequence_ids, **kwargs)
    assert abs(float(same)) < 1e-5
    # padding appended at the end (sequence id -1, garbage values) changes nothing
    g = torch.Generator().manual_seed(seed + 3)
    garbage = lambda shape: torch.randn(*shape, generator=g) * 1e3  # noqa: E731
    ids_p = torch.cat([sequence_ids, torch.full((sequence_ids.shape[0], extra), -1)], dim=1)
    padded = attention_relation(
        tuple(_pad(x, extra, garbage) for x in student), tuple(_pad(x, extra, garbage) for x in teacher),
        sequence_ids=ids_p, **kwargs,
    )
    torch.testing.assert_close(padded, value, rtol=1e-6, atol=1e-7)


# --- the shared normaliser ------------------------------------------------------------------------------------


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(0, 20), n1=st.integers(1, 100), n2=st.integers(1, 100))
def test_normalize_token_sum_scales_as_one_over_n(seed, size, n1, n2):
    g = torch.Generator().manual_seed(seed)
    per_token = torch.rand(size, generator=g)
    mask = torch.rand(size, generator=g) > 0.5
    a = normalize_token_sum(per_token, mask, n1)
    b = normalize_token_sum(per_token, mask, torch.tensor(n2))
    torch.testing.assert_close(a * n1, b * n2, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(normalize_token_sum(per_token, torch.zeros_like(mask), 0))
