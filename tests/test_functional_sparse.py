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


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def naive_sparse(loss, inputs, temperature=1.0, **kw):
    """Per-token float64 loops over the bucket definitions in the sparse module's docstring."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(inputs["student_hidden"], inputs["student_weight"],
                                            inputs["student_bias"]).double()
    vocab, k = logits.shape[-1], inputs["topk_indices"].shape[-1]
    total, count = 0.0, 0
    for z, lp, idx, t in zip(logits.reshape(-1, vocab), inputs["topk_logprobs"].double().reshape(-1, k),
                             inputs["topk_indices"].reshape(-1, k), inputs["labels"].reshape(-1)):
        t = int(t)
        if t == -100:
            continue
        count += 1
        p = torch.softmax(z / temperature, -1).tolist()
        top = idx.tolist()
        q_top = lp.exp().tolist()
        tail = max(1.0 - sum(q_top), TAIL_FLOOR)
        rest = [j for j in range(vocab) if j not in top]
        if loss == "dkd" and t not in top:
            q_t = min(min(q_top), tail)
            tq = [*q_top, q_t, tail - q_t]
            sp = [*(p[j] for j in top), p[t], sum(p[j] for j in rest if j != t)]
            target_col = k
        else:
            tq = [*q_top] + ([tail] if rest else [])
            sp = [*(p[j] for j in top)] + ([sum(p[j] for j in rest)] if rest else [])
            target_col = top.index(t) if t in top else None
        # temperature on the teacher buckets: log-probs / T, renormalised
        w = [math.exp(math.log(x) / temperature) if x > 0 else 0.0 for x in tq]
        tq = [x / sum(w) for x in w]
        if loss == "forward_kl":
            value = _kl(tq, sp)
        elif loss == "reverse_kl":
            value = _kl(sp, tq)
        elif loss == "generalized_jsd":
            b = kw["beta"]
            m = [b * a + (1 - b) * c for a, c in zip(tq, sp)]
            value = b * _kl(tq, m) + (1 - b) * _kl(sp, m)
        else:
            qt, pt = tq[target_col], sp[target_col]
            tckd = _kl([qt, 1 - qt], [pt, 1 - pt])
            qh = [x / (1 - qt) for j, x in enumerate(tq) if j != target_col]
            ph = [x / (1 - pt) for j, x in enumerate(sp) if j != target_col]
            value = kw["alpha"] * tckd + kw["beta"] * _kl(qh, ph)
        total += value * temperature**2
    return total / max(count, 1)


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
