"""kd_plugins.functional.alignment against naive references written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.functional import attention_relation, contrastive, hidden_cosine, hidden_mse

B, T = 2, 5


def _mask(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = mask[1, 0] = True  # at least two valid tokens
    return mask


def _feats(*shape, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


# --- naive references ---------------------------------------------------------------------------------------


def naive_infonce(s_rows, t_rows, temperature, symmetric=False):
    n = len(s_rows)
    s_hat = [r / r.norm() for r in s_rows]
    t_hat = [r / r.norm() for r in t_rows]

    def direction(a, b):
        total = 0.0
        for i in range(n):
            logits = torch.stack([torch.dot(a[i], b[j]) / temperature for j in range(n)])
            total = total - (logits[i] - torch.logsumexp(logits, 0))
        return total / n

    loss = direction(s_hat, t_hat)
    if symmetric:
        loss = 0.5 * (loss + direction(t_hat, s_hat))
    return loss


def naive_contrastive(s, t, mask, temperature, symmetric=False):
    rows = [(b, i) for b in range(s.shape[0]) for i in range(s.shape[1]) if mask[b, i]]
    return naive_infonce([s[b, i] for b, i in rows], [t[b, i] for b, i in rows], temperature, symmetric)


def naive_token_mean(s, t, mask, fn):
    values = [fn(s[b, i], t[b, i]) for b in range(s.shape[0]) for i in range(s.shape[1]) if mask[b, i]]
    return sum(values) / len(values)


def naive_relation(student_qkv, teacher_qkv, heads, sequence_ids, relations=("q", "k", "v")):
    total = 0.0
    for name in relations:
        idx = "qkv".index(name)
        xs, xt = student_qkv[idx], teacher_qkv[idx]
        ds, dt = xs.shape[-1] // heads, xt.shape[-1] // heads
        acc, rows = 0.0, 0
        for b in range(xs.shape[0]):
            for i in range(xs.shape[1]):
                if sequence_ids[b, i] < 0:
                    continue
                rows += 1
                keys = [j for j in range(i + 1) if sequence_ids[b, j] == sequence_ids[b, i]]
                for r in range(heads):
                    qs, qt = xs[b, i, r * ds : (r + 1) * ds], xt[b, i, r * dt : (r + 1) * dt]
                    ls = torch.stack([torch.dot(qs, xs[b, j, r * ds : (r + 1) * ds]) / math.sqrt(ds) for j in keys])
                    lt = torch.stack([torch.dot(qt, xt[b, j, r * dt : (r + 1) * dt]) / math.sqrt(dt) for j in keys])
                    ps, pt = ls.log_softmax(0), lt.log_softmax(0)
                    acc = acc + (pt.exp() * (pt - ps)).sum()
        total = total + acc / (rows * heads)
    return total / len(relations)


def _qkv(widths, seed, dtype=torch.float32, batch=B, seq=T, grad=False):
    return tuple(_feats(batch, seq, w, seed=seed + i, dtype=dtype, grad=grad) for i, w in enumerate(widths))


# --- contrastive --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_matches_reference(temperature, symmetric):
    s, t, mask = _feats(B, T, 6, seed=1), _feats(B, T, 6, seed=2), _mask(3)
    got = contrastive(s, t, mask, temperature=temperature, symmetric=symmetric)
    want = naive_contrastive(s, t, mask, temperature, symmetric)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_contrastive_tensor_temperature_gets_gradient():
    s, t, mask = _feats(B, T, 6, seed=1), _feats(B, T, 6, seed=2), _mask(3)
    tau = torch.tensor(0.2, requires_grad=True)
    loss = contrastive(s, t, mask, temperature=tau)
    torch.testing.assert_close(loss, naive_contrastive(s, t, mask, 0.2))
    loss.backward()
    assert tau.grad is not None and torch.isfinite(tau.grad) and tau.grad != 0


def test_contrastive_bf16_accumulates_in_fp32():
    s, t, mask = _feats(B, T, 6, seed=1), _feats(B, T, 6, seed=2), _mask(3)
    got = contrastive(s.bfloat16(), t.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = naive_contrastive(s.bfloat16().float(), t.bfloat16().float(), mask, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_contrastive_aligned_lower_than_shuffled():
    t = _feats(B, T, 10, seed=4)
    s = t + 0.05 * _feats(B, T, 10, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    shuffled = s.reshape(B * T, 10)[torch.randperm(B * T, generator=torch.Generator().manual_seed(0))].reshape(B, T, 10)
    aligned_loss = contrastive(s, t, mask, temperature=0.1)
    assert aligned_loss < contrastive(shuffled, t, mask, temperature=0.1)
    assert aligned_loss < 0.1


def test_contrastive_token_sampling_bounds_n_and_matches_reference():
    s, t = _feats(3, 7, 6, seed=6), _feats(3, 7, 6, seed=7)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 4:] = False  # N = 18 valid tokens
    got = contrastive(s, t, mask, max_tokens=4, generator=torch.Generator().manual_seed(123))
    rows = torch.randperm(18, generator=torch.Generator().manual_seed(123))[:4]
    want = naive_infonce(list(s[mask][rows]), list(t[mask][rows]), 0.07)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # not enough valid tokens to sample: all of them are used
    full = contrastive(s, t, mask, max_tokens=18, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full, naive_contrastive(s, t, mask, 0.07), rtol=1e-5, atol=1e-5)


def test_contrastive_single_valid_token_is_zero():
    s, t = _feats(B, T, 6, seed=1, grad=True), _feats(B, T, 6, seed=2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 2] = True
    loss = contrastive(s, t, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def test_contrastive_width_mismatch_is_clear():
    with pytest.raises(ValueError, match="widths differ.*student 6, teacher 10"):
        contrastive(_feats(B, T, 6), _feats(B, T, 10), _mask())


# --- hidden_mse / hidden_cosine -----------------------------------------------------------------------------


def test_hidden_mse_matches_reference():
    s, t, mask = _feats(B, T, 10, seed=1), _feats(B, T, 10, seed=2), _mask(4)
    want = naive_token_mean(s, t, mask, lambda a, b: ((a - b) ** 2).sum() / a.numel())
    torch.testing.assert_close(hidden_mse(s, t, mask), want)


def test_hidden_cosine_matches_reference():
    s, t, mask = _feats(B, T, 10, seed=1), _feats(B, T, 10, seed=2), _mask(4)
    want = naive_token_mean(s, t, mask, lambda a, b: 1 - torch.dot(a, b) / (a.norm() * b.norm()))
    torch.testing.assert_close(hidden_cosine(s, t, mask), want)
    assert hidden_cosine(t, t, mask).abs() < 1e-6


# --- shared contracts: all-masked, padding invariance, gradcheck --------------------------------------------


def _call(name, s, t, mask):
    if name == "contrastive":
        return contrastive(s, t, mask, temperature=0.3)
    if name == "mse":
        return hidden_mse(s, t, mask)
    if name == "cosine":
        return hidden_cosine(s, t, mask)
    # attention_relation on q/k/v built from the features (q full width, k/v halves: GQA-like)
    h = s.shape[-1] // 2
    ids = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -1, dtype=torch.long))
    return attention_relation((s, s[..., :h], s[..., h:]), (t, t[..., :h], t[..., h:]), relation_heads=1, sequence_ids=ids)


NAMES = ["contrastive", "mse", "cosine", "attention_relation"]


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_is_exact_zero_with_zero_grads(name):
    s, t = _feats(B, T, 6, seed=1, grad=True), _feats(B, T, 6, seed=2, grad=True)
    loss = _call(name, s, t, torch.zeros(B, T, dtype=torch.bool))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == 0.0
    loss.backward()
    for x in (s, t):
        assert x.grad is None or (torch.all(x.grad == 0) and torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance_even_with_nan_padding(name):
    s, t, mask = _feats(B, T, 6, seed=1), _feats(B, T, 6, seed=2), _mask(5)
    base = _call(name, s, t, mask)
    pad = 3
    s_pad = torch.cat([s, torch.full((B, pad, 6), float("nan"))], dim=1).requires_grad_(True)
    t_pad = torch.cat([t, 1e4 * _feats(B, pad, 6, seed=9)], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], dim=1)
    padded = _call(name, s_pad, t_pad, mask_pad)
    torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-6)
    padded.backward()
    assert torch.isfinite(s_pad.grad).all()
    assert torch.all(s_pad.grad[:, T:] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    s = _feats(1, 4, 4, seed=1, dtype=torch.float64, grad=True)
    t = _feats(1, 4, 4, seed=2, dtype=torch.float64, grad=True)
    mask = torch.tensor([[True, True, False, True]])
    assert _call(name, s, t, mask).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: _call(name, a, b, mask), (s, t))


# --- attention_relation -------------------------------------------------------------------------------------


def test_attention_relation_matches_reference_gqa_widths():
    student = _qkv((6, 2, 2), seed=10)  # 3 heads of 2, 1 kv head
    teacher = _qkv((10, 10, 10), seed=20)
    ids = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]])
    for relations in [("q", "k", "v"), ("k",), ("q", "v")]:
        got = attention_relation(student, teacher, relation_heads=2, sequence_ids=ids, relations=relations)
        torch.testing.assert_close(got, naive_relation(student, teacher, 2, ids, relations), rtol=1e-5, atol=1e-6)


def test_attention_relation_zero_when_student_equals_teacher():
    qkv = _qkv((8, 4, 4), seed=1)
    assert attention_relation(qkv, qkv, relation_heads=4).abs().item() < 1e-6


def test_attention_relation_is_causal():
    # Student and teacher agree on every token except the last. Causally, earlier rows never see the last
    # token, so they contribute exactly 0 and the loss is the last row's KL over all keys divided by T.
    teacher = _qkv((6, 6, 6), seed=1)
    student = tuple(x.clone() for x in teacher)
    for x in student:
        x[:, -1] = torch.randn(B, x.shape[-1], generator=torch.Generator().manual_seed(3))
    got = attention_relation(student, teacher, relation_heads=2)
    last_row = 0.0
    for xs, xt in zip(student, teacher):
        for b in range(B):
            for r in range(2):
                sl, tl = slice(3 * r, 3 * r + 3), slice(3 * r, 3 * r + 3)
                ps = (xs[b, :, sl] @ xs[b, -1, sl] / math.sqrt(3)).log_softmax(0)
                pt = (xt[b, :, tl] @ xt[b, -1, tl] / math.sqrt(3)).log_softmax(0)
                last_row = last_row + (pt.exp() * (pt - ps)).sum()
    torch.testing.assert_close(got, last_row / (3 * B * 2 * T), rtol=1e-5, atol=1e-6)


def test_attention_relation_packed_equals_unpacked():
    student = _qkv((8, 4, 4), seed=30, batch=1)
    teacher = _qkv((12, 6, 6), seed=40, batch=1)
    packed = attention_relation(student, teacher, relation_heads=2, sequence_ids=torch.tensor([[0, 0, 0, 1, 1]]))

    def unpack(x):  # rows [a0 a1 a2 pad pad] and [b0 b1 pad pad pad]
        rows = torch.zeros(2, T, x.shape[-1])
        rows[0, :3], rows[1, :2] = x[0, :3], x[0, 3:]
        return rows

    ids = torch.tensor([[0, 0, 0, -1, -1], [0, 0, -1, -1, -1]])
    unpacked = attention_relation(
        tuple(map(unpack, student)), tuple(map(unpack, teacher)), relation_heads=2, sequence_ids=ids
    )
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)


def test_attention_relation_heads_must_divide_widths():
    with pytest.raises(ValueError, match=r"relation_heads=4 does not divide the student k width 6.*GQA"):
        attention_relation(_qkv((12, 6, 6), seed=1), _qkv((12, 12, 12), seed=2), relation_heads=4)
    # only the selected relations are checked
    attention_relation(_qkv((12, 6, 6), seed=1), _qkv((12, 12, 12), seed=2), relation_heads=4, relations=("q",))
    with pytest.raises(ValueError, match="relations"):
        attention_relation(_qkv((4, 4, 4), 1), _qkv((4, 4, 4), 2), relation_heads=1, relations=("x",))


# --- boundaries, normalisers and messages (each test kills surviving mutants of benchmarks/mutation.py) --------


@pytest.mark.parametrize("fn, per_token", [
    (hidden_mse, lambda a, b: ((a - b) ** 2).sum() / a.numel()),
    (hidden_cosine, lambda a, b: 1 - torch.dot(a, b) / (a.norm() * b.norm())),
])
def test_regression_losses_divide_by_num_tokens_in_batch(fn, per_token):
    s, t, mask = _feats(B, T, 10, seed=1), _feats(B, T, 10, seed=2), _mask(4)
    total = naive_token_mean(s, t, mask, per_token) * int(mask.sum())
    torch.testing.assert_close(fn(s, t, mask, num_tokens_in_batch=23), total / 23)
    torch.testing.assert_close(fn(s, t, mask, num_tokens_in_batch=torch.tensor(23)), total / 23)


def test_attention_relation_divides_by_num_tokens_in_batch():
    student, teacher = _qkv((4, 4, 4), seed=0), _qkv((6, 6, 6), seed=10)
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[1, 3:] = -1
    mean = attention_relation(student, teacher, relation_heads=2, sequence_ids=ids)
    rows = int((ids >= 0).sum())
    torch.testing.assert_close(attention_relation(student, teacher, relation_heads=2, sequence_ids=ids,
                                                  num_tokens_in_batch=30), mean * rows / 30)


def test_contrastive_with_exactly_two_tokens_and_the_smallest_sample():
    s, t = _feats(B, T, 6, seed=1), _feats(B, T, 6, seed=2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True  # one positive and one negative per row
    got = contrastive(s, t, mask, temperature=0.5)
    assert got.item() > 0
    torch.testing.assert_close(got, naive_contrastive(s, t, mask, 0.5), rtol=1e-5, atol=1e-6)
    full = torch.ones(B, T, dtype=torch.bool)
    sampled = contrastive(s, t, full, max_tokens=2, generator=torch.Generator().manual_seed(5))
    rows = torch.randperm(B * T, generator=torch.Generator().manual_seed(5))[:2]
    torch.testing.assert_close(sampled, naive_infonce(list(s[full][rows]), list(t[full][rows]), 0.07),
                               rtol=1e-5, atol=1e-5)


def test_contrastive_single_token_with_a_learned_temperature_is_zero_with_zero_gradient():
    s, t = _feats(B, T, 6, seed=1, grad=True), _feats(B, T, 6, seed=2)
    tau = torch.tensor(0.2, requires_grad=True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2] = True
    loss = contrastive(s, t, mask, temperature=tau)
    assert loss.item() == 0.0
    loss.backward()
    assert tau.grad is not None and tau.grad.item() == 0.0 and torch.all(s.grad == 0)


@pytest.mark.parametrize("call, message", [
    (lambda: contrastive(_feats(B, T, 6), _feats(B, T, 6), _mask(), temperature=0.0),
     "contrastive: temperature must be > 0, got 0.0"),
    (lambda: contrastive(_feats(B, T, 6), _feats(B, T, 6), _mask(), max_tokens=1),
     "contrastive: max_tokens must be >= 2 (a positive and a negative), got 1"),
    (lambda: attention_relation(_qkv((4, 4, 4), seed=0)[:2], _qkv((4, 4, 4), seed=3), relation_heads=1),
     "attention_relation: student_qkv and teacher_qkv must be (q, k, v) tuples"),
    (lambda: attention_relation(_qkv((4, 4, 4), seed=0), _qkv((4, 4, 4), seed=3), relation_heads=0),
     "attention_relation: relation_heads must be a positive int, got 0"),
    (lambda: attention_relation(_qkv((4, 4, 4), seed=0), _qkv((4, 4, 4), seed=3, seq=T + 1), relation_heads=1),
     f"attention_relation: teacher q has shape {(B, T + 1, 4)}; expected (B, T, width) with (B, T) = {(B, T)}"),
    (lambda: attention_relation(_qkv((4, 4, 4), seed=0), _qkv((4, 4, 4), seed=3), relation_heads=1,
                                sequence_ids=torch.zeros(B, T + 1, dtype=torch.long)),
     f"attention_relation: sequence_ids has shape {(B, T + 1)}, expected {(B, T)}"),
])
def test_alignment_input_errors_in_full(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message
