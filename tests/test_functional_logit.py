"""Logit losses (functional and fused) against naive references: odd shapes, masks, temperatures, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.functional import chunked, kernels
from kd_plugins.functional import (
    dkd,
    forward_kl,
    fused_linear_kd,
    generalized_jsd,
    linear_kd_reference,
    reverse_kl,
    shift_labels,
)
from kd_plugins.functional.logit import _dkd_parts, _forward_kl_per_token

LOSSES = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.3}),
    "dkd": (dkd, {"alpha": 0.7, "beta": 1.9}),
}


# --- naive references: float64, full softmax, explicit per-token loops -------------------------------------


def _kl(p, q):
    return sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(len(p)) if p[j] > 0)


def naive_per_token(loss, s_row, t_row, label, temperature, **kw):
    ps = torch.softmax(s_row.double() / temperature, -1).tolist()
    pt = torch.softmax(t_row.double() / temperature, -1).tolist()
    if loss == "forward_kl":
        value = _kl(pt, ps)
    elif loss == "reverse_kl":
        value = _kl(ps, pt)
    elif loss == "generalized_jsd":
        beta = kw["beta"]
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        value = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif loss == "dkd":
        value = kw["alpha"] * naive_tckd(ps, pt, label) + kw["beta"] * naive_nckd(ps, pt, label)
    else:
        raise AssertionError(loss)
    return value * temperature**2


def naive_tckd(ps, pt, label):
    return _kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])


def naive_nckd(ps, pt, label):
    rest_s = [p for j, p in enumerate(ps) if j != label]
    rest_t = [p for j, p in enumerate(pt) if j != label]
    return _kl([p / sum(rest_t) for p in rest_t], [p / sum(rest_s) for p in rest_s])


def naive_loss(loss, s, t, labels, temperature=1.0, ignore_index=-100, num_items_in_batch=None, **kw):
    vocab = s.shape[-1]
    s2, t2, l2 = s.reshape(-1, vocab), t.reshape(-1, vocab), labels.reshape(-1)
    total, count = 0.0, 0
    for i in range(s2.shape[0]):
        if int(l2[i]) == ignore_index:
            continue
        total += naive_per_token(loss, s2[i], t2[i], int(l2[i]), temperature, **kw)
        count += 1
    denom = float(num_items_in_batch) if num_items_in_batch is not None else max(count, 1)
    return total / denom


def make_inputs(shape, vocab, *, dtype=torch.float32, masked=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=g, dtype=dtype) * 2
    t = torch.randn(*shape, vocab, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, vocab, shape, generator=g)
    labels = labels.masked_fill(torch.rand(shape, generator=g) < masked, -100)
    return s, t, labels


# --- functional level -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("shape", [(3, 7), (5,), ()], ids=["B3T7", "1d", "single"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_matches_naive_reference(loss, shape, temperature):
    fn, kw = LOSSES[loss]
    s, t, labels = make_inputs(shape, 11, masked=0.3 if shape else 0.0)
    got = fn(s, t, labels, temperature=temperature, **kw)
    want = naive_loss(loss, s, t, labels, temperature=temperature, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_temperature_squared_scaling(loss):
    fn, kw = LOSSES[loss]
    s, t, labels = make_inputs((2, 4), 9)
    # rescaling logits by T and using temperature T gives the T=1 loss times T**2
    base = fn(s, t, labels, **kw)
    scaled = fn(s * 3.0, t * 3.0, labels, temperature=3.0, **kw)
    assert scaled.item() == pytest.approx(9.0 * base.item(), rel=1e-4)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_normalisation(loss, as_tensor):
    fn, kw = LOSSES[loss]
    s, t, labels = make_inputs((3, 7), 11)
    count = int((labels != -100).sum())
    num = torch.tensor(40) if as_tensor else 40
    got = fn(s, t, labels, num_items_in_batch=num, **kw)
    mean = fn(s, t, labels, **kw)
    assert got.item() == pytest.approx(mean.item() * count / 40, rel=1e-5)
    assert got.item() == pytest.approx(naive_loss(loss, s, t, labels, num_items_in_batch=40, **kw), rel=1e-4)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_custom_ignore_index(loss):
    fn, kw = LOSSES[loss]
    s, t, labels = make_inputs((2, 5), 7)
    got = fn(s, t, labels.masked_fill(labels == -100, -1), ignore_index=-1, **kw)
    assert got.item() == pytest.approx(fn(s, t, labels, **kw).item(), rel=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_all_masked_is_exact_zero_with_zero_grads(loss):
    fn, kw = LOSSES[loss]
    s, t, _ = make_inputs((2, 3), 5)
    s.requires_grad_(True)
    labels = torch.full((2, 3), -100)
    out = fn(s, t, labels, **kw)
    assert out.item() == 0.0 and torch.isfinite(out)
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # also with a given normaliser of 0 (empty accumulation step)
    assert fn(s, t, labels, num_items_in_batch=0, **kw).item() == 0.0


@pytest.mark.parametrize("loss", list(LOSSES))
def test_zero_when_student_equals_teacher(loss):
    fn, kw = LOSSES[loss]
    s, _, labels = make_inputs((3, 7), 11)
    assert abs(fn(s, s.clone(), labels, temperature=2.0, **kw).item()) < 1e-6


@pytest.mark.parametrize("loss", list(LOSSES))
def test_gradcheck(loss):
    fn, kw = LOSSES[loss]
    s, t, labels = make_inputs((2, 3), 5, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, labels, temperature=1.7, **kw), (s, t))


def test_gradients_match_naive_autograd():
    # the rearranged per-token forms must give the same gradient as plain log_softmax KL
    s, t, labels = make_inputs((3, 4), 10)
    s.requires_grad_(True)
    forward_kl(s, t, labels, temperature=2.0).backward()
    s2 = s.detach().clone().requires_grad_(True)
    mask = labels != -100
    log_ps = torch.log_softmax(s2 / 2, -1)
    log_pt = torch.log_softmax(t / 2, -1)
    per = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * 4
    (per[mask].sum() / mask.sum()).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_generalized_jsd_endpoints_are_kls():
    s, t, labels = make_inputs((3, 7), 11)
    for temperature in (1.0, 2.0):
        fwd = forward_kl(s, t, labels, temperature=temperature)
        rev = reverse_kl(s, t, labels, temperature=temperature)
        assert generalized_jsd(s, t, labels, beta=0.0, temperature=temperature).item() == pytest.approx(fwd.item())
        assert generalized_jsd(s, t, labels, beta=1.0, temperature=temperature).item() == pytest.approx(rev.item())
        # the endpoints are special cases (as in TRL): the mixture form itself vanishes as beta -> 0 (here ~3e-4,
        # four orders below the forward KL), and near 0 it is still the mixture form, not a rounded-off 0
        near0 = generalized_jsd(s.double(), t.double(), labels, beta=1e-4, temperature=temperature)
        want = naive_loss("generalized_jsd", s, t, labels, temperature=temperature, beta=1e-4)
        assert near0.item() == pytest.approx(want, rel=1e-6)
        assert 0 < near0.item() < 1e-3 * fwd.item()


def test_generalized_jsd_matches_trl():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL (extra 'trl') not installed")
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss
    s, t, labels = make_inputs((3, 7), 11)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temperature in (1.0, 2.0):
            ours = generalized_jsd(s, t, labels, beta=beta, temperature=temperature)
            # TRL: mean over unmasked tokens of the summed-over-vocab JSD, no T**2 factor
            theirs = trl_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
            assert ours.item() == pytest.approx(temperature**2 * theirs.item(), rel=1e-4, abs=1e-6)
        theirs = trl_loss(s, t, labels=labels, beta=beta, num_items_in_batch=torch.tensor(50))
        ours = generalized_jsd(s, t, labels, beta=beta, num_items_in_batch=torch.tensor(50))
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_identity_per_token(temperature):
    # KL(p_T || p_S) = TCKD + (1 - p_t^T) * NCKD, token by token
    s, t, labels = make_inputs((4, 6), 13, masked=0.0, dtype=torch.float64)
    s2, t2, l2 = s.reshape(-1, 13), t.reshape(-1, 13), labels.reshape(-1)
    tckd, nckd, log_pt_t = _dkd_parts(s2, t2, l2, temperature=temperature)
    kl = _forward_kl_per_token(s2, t2, l2, temperature=temperature) / temperature**2
    torch.testing.assert_close(kl, tckd + (1 - log_pt_t.exp()) * nckd, rtol=1e-10, atol=1e-12)
    for i in range(3):  # the parts themselves against the naive definitions
        ps = torch.softmax(s2[i] / temperature, -1).tolist()
        pt = torch.softmax(t2[i] / temperature, -1).tolist()
        assert tckd[i].item() == pytest.approx(naive_tckd(ps, pt, int(l2[i])), rel=1e-9)
        assert nckd[i].item() == pytest.approx(naive_nckd(ps, pt, int(l2[i])), rel=1e-9)


def test_dkd_with_unit_weights_differs_from_kl_by_confidence_weight():
    # DKD(1, 1) - KD = mean_t p_t^T * NCKD: DKD drops the (1 - p_t^T) weight on NCKD
    s, t, labels = make_inputs((3, 7), 11, dtype=torch.float64)
    mask = labels != -100
    _, nckd, log_pt_t = _dkd_parts(s[mask], t[mask], labels[mask], temperature=2.0)
    gap = dkd(s, t, labels, alpha=1.0, beta=1.0, temperature=2.0) - forward_kl(s, t, labels, temperature=2.0)
    assert gap.item() == pytest.approx(4.0 * (log_pt_t.exp() * nckd).mean().item(), rel=1e-4)
    assert gap.item() > 0


def test_dkd_is_stable_for_a_confident_teacher():
    s, t, labels = make_inputs((2, 3), 7, masked=0.0)
    t = t.scatter(-1, labels.unsqueeze(-1), 200.0)  # p_t^T == 1 in fp32
    s.requires_grad_(True)
    out = dkd(s, t, labels)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_causal_shift_convention():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    hf_labels = torch.randint(0, 9, (2, 6), generator=g)
    hf_labels[1, :2] = -100
    for loss, (fn, kw) in LOSSES.items():
        ours = fn(s, t, shift_labels(hf_labels), **kw)
        manual = fn(s[:, :-1], t[:, :-1], hf_labels[:, 1:], **kw)
        assert ours.item() == pytest.approx(manual.item(), rel=1e-6), loss


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t, l: forward_kl(s, t, l, temperature=0.0), "temperature must be > 0, got 0.0"),
        (lambda s, t, l: reverse_kl(s, t, l, temperature=-1), "temperature"),
        (lambda s, t, l: generalized_jsd(s, t, l, beta=1.5), r"beta must be in \[0, 1\], got 1.5"),
        (lambda s, t, l: dkd(s, t, l, alpha=-1.0), "alpha must be >= 0, got -1.0"),
        (lambda s, t, l: dkd(s, t, l, beta=-0.5), "beta must be >= 0, got -0.5"),
        (lambda s, t, l: forward_kl(s, t[..., :5], l), "V=7.*V=5.*same tokenizer"),
        (lambda s, t, l: forward_kl(s, t[:1], l), r"shape mismatch.*\(2, 3, 7\).*\(1, 3, 7\)"),
        (lambda s, t, l: forward_kl(s, t, l[:, :2]), r"labels shape \(2, 2\)"),
        (lambda s, t, l: dkd(s[..., :1], t[..., :1], l.clamp(max=0)), "at least 2 tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    s, t, labels = make_inputs((2, 3), 7)
    with pytest.raises(ValueError, match=match):
        call(s, t, labels)


# --- fused chunked level ---------------------------------------------------------------------------------------


def make_linear_inputs(shape=(3, 7), hs=12, ht=8, vocab=17, *, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        student_hidden=torch.randn(*shape, hs, generator=g, dtype=dtype).requires_grad_(True),
        student_weight=(torch.randn(vocab, hs, generator=g, dtype=dtype) * 0.5).requires_grad_(True),
        teacher_hidden=torch.randn(*shape, ht, generator=g, dtype=dtype),
        teacher_weight=torch.randn(vocab, ht, generator=g, dtype=dtype) * 0.5,
        labels=torch.randint(0, vocab, shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.3, -100),
    )
    if bias:
        inputs["student_bias"] = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_(True)
        inputs["teacher_bias"] = torch.randn(vocab, generator=g, dtype=dtype)
    return inputs


def _student_params(inputs):
    return [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if k in inputs]


def _assert_fused_equals_reference(inputs, options, *, tol=(1e-5, 1e-6), grad_tol=(1e-4, 1e-6)):
    """Value and student gradients of fused_linear_kd against linear_kd_reference; both must be finite."""
    params = _student_params(inputs)
    fused = fused_linear_kd(**inputs, **options)
    grads = torch.autograd.grad(fused, params)
    assert torch.isfinite(fused) and all(torch.isfinite(g).all() for g in grads)
    reference = linear_kd_reference(**inputs, **options)
    torch.testing.assert_close(fused, reference, rtol=tol[0], atol=tol[1])
    for got, want in zip(grads, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=grad_tol[0], atol=grad_tol[1])


HEADS = {
    "plain": {},
    "scaled": {"student_logit_scale": 0.8, "teacher_logit_scale": 1.3},
    "softcap_teacher": {"teacher_softcap": 2.0},
    "softcap_both": {"student_softcap": 3.0, "teacher_softcap": 2.0, "student_logit_scale": 1.5},
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_fused_matches_reference(loss, head, chunk_size):
    inputs = make_linear_inputs(bias=True)
    options = dict(loss=loss, loss_kwargs=LOSSES[loss][1], temperature=1.5, **HEADS[head])
    params = _student_params(inputs)
    fused = fused_linear_kd(**inputs, chunk_size=chunk_size, **options)
    grads = torch.autograd.grad(fused, params)
    reference = linear_kd_reference(**inputs, **options)
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_fused_reference_matches_functional_on_explicit_logits(loss):
    inputs = make_linear_inputs(bias=True)
    fn, kw = LOSSES[loss]
    with torch.no_grad():
        s = torch.nn.functional.linear(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
        t = torch.nn.functional.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"])
        s, t = 3.0 * torch.tanh(0.5 * s / 3.0), 2.0 * torch.tanh(t / 2.0)
    fused = fused_linear_kd(
        **inputs, loss=loss, loss_kwargs=kw, student_logit_scale=0.5, student_softcap=3.0, teacher_softcap=2.0,
        chunk_size=4,
    )
    assert fused.item() == pytest.approx(fn(s, t, inputs["labels"], **kw).item(), rel=1e-5)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", ["plain", "softcap_both"])
def test_fused_gradcheck(loss, head):
    inputs = make_linear_inputs(shape=(2, 3), hs=4, ht=3, vocab=6, dtype=torch.float64, bias=True)
    hidden, weight, bias = _student_params(inputs)
    rest = {k: v for k, v in inputs.items() if k not in ("student_hidden", "student_weight", "student_bias")}

    def f(h, w, b):
        return fused_linear_kd(h, w, student_bias=b, loss=loss, loss_kwargs=LOSSES[loss][1], chunk_size=2,
                               temperature=1.3, **HEADS[head], **rest)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_fused_num_items_and_all_masked():
    inputs = make_linear_inputs()
    count = int((inputs["labels"] != -100).sum())
    mean = fused_linear_kd(**inputs, chunk_size=4)
    summed = fused_linear_kd(**inputs, chunk_size=4, num_items_in_batch=torch.tensor(50))
    assert summed.item() == pytest.approx(mean.item() * count / 50, rel=1e-5)

    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    for loss in LOSSES:
        out = fused_linear_kd(**inputs, loss=loss, loss_kwargs=LOSSES[loss][1])
        assert out.item() == 0.0
        grads = torch.autograd.grad(out, _student_params(inputs))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_fused_frozen_student_head_and_no_teacher_grads():
    inputs = make_linear_inputs()
    inputs["student_weight"].requires_grad_(False)
    inputs["teacher_hidden"].requires_grad_(True)
    inputs["teacher_weight"].requires_grad_(True)
    fused_linear_kd(**inputs, chunk_size=3).backward()
    assert inputs["student_weight"].grad is None
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_weight"].grad is None
    want = torch.autograd.grad(
        linear_kd_reference(**inputs), inputs["student_hidden"]
    )[0]
    torch.testing.assert_close(inputs["student_hidden"].grad, want, rtol=1e-4, atol=1e-6)


def test_fused_zero_when_student_equals_teacher():
    inputs = make_linear_inputs(ht=12)
    inputs["teacher_hidden"] = inputs["student_hidden"].detach().clone()
    inputs["teacher_weight"] = inputs["student_weight"].detach().clone()
    for loss, (_, kw) in LOSSES.items():
        assert abs(fused_linear_kd(**inputs, loss=loss, loss_kwargs=kw).item()) < 1e-6


# bf16 tolerances, from the error of bf16 inputs against the float64 reference on the same (bf16-valued) inputs,
# measured by ``python tests/test_functional_logit.py`` over BF16_CASES x 8 seeds for every loss (T = 1.5).
# Worst case seen: value 1.1e-3 relative; gradients 7.6e-3 relative in norm, 1.4e-2 of the largest entry elementwise
# (the gradient is rounded to bf16 once at the end, the logits are computed from bf16 operands). The tolerances are
# about twice those, so a gradient 2 % off already fails (a 0.9 scaling is 10 % off in norm).
BF16_CASES = [((3, 7), 33, 4), ((2, 11), 64, 5), ((5, 3), 17, 1000)]
BF16_VALUE_RTOL, BF16_GRAD_NORM_RTOL, BF16_GRAD_MAX_RTOL = 2.5e-3, 1.5e-2, 3e-2


def _bf16_errors(loss, shape, vocab, chunk_size, seed):
    """(value, gradient norm-wise, gradient elementwise) relative errors of fused_linear_kd on bf16 inputs."""
    inputs = make_linear_inputs(shape=shape, vocab=vocab, dtype=torch.bfloat16, bias=True, seed=seed)
    options = dict(loss=loss, loss_kwargs=LOSSES[loss][1], temperature=1.5)
    params = _student_params(inputs)
    fused = fused_linear_kd(**inputs, chunk_size=chunk_size, **options)
    grads = torch.autograd.grad(fused, params)
    assert fused.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    as64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_floating_point(v) else v)
            for k, v in inputs.items()}
    reference = linear_kd_reference(**as64, **options)
    reference_grads = torch.autograd.grad(reference, _student_params(as64))
    value = abs(fused.item() - reference.item()) / abs(reference.item())
    norm = max(float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, reference_grads))
    elementwise = max(float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference_grads))
    return value, norm, elementwise


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", BF16_CASES, ids=["B3T7V33", "B2T11V64", "B5T3V17_one_chunk"])
def test_fused_bf16(loss, case):
    value, norm, elementwise = _bf16_errors(loss, *case, seed=0)
    assert value <= BF16_VALUE_RTOL, value
    assert norm <= BF16_GRAD_NORM_RTOL, norm
    assert elementwise <= BF16_GRAD_MAX_RTOL, elementwise


def test_fused_bad_inputs():
    inputs = make_linear_inputs()
    with pytest.raises(ValueError, match="V=17.*V=16.*same tokenizer"):
        fused_linear_kd(**{**inputs, "teacher_weight": inputs["teacher_weight"][:16]})
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 12\)"):
        fused_linear_kd(**{**inputs, "student_weight": inputs["student_weight"][:, :5]})
    with pytest.raises(ValueError, match="unknown loss 'kl'; allowed: dkd, forward_kl"):
        fused_linear_kd(**inputs, loss="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="student_softcap must be > 0"):
        fused_linear_kd(**inputs, student_softcap=0.0)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_kd(**inputs, loss="generalized_jsd", loss_kwargs={"beta": 2.0})
    with pytest.raises(TypeError, match="gamma"):
        fused_linear_kd(**inputs, loss="dkd", loss_kwargs={"gamma": 1.0})
    with pytest.raises(ValueError, match="leading"):
        fused_linear_kd(**{**inputs, "teacher_hidden": inputs["teacher_hidden"][:2]})


@pytest.mark.parametrize("loss", ["forward_kl", "dkd"])
def test_fused_under_no_grad(loss):
    inputs = make_linear_inputs()
    with torch.no_grad():
        value = fused_linear_kd(**inputs, loss=loss, chunk_size=4)
    assert not value.requires_grad
    assert value.item() == pytest.approx(linear_kd_reference(**inputs, loss=loss).item(), rel=1e-5)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", ["scaled", "softcap_both"])
def test_fused_row_blocks_inside_chunks(loss, head, monkeypatch):
    # elementwise work runs on row blocks of a chunk; force blocks of 2 rows inside chunks of 5
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * 17)
    inputs = make_linear_inputs(bias=True)
    options = dict(loss=loss, loss_kwargs=LOSSES[loss][1], temperature=2.5, **HEADS[head])
    params = _student_params(inputs)
    fused = fused_linear_kd(**inputs, chunk_size=5, **options)
    reference = linear_kd_reference(**inputs, **options)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", ["plain", "softcap_both"])
def test_fused_generic_engine_fallback_matches_analytic(loss, head, monkeypatch):
    # every built-in loss has an analytic kernel; the local-autograd engine stays as the fallback for others
    inputs = make_linear_inputs(bias=True)
    options = dict(loss=loss, loss_kwargs=LOSSES[loss][1], temperature=1.7, chunk_size=4, **HEADS[head])
    params = _student_params(inputs)
    analytic = fused_linear_kd(**inputs, **options)
    analytic_grads = torch.autograd.grad(analytic, params)
    monkeypatch.setattr(kernels, "KERNELS", {})
    generic = fused_linear_kd(**inputs, **options)
    torch.testing.assert_close(analytic, generic, rtol=1e-5, atol=1e-6)
    for got, want in zip(analytic_grads, torch.autograd.grad(generic, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.99, 1.0])
def test_fused_jsd_beta_extremes(beta):
    inputs = make_linear_inputs(bias=True)
    _assert_fused_equals_reference(
        inputs, dict(loss="generalized_jsd", loss_kwargs={"beta": beta}, temperature=0.7, chunk_size=3)
    )


def test_fused_dkd_confident_teacher_is_finite_and_exact():
    inputs = make_linear_inputs(bias=True)
    valid = inputs["labels"] != -100
    # a teacher bias that puts p_t^T at 1 in fp32 for label 3 rows
    inputs["labels"] = torch.where(valid, torch.full_like(inputs["labels"], 3), inputs["labels"])
    inputs["teacher_bias"] = torch.zeros(17).index_fill(0, torch.tensor([3]), 120.0)
    _assert_fused_equals_reference(inputs, dict(loss="dkd", loss_kwargs={"alpha": 1.0, "beta": 2.0}, chunk_size=4))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_fused_jsd_tail_that_underflows_in_both_models_is_finite_and_exact(beta):
    # vocabulary entries 30 logits below the rest at T=0.25 (scaled gap 120): p and q both underflow to exactly 0 in
    # fp32, so log m would be -inf without the clamp; the entries must contribute 0, as in the log-space reference
    inputs = make_linear_inputs(bias=True)
    tail = torch.tensor([2, 5, 11])
    with torch.no_grad():
        inputs["student_bias"].index_fill_(0, tail, -30.0)
    inputs["teacher_bias"] = inputs["teacher_bias"].index_fill(0, tail, -30.0)
    _assert_fused_equals_reference(
        inputs, dict(loss="generalized_jsd", loss_kwargs={"beta": beta}, temperature=0.25, chunk_size=4)
    )


@pytest.mark.parametrize("target", [0, 1, 16])
def test_fused_dkd_target_in_the_first_and_last_columns(target):
    # the kernel reads the non-target log-sum-exp off column 0, or column 1 where the target is 0
    inputs = make_linear_inputs(bias=True, dtype=torch.float64)
    valid = inputs["labels"] != -100
    inputs["labels"] = torch.where(valid, torch.full_like(inputs["labels"], target), inputs["labels"])
    _assert_fused_equals_reference(
        inputs, dict(loss="dkd", loss_kwargs={"alpha": 0.7, "beta": 3.0}, temperature=1.3, chunk_size=5),
        tol=(1e-10, 1e-12), grad_tol=(1e-9, 1e-12),
    )


if __name__ == "__main__":  # the bf16 error measurement behind BF16_*_RTOL
    torch.set_num_threads(1)
    for name in LOSSES:
        worst = [max(errors) for errors in zip(*(_bf16_errors(name, *case, seed=seed)
                                                  for case in BF16_CASES for seed in range(8)))]
        print(f"{name:16s} value {worst[0]:.2e}  gradient norm {worst[1]:.2e}  gradient elementwise {worst[2]:.2e}")
