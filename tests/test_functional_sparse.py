"""Sparse (top-k teacher) logit losses: naive per-token bucket formulas, fused == reference (values and
gradients), k == V equals the dense loss, masks, temperatures, heads, chunk sizes."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.functional import fused_linear_kd, linear_kd_reference
from kd_plugins.functional.sparse import TAIL_FLOOR, sparse_kd_reference, sparse_linear_kd

LOSSES = {
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.3},
    "dkd": {"alpha": 0.7, "beta": 1.9},
}
HEADS = {
    "plain": {},
    "scaled_bias": {"student_logit_scale": 0.8},
    "softcap": {"student_softcap": 3.0, "student_logit_scale": 1.5},
}


def make_sparse_inputs(shape=(3, 7), hs=12, vocab=17, k=5, *, seed=0, dtype=torch.float32, teacher_logits=False):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    log_q = torch.log_softmax(t_logits, -1)
    top = log_q.topk(k, -1)
    labels = torch.randint(0, vocab, shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.3, -100)
    # make about half of the valid targets fall inside the top-k (DKD's two cases)
    inside = torch.rand(shape, generator=g) < 0.5
    labels = torch.where(inside & (labels != -100), top.indices[..., 0], labels)
    inputs = dict(
        student_hidden=torch.randn(*shape, hs, generator=g, dtype=dtype).requires_grad_(True),
        student_weight=(torch.randn(vocab, hs, generator=g, dtype=dtype) * 0.5).requires_grad_(True),
        topk_logprobs=top.values.to(dtype),
        topk_indices=top.indices.to(torch.int32),
        labels=labels,
        student_bias=torch.randn(vocab, generator=g, dtype=dtype).requires_grad_(True),
    )
    return (inputs, t_logits.to(dtype)) if teacher_logits else inputs


def _params(inputs):
    return [inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]]


# --- an independent float64 reference, written from the bucket formulas of the sparse module's docstring ----------
# Scalar float64 autograd, token by token and bucket by bucket; it shares no code with kd_plugins (the documented
# constants are written out: the 1e-6 tail floor, the default loss options).

DOCUMENTED_TAIL_FLOOR = 1e-6
DOCUMENTED_DEFAULTS = {"forward_kl": {}, "reverse_kl": {}, "generalized_jsd": {"beta": 0.5},
                       "dkd": {"alpha": 1.0, "beta": 2.0}}


def _kl(p, q):
    """KL between two lists of masses (python floats or 0-dim tensors); 0 * log 0 = 0."""
    return sum(a * (torch.log(torch.as_tensor(a)) - torch.log(torch.as_tensor(b))) for a, b in zip(p, q)
               if float(torch.as_tensor(a).detach()) > 0)


def _bucket_divergence(loss, q, p, target_bucket, options):
    """The dense loss between teacher buckets ``q`` and student buckets ``p`` (lists of 0-dim float64 tensors)."""
    if loss == "forward_kl":
        return _kl(q, p)
    if loss == "reverse_kl":
        return _kl(p, q)
    if loss == "generalized_jsd":
        beta = options["beta"]
        if beta == 0.0:  # the documented endpoints: forward and reverse KL
            return _kl(q, p)
        if beta == 1.0:
            return _kl(p, q)
        m = [beta * a + (1 - beta) * b for a, b in zip(q, p)]
        return beta * _kl(q, m) + (1 - beta) * _kl(p, m)
    qt, pt = q[target_bucket], p[target_bucket]
    tckd = _kl([qt, 1 - qt], [pt, 1 - pt])
    q_rest = [x / (1 - qt) for j, x in enumerate(q) if j != target_bucket]
    p_rest = [x / (1 - pt) for j, x in enumerate(p) if j != target_bucket]
    return options["alpha"] * tckd + options["beta"] * _kl(q_rest, p_rest)


def sparse_reference_float64(loss, inputs, *, loss_kwargs=None, temperature=1.0, student_logit_scale=1.0,
                             student_softcap=None, num_items_in_batch=None):
    """The sparse loss of ``inputs`` (as :func:`make_sparse_inputs` builds them) and its gradients with respect
    to the student's hidden states, LM head weight and bias, all in float64.

    Student: logits ``z = softcap(scale * (h @ W.T + b)) / T`` (``softcap(x) = c tanh(x / c)``), probabilities
    ``softmax(z)`` over the whole vocabulary, summed into the buckets. Teacher: ``q_j = exp(l_j)`` for the top-k,
    tail ``tau = max(1 - sum q_j, 1e-6)``; for DKD with the target outside the top-k, ``q_t = min(min_j q_j, tau)``
    split out of the tail. The teacher's bucket log-masses are divided by ``T`` and renormalised over the buckets
    (at ``T = 1`` this changes nothing unless rounding put the stored top-k mass above 1: the implementation's
    bucket losses are between normalised distributions).
    Every token's loss is multiplied by ``T**2``; the sum is divided by the valid-token count or by
    ``num_items_in_batch``."""
    options = {**DOCUMENTED_DEFAULTS[loss], **(loss_kwargs or {})}
    params = [inputs[name].detach().double().requires_grad_(True)
              for name in ("student_hidden", "student_weight", "student_bias")]
    hidden, weight, bias = params
    vocab, k = weight.shape[0], inputs["topk_indices"].shape[-1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for h, lp, idx, t in zip(hidden.reshape(-1, hidden.shape[-1]), inputs["topk_logprobs"].double().reshape(-1, k),
                             inputs["topk_indices"].reshape(-1, k).tolist(), inputs["labels"].reshape(-1).tolist()):
        if t == -100:
            continue
        count += 1
        z = (weight @ h + bias) * student_logit_scale
        if student_softcap is not None:
            z = student_softcap * torch.tanh(z / student_softcap)
        z = z / temperature
        e = torch.exp(z - z.max())
        p = [e[j] / e.sum() for j in range(vocab)]
        q_top = [math.exp(x) for x in lp.tolist()]
        tau = max(1.0 - sum(q_top), DOCUMENTED_TAIL_FLOOR)
        rest = [j for j in range(vocab) if j not in idx]
        target_bucket = idx.index(t) if t in idx else None
        if loss == "dkd" and t not in idx:  # the target gets its own bucket, split out of the tail
            q_t = min(min(q_top), tau)
            teacher = [*q_top, q_t, tau - q_t]
            student = [*(p[j] for j in idx), p[t], sum((p[j] for j in rest if j != t), torch.zeros(()))]
            target_bucket = k
        else:
            teacher = q_top + ([tau] if rest else [])
            student = [p[j] for j in idx] + ([sum(p[j] for j in rest)] if rest else [])
        # log-mass / T, renormalised over the buckets (at T = 1 a no-op unless the stored mass exceeds 1)
        powered = [x ** (1.0 / temperature) for x in teacher]
        teacher = [x / sum(powered) for x in powered]
        total = total + _bucket_divergence(loss, teacher, student, target_bucket, options) * temperature**2
    denominator = float(num_items_in_batch) if num_items_in_batch is not None else max(count, 1)
    value = total / denominator
    grads = torch.autograd.grad(value, params, allow_unused=True) if count else [torch.zeros_like(x) for x in params]
    return value.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, params)]


def naive_sparse(loss, inputs, temperature=1.0, **kw):
    """The value of :func:`sparse_reference_float64`."""
    return sparse_reference_float64(loss, inputs, loss_kwargs=kw, temperature=temperature)[0].item()


def _assert_matches_float64_reference(loss, inputs, *, chunk_size=4, **options):
    """sparse_linear_kd (value and student gradients) against sparse_reference_float64."""
    got = sparse_linear_kd(**inputs, loss=loss, chunk_size=chunk_size, **options)
    got_grads = torch.autograd.grad(got, _params(inputs))
    want, want_grads = sparse_reference_float64(loss, inputs, **options)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6 * float(w.abs().max()) + 1e-9, msg=name)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_sparse_matches_the_float64_reference_values_and_gradients(loss, head, temperature):
    _assert_matches_float64_reference(loss, make_sparse_inputs(), loss_kwargs=LOSSES[loss], temperature=temperature,
                                      **HEADS[head])


@pytest.mark.parametrize("loss, loss_kwargs", [
    ("generalized_jsd", {}), ("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 1.0}),
    ("generalized_jsd", {"beta": 0.9}), ("dkd", {}), ("dkd", {"alpha": 0.0, "beta": 1.0}),
    ("dkd", {"alpha": 2.0, "beta": 0.0}),
], ids=["jsd_default", "jsd_beta0", "jsd_beta1", "jsd_beta0.9", "dkd_default", "dkd_nckd_only", "dkd_tckd_only"])
def test_sparse_loss_options_and_defaults_match_the_float64_reference(loss, loss_kwargs):
    _assert_matches_float64_reference(loss, make_sparse_inputs(seed=1), loss_kwargs=loss_kwargs, temperature=1.5,
                                      **HEADS["softcap"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_sparse_num_items_in_batch_matches_the_float64_reference(loss):
    _assert_matches_float64_reference(loss, make_sparse_inputs(seed=2), loss_kwargs=LOSSES[loss], temperature=2.0,
                                      num_items_in_batch=40, **HEADS["scaled_bias"])


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("k", [16, 17], ids=["k=V-1", "k=V"])
def test_sparse_small_or_empty_tail_matches_the_float64_reference(loss, k):
    # k = V - 1: one tail token (DKD: split out whenever it is the target, leaving an empty tail); k = V: no tail
    _assert_matches_float64_reference(loss, make_sparse_inputs(k=k, seed=3), loss_kwargs=LOSSES[loss],
                                      temperature=1.3, **HEADS["softcap"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_sparse_tail_floor_when_the_stored_top_k_mass_exceeds_one(loss):
    # stored log-probs rounded up: the top-k mass is above 1, so the implied tail is floored at 1e-6
    inputs = make_sparse_inputs(k=12, seed=4)
    lp = inputs["topk_logprobs"].double()
    inputs["topk_logprobs"] = (lp - lp.logsumexp(-1, keepdim=True) + math.log1p(1e-3)).float()  # mass 1.001
    assert bool((inputs["topk_logprobs"].double().exp().sum(-1) > 1).all())
    _assert_matches_float64_reference(loss, inputs, loss_kwargs=LOSSES[loss], temperature=1.0)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_matches_naive_bucket_formulas(loss, temperature):
    inputs = make_sparse_inputs()
    got = sparse_linear_kd(**inputs, loss=loss, loss_kwargs=LOSSES[loss], temperature=temperature, chunk_size=4)
    want = naive_sparse(loss, inputs, temperature=temperature, **LOSSES[loss])
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_sparse_fused_matches_reference_values_and_grads(loss, head, chunk_size):
    inputs = make_sparse_inputs()
    options = dict(loss=loss, loss_kwargs=LOSSES[loss], temperature=1.5, **HEADS[head])
    fused = sparse_linear_kd(**inputs, chunk_size=chunk_size, **options)
    reference = sparse_kd_reference(**inputs, **options)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, _params(inputs)), torch.autograd.grad(reference, _params(inputs))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_sparse_row_blocks(loss, monkeypatch):
    from kd_plugins.functional import chunked

    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * 17)
    inputs = make_sparse_inputs()
    options = dict(loss=loss, loss_kwargs=LOSSES[loss], temperature=0.8, **HEADS["softcap"])
    fused = sparse_linear_kd(**inputs, chunk_size=5, **options)
    reference = sparse_kd_reference(**inputs, **options)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, _params(inputs)), torch.autograd.grad(reference, _params(inputs))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sparse_with_k_equal_vocab_is_the_dense_loss(loss, temperature):
    inputs, t_logits = make_sparse_inputs(k=17, teacher_logits=True)
    options = dict(loss=loss, loss_kwargs=LOSSES[loss], temperature=temperature)
    sparse = sparse_linear_kd(**inputs, chunk_size=4, **options)
    # dense: teacher "hidden" = identity, teacher head = its logits
    dense_inputs = {k: v for k, v in inputs.items() if not k.startswith("topk")}
    eye = torch.eye(17)
    dense = fused_linear_kd(**dense_inputs, teacher_hidden=t_logits, teacher_weight=eye, chunk_size=4, **options)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(sparse, _params(inputs)), torch.autograd.grad(dense, _params(inputs))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_sparse_gradcheck(loss):
    inputs = make_sparse_inputs(shape=(2, 3), hs=4, vocab=7, k=3, dtype=torch.float64)
    rest = {k: v for k, v in inputs.items() if k not in ("student_hidden", "student_weight", "student_bias")}

    def f(h, w, b):
        return sparse_linear_kd(h, w, student_bias=b, loss=loss, loss_kwargs=LOSSES[loss], chunk_size=2,
                                temperature=1.3, student_softcap=2.5, **rest)

    assert torch.autograd.gradcheck(f, tuple(_params(inputs)))


def test_sparse_all_masked_num_items_and_no_grad():
    inputs = make_sparse_inputs()
    count = int((inputs["labels"] != -100).sum())
    mean = sparse_linear_kd(**inputs)
    summed = sparse_linear_kd(**inputs, num_items_in_batch=torch.tensor(50))
    assert summed.item() == pytest.approx(mean.item() * count / 50, rel=1e-5)
    with torch.no_grad():
        assert sparse_linear_kd(**inputs).item() == pytest.approx(mean.item(), rel=1e-6)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    for loss in LOSSES:
        out = sparse_linear_kd(**inputs, loss=loss, loss_kwargs=LOSSES[loss])
        assert out.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out, _params(inputs)))


def test_sparse_bad_inputs():
    inputs = make_sparse_inputs()
    with pytest.raises(ValueError, match="same shape"):
        sparse_linear_kd(**{**inputs, "topk_logprobs": inputs["topk_logprobs"][..., :3]})
    with pytest.raises(ValueError, match=r"token ids in \[0, 17\)"):
        sparse_linear_kd(**{**inputs, "topk_indices": inputs["topk_indices"] + 17})
    with pytest.raises(ValueError, match="must match the student's token shape"):
        sparse_linear_kd(**{**inputs, "topk_indices": inputs["topk_indices"][:2],
                            "topk_logprobs": inputs["topk_logprobs"][:2]})
    with pytest.raises(ValueError, match="unknown loss"):
        sparse_linear_kd(**inputs, loss="kl")


def test_sparse_dkd_with_an_empty_tail_after_the_split_target_is_finite():
    # k = V - 1 and targets outside the top-k: the tail bucket R \ {t} is empty
    inputs = make_sparse_inputs(vocab=9, k=8)
    missing = (torch.arange(9).expand(*inputs["topk_indices"].shape[:-1], 9).unsqueeze(-1)
               != inputs["topk_indices"].long().unsqueeze(-2)).all(-1).float().argmax(-1)
    inputs["labels"] = torch.where(inputs["labels"] != -100, missing, inputs["labels"])
    out = sparse_linear_kd(**inputs, loss="dkd", loss_kwargs=LOSSES["dkd"], chunk_size=4)
    grads = torch.autograd.grad(out, _params(inputs))
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    assert out.item() == pytest.approx(naive_sparse("dkd", inputs, **LOSSES["dkd"]), rel=1e-4, abs=1e-6)
