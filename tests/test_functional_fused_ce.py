"""``return_task_loss=True``: the student's cross-entropy from the fused (and sparse) logit pass equals the CE of
full logits, in value and in gradient, weighted independently of the KD loss."""

from __future__ import annotations

import pytest
import torch

from kd_plugins.functional import (
    fused_linear_kd,
    linear_ce_reference,
    linear_kd_reference,
    shift_labels,
    sparse_kd_reference,
    sparse_linear_kd,
)

B, T, H, HT, V, K = 2, 7, 8, 12, 50, 5


def _inputs(seed, *, all_masked=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, T, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64)
    raw = torch.randint(0, V, (B, T), generator=g)
    raw[0, :3] = -100
    if all_masked:
        raw[:] = -100
    labels = shift_labels(raw)  # HF labels -> aligned targets (label shift, -100 at the end)
    top = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).topk(K, -1)
    return hs, weight, bias, ht, wt, labels, top


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "generalized_jsd", "dkd"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("num_items", [None, 11])
def test_fused_ce_value_and_gradient(loss, softcap, sparse, num_items):
    hs, weight, bias, ht, wt, labels, top = _inputs(0)
    kw = dict(loss=loss, student_bias=bias, student_logit_scale=0.7, student_softcap=softcap, temperature=2.0,
              num_items_in_batch=num_items, chunk_size=4)
    if sparse:
        kd, ce = sparse_linear_kd(hs, weight, top.values, top.indices, labels, return_task_loss=True, **kw)
        kd_ref = sparse_kd_reference(hs, weight, top.values, top.indices, labels, **kw)
    else:
        kd, ce = fused_linear_kd(hs, weight, ht, wt, labels, return_task_loss=True, **kw)
        kd_ref = linear_kd_reference(hs, weight, ht, wt, labels, **kw)
    ce_ref = linear_ce_reference(hs, weight, labels, bias=bias, logit_scale=0.7, softcap=softcap,
                                 num_items_in_batch=num_items)
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_ref)
    # independent weights, and the CE alone (what a gradient probe asks for)
    for a, b in ((0.3, 1.7), (0.0, 1.0), (1.0, 0.0)):
        got = torch.autograd.grad(a * kd + b * ce, [hs, weight, bias], retain_graph=True)
        want = torch.autograd.grad(a * kd_ref + b * ce_ref, [hs, weight, bias], retain_graph=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


def test_all_masked_batch_gives_zero_and_zero_gradient():
    hs, weight, bias, ht, wt, labels, _ = _inputs(1, all_masked=True)
    kd, ce = fused_linear_kd(hs, weight, ht, wt, labels, student_bias=bias, return_task_loss=True)
    assert float(kd.detach()) == 0.0 and float(ce.detach()) == 0.0
    grads = torch.autograd.grad(kd + ce, [hs, weight, bias])
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_fp32_matches_the_float64_reference():
    hs, weight, bias, ht, wt, labels, _ = _inputs(2)
    args32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (hs, weight, bias)]
    kd, ce = fused_linear_kd(args32[0], args32[1], ht.float(), wt.float(), labels, student_bias=args32[2],
                             return_task_loss=True, chunk_size=3)
    ce_ref = linear_ce_reference(hs, weight, labels, bias=bias)
    torch.testing.assert_close(ce.double(), ce_ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(ce, args32)
    want = torch.autograd.grad(ce_ref, [hs, weight, bias])
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-6)


# --- task_grad_ratio: the CE gradient added to the KD gradient before the one LM-head projection ------------------


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "generalized_jsd", "dkd"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("ratio", [1.7, 0.0])
def test_combined_gradient_equals_the_weighted_sum_of_both(loss, softcap, sparse, ratio, monkeypatch):
    from kd_plugins.functional import chunked

    # several row blocks per chunk, so the CE buffer is reused across blocks
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * V)
    hs, weight, bias, ht, wt, labels, top = _inputs(3)
    kw = dict(loss=loss, student_bias=bias, student_logit_scale=0.7, student_softcap=softcap, temperature=2.0,
              num_items_in_batch=9, chunk_size=5)
    if sparse:
        kd, ce = sparse_linear_kd(hs, weight, top.values, top.indices, labels, return_task_loss=True,
                                  task_grad_ratio=ratio, **kw)
        kd_ref = sparse_kd_reference(hs, weight, top.values, top.indices, labels, **kw)
    else:
        kd, ce = fused_linear_kd(hs, weight, ht, wt, labels, return_task_loss=True, task_grad_ratio=ratio, **kw)
        kd_ref = linear_kd_reference(hs, weight, ht, wt, labels, **kw)
    ce_ref = linear_ce_reference(hs, weight, labels, bias=bias, logit_scale=0.7, softcap=softcap, num_items_in_batch=9)
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_ref)
    a = 0.6
    got = torch.autograd.grad(a * kd + a * ratio * ce, [hs, weight, bias])
    want = torch.autograd.grad(a * kd_ref + a * ratio * ce_ref, [hs, weight, bias])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("use", ["kd alone", "ce alone", "other ratio"])
def test_combined_gradient_refuses_other_weightings(use):
    hs, weight, bias, ht, wt, labels, _ = _inputs(4)
    kd, ce = fused_linear_kd(hs, weight, ht, wt, labels, student_bias=bias, return_task_loss=True,
                             task_grad_ratio=2.0)
    total = {"kd alone": kd, "ce alone": ce, "other ratio": kd + 3.0 * ce}[use]
    with pytest.raises(RuntimeError, match="task_grad_ratio=2"):
        torch.autograd.grad(total, [hs, weight])


def test_combined_gradient_on_an_all_masked_batch_is_zero():
    hs, weight, bias, ht, wt, labels, _ = _inputs(5, all_masked=True)
    kd, ce = fused_linear_kd(hs, weight, ht, wt, labels, student_bias=bias, return_task_loss=True,
                             task_grad_ratio=0.5)
    assert float(kd.detach()) == 0.0 and float(ce.detach()) == 0.0
    grads = torch.autograd.grad(kd + 0.5 * ce, [hs, weight, bias])
    assert all(torch.isfinite(g).all() and float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("ratio, return_task_loss, match", [
    (-1.0, True, "finite number >= 0"),
    (float("inf"), True, "finite number >= 0"),
    (1.0, False, "only applies with return_task_loss"),
])
def test_bad_task_grad_ratio(ratio, return_task_loss, match):
    hs, weight, bias, ht, wt, labels, _ = _inputs(6)
    with pytest.raises(ValueError, match=match):
        fused_linear_kd(hs, weight, ht, wt, labels, return_task_loss=return_task_loss, task_grad_ratio=ratio)
