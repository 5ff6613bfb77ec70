"""What the functional losses promise beside their formulas: the value computed without gradients equals the value
with them (a separate code path in every engine), a non-default ``ignore_index`` is honoured, the model heads
(bias, logit scale, softcap) of both vocabularies in the cross-vocabulary losses, the result's dtype, the
checkpointed recompute, and every input check's exact message and boundary. Each expectation is an independent
computation (``F.cross_entropy``, float64 loops) or the same call with the defaults spelled out."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from kd_plugins.functional import cross_vocab as cross_vocab_module
from kd_plugins.functional import (
    cross_vocab_kd,
    forward_kl,
    fused_linear_kd,
    kernels,
    linear_kd_reference,
    uld,
)
from kd_plugins.functional.fused import linear_ce_reference
from kd_plugins.functional.sparse import sparse_kd_reference, sparse_linear_kd

from .test_cross_vocab import HS, HT, N, SHARED_S, SHARED_T, VS, VT, _naive_exact, _naive_sorted_l1, naive
from .test_cross_vocab import _inputs as cross_inputs
from .test_functional_logit import LOSSES as DENSE
from .test_functional_logit import make_linear_inputs
from .test_functional_sparse import LOSSES as SPARSE
from .test_functional_sparse import make_sparse_inputs

DENSE_HEADS = {"softcap_both": {"student_softcap": 3.0, "teacher_softcap": 2.0, "student_logit_scale": 1.5,
                                "teacher_logit_scale": 0.7},
               "scale_two": {"student_logit_scale": 2.0, "teacher_logit_scale": 2.0}}
SPARSE_HEADS = {"softcap": {"student_softcap": 3.0, "student_logit_scale": 1.5}, "scale_two": {"student_logit_scale": 2.0}}


def _exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


# --- the value without gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", list(DENSE))
@pytest.mark.parametrize("head", list(DENSE_HEADS))
@pytest.mark.parametrize("engine", ["analytic", "generic"])
def test_fused_value_without_gradients_equals_the_reference(loss, head, engine, monkeypatch):
    if engine == "generic":  # the local-autograd engine a registered loss without a kernel runs on
        monkeypatch.setattr(kernels, "KERNELS", {})
    inputs = make_linear_inputs(bias=True)
    options = dict(loss=loss, loss_kwargs=DENSE[loss][1], temperature=1.7, chunk_size=4, **DENSE_HEADS[head])
    with torch.no_grad():
        value = fused_linear_kd(**inputs, **options)
        reference = linear_kd_reference(**inputs, **options)
    assert not value.requires_grad
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_linear_kd(**inputs, **options).detach(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", list(SPARSE))
@pytest.mark.parametrize("head", list(SPARSE_HEADS))
def test_sparse_value_without_gradients_equals_the_reference(loss, head):
    inputs = make_sparse_inputs()
    options = dict(loss=loss, loss_kwargs=SPARSE[loss], temperature=2.0, chunk_size=4, **SPARSE_HEADS[head])
    with torch.no_grad():
        value = sparse_linear_kd(**inputs, **options)
        reference = sparse_kd_reference(**inputs, **options)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_linear_kd(**inputs, **options).detach(), value, rtol=1e-6, atol=1e-7)


def _student_ce(inputs, scale=1.0, softcap=None):
    logits = (inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]).double() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["labels"].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("grad", [True, False])
def test_the_task_loss_uses_the_student_bias_and_head_in_both_losses(grad):
    dense = make_linear_inputs(bias=True)
    sparse = make_sparse_inputs()
    head = {"student_logit_scale": 1.5, "student_softcap": 3.0}
    with torch.set_grad_enabled(grad):
        _, ce_dense = fused_linear_kd(**dense, return_task_loss=True, chunk_size=4, **head)
        _, ce_sparse = sparse_linear_kd(**sparse, return_task_loss=True, chunk_size=4, **head)
    torch.testing.assert_close(ce_dense.double(), _student_ce(dense, 1.5, 3.0).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_sparse.double(), _student_ce(sparse, 1.5, 3.0).detach(), rtol=1e-5, atol=1e-6)


# --- a non-default ignore_index --------------------------------------------------------------------------------


def _relabelled(inputs):
    out = dict(inputs)
    out["labels"] = inputs["labels"].masked_fill(inputs["labels"] == -100, -1)
    return out


@pytest.mark.parametrize("loss", list(DENSE))
def test_a_non_default_ignore_index_is_honoured(loss):
    dense = make_linear_inputs(bias=True)
    expected = linear_kd_reference(**dense, loss=loss, loss_kwargs=DENSE[loss][1]).detach()
    relabelled = _relabelled(dense)
    for fn in (fused_linear_kd, linear_kd_reference):
        got = fn(**relabelled, loss=loss, loss_kwargs=DENSE[loss][1], ignore_index=-1)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    ce = linear_ce_reference(relabelled["student_hidden"], relabelled["student_weight"], relabelled["labels"],
                             bias=relabelled["student_bias"], ignore_index=-1)
    torch.testing.assert_close(ce.double(), _student_ce(dense).detach(), rtol=1e-5, atol=1e-6)
    sparse = make_sparse_inputs()
    expected = sparse_kd_reference(**sparse, loss=loss, loss_kwargs=SPARSE[loss]).detach()
    for fn in (sparse_linear_kd, sparse_kd_reference):
        got = fn(**_relabelled(sparse), loss=loss, loss_kwargs=SPARSE[loss], ignore_index=-1)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    hs, ws, ht, wt, targets = cross_inputs()
    expected = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S, shared_teacher=SHARED_T, loss=loss,
                              loss_kwargs=DENSE[loss][1])
    got = cross_vocab_kd(hs, ws, ht, wt, targets.masked_fill(targets == -100, -1), shared_student=SHARED_S,
                         shared_teacher=SHARED_T, loss=loss, loss_kwargs=DENSE[loss][1], ignore_index=-1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --- the cross-vocabulary losses: heads, defaults, dtype, rows, checkpointing -----------------------------------


def _head(logits, bias, scale, softcap):
    logits = (logits + bias) * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _naive_with_heads(hs, ws, ht, wt, targets, *, heads, exact_weight, uld_weight, temperature):
    """A float64 loop over rows, as in test_cross_vocab.naive, with each side's bias, logit scale and softcap."""
    unshared_s = [i for i in range(VS) if i not in SHARED_S.tolist()]
    unshared_t = [i for i in range(VT) if i not in SHARED_T.tolist()]
    exact, ulds = [], []
    for n in range(N):
        target = int(targets[n])
        if target == -100:
            continue
        zs = _head(ws @ hs[n], heads["student_bias"], heads["student_logit_scale"], heads["student_softcap"])
        zt = _head(wt @ ht[n], heads["teacher_bias"], heads["teacher_logit_scale"], heads["teacher_softcap"])
        if exact_weight > 0:
            exact.append(_naive_exact(zs[SHARED_S], zt[SHARED_T], 0, "forward_kl", {}, temperature))
        ps, pt = torch.softmax(zs / temperature, 0), torch.softmax(zt / temperature, 0)
        if exact_weight > 0:
            ps, pt = ps[unshared_s], pt[unshared_t]
        ulds.append(_naive_sorted_l1(ps, pt))
    return exact_weight * sum(exact) / len(ulds) + uld_weight * sum(ulds) / len(ulds)


def _heads(seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"student_bias": torch.randn(VS, generator=g, dtype=torch.float64, requires_grad=True),
            "teacher_bias": torch.randn(VT, generator=g, dtype=torch.float64),
            "student_logit_scale": 2.0, "teacher_logit_scale": 0.6, "student_softcap": 2.5, "teacher_softcap": 1.5}


@pytest.mark.parametrize("exact_weight, uld_weight", [(0.0, 1.0), (1.0, 0.5)])
def test_cross_vocab_losses_apply_both_model_heads(exact_weight, uld_weight):
    hs, ws, ht, wt, targets = cross_inputs(4)
    heads = _heads()
    if exact_weight == 0:
        value = uld(hs, ws, ht, wt, targets, temperature=1.5, chunk_size=4, **heads)
    else:
        value = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S, shared_teacher=SHARED_T,
                               exact_weight=exact_weight, uld_weight=uld_weight, temperature=1.5, chunk_size=4,
                               **heads)
    reference = _naive_with_heads(hs, ws, ht, wt, targets, heads=heads, exact_weight=exact_weight,
                                  uld_weight=uld_weight, temperature=1.5)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    params = (hs, ws, heads["student_bias"])
    for got, want in zip(torch.autograd.grad(value, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_cross_vocab_defaults_dtype_and_a_single_row():
    hs, ws, ht, wt, targets = cross_inputs(6)
    shared = dict(shared_student=SHARED_S, shared_teacher=SHARED_T)
    spelled = cross_vocab_kd(hs, ws, ht, wt, targets, **shared, loss="forward_kl", exact_weight=1.0, uld_weight=1.0,
                             temperature=1.0, chunk_size=256)
    torch.testing.assert_close(cross_vocab_kd(hs, ws, ht, wt, targets, **shared), spelled, rtol=0, atol=0)
    assert spelled.dtype == torch.float64
    single = torch.full_like(targets, -100)
    single[3] = 5  # one valid row: the mean is that row's value
    value = cross_vocab_kd(hs, ws, ht, wt, single, **shared)
    torch.testing.assert_close(value, naive(hs, ws, ht, wt, single), rtol=1e-10, atol=1e-12)
    assert float(value.detach()) > 0
    value32 = cross_vocab_kd(hs.float(), ws.float(), ht.float(), wt.float(), targets, **shared)
    assert value32.dtype == torch.float32
    torch.testing.assert_close(value32.double(), spelled, rtol=1e-5, atol=1e-6)


def test_cross_vocab_chunks_are_recomputed_in_the_backward_only_when_a_gradient_is_needed(monkeypatch):
    calls = []
    logits = cross_vocab_module._logits

    def counting(*args):
        calls.append(1)
        return logits(*args)

    monkeypatch.setattr(cross_vocab_module, "_logits", counting)
    hs, ws, ht, wt, targets = cross_inputs(7)  # 7 valid rows: 4 chunks of 2
    value = uld(hs, ws, ht, wt, targets, chunk_size=2)
    assert len(calls) == 2 * 4  # both heads per chunk
    value.backward()
    assert len(calls) == 2 * 2 * 4  # checkpointed: the logits were freed and are recomputed
    calls.clear()
    frozen = [t.detach() for t in (hs, ws)]
    value = uld(*frozen, ht, wt, targets, chunk_size=2)  # gradients enabled, but nothing requires one
    assert len(calls) == 2 * 4 and not value.requires_grad


# --- input checks: exact messages and boundaries ----------------------------------------------------------------


def test_fused_input_checks():
    inputs = make_linear_inputs(bias=True)
    for name in ("student_softcap", "teacher_softcap"):
        with pytest.raises(ValueError, match=_exactly(f"{name} must be > 0 or None, got 0")):
            fused_linear_kd(**inputs, **{name: 0})
    value = fused_linear_kd(**inputs, student_softcap=0.5, teacher_softcap=0.5)  # any positive cap is valid
    torch.testing.assert_close(value, linear_kd_reference(**inputs, student_softcap=0.5, teacher_softcap=0.5))
    for name in ("student_bias", "teacher_bias"):
        for fn in (fused_linear_kd, linear_kd_reference):
            with pytest.raises(ValueError, match=_exactly(f"{name} must have shape (17,), got (18,)")):
                fn(**{**inputs, name: torch.zeros(18)})
    for name in ("student_softcap", "teacher_softcap"):
        with pytest.raises(ValueError, match=_exactly(f"{name} must be > 0 or None, got -1")):
            linear_kd_reference(**inputs, **{name: -1})
    with pytest.raises(ValueError, match=_exactly("teacher_weight must have shape (V, 8) to match teacher_hidden "
                                                  "(3, 7, 8), got (17, 9)")):
        fused_linear_kd(**{**inputs, "teacher_weight": torch.zeros(17, 9)})
    with pytest.raises(ValueError, match=_exactly("student_hidden (3, 7, 12) and teacher_hidden (3, 6, 8) must have "
                                                  "the same leading (token) shape")):
        fused_linear_kd(**{**inputs, "teacher_hidden": torch.zeros(3, 6, 8)})
    with pytest.raises(ValueError, match=_exactly("labels shape (3, 6) must equal the hidden states' leading shape "
                                                  "(3, 7) (labels aligned with positions, see shift_labels)")):
        fused_linear_kd(**{**inputs, "labels": inputs["labels"][:, :6]})


def test_dkd_needs_two_tokens():
    inputs = make_linear_inputs(vocab=1, bias=True)
    inputs["labels"] = inputs["labels"].clamp(max=0)
    with pytest.raises(ValueError, match=_exactly("dkd needs a vocabulary of at least 2 tokens, got V=1")):
        fused_linear_kd(**inputs, loss="dkd")
    inputs = make_linear_inputs(vocab=2, bias=True)
    inputs["labels"] = inputs["labels"].clamp(max=1)
    torch.testing.assert_close(fused_linear_kd(**inputs, loss="dkd"), linear_kd_reference(**inputs, loss="dkd"),
                               rtol=1e-5, atol=1e-6)


def test_sparse_input_checks():
    inputs = make_sparse_inputs()
    with pytest.raises(ValueError, match=_exactly("student_softcap must be > 0 or None, got 0")):
        sparse_linear_kd(**inputs, student_softcap=0)
    torch.testing.assert_close(sparse_linear_kd(**inputs, student_softcap=0.5),
                               sparse_kd_reference(**inputs, student_softcap=0.5))
    with pytest.raises(ValueError, match=_exactly("chunk_size must be a positive int, got 2.0")):
        sparse_linear_kd(**inputs, chunk_size=2.0)
    with pytest.raises(ValueError, match=_exactly("student_weight must have shape (V, 12) to match student_hidden "
                                                  "(3, 7, 12), got (17, 11)")):
        sparse_linear_kd(**{**inputs, "student_weight": torch.zeros(17, 11)})
    for fn in (sparse_linear_kd, sparse_kd_reference):
        with pytest.raises(ValueError, match=_exactly("student_bias must have shape (17,), got (16,)")):
            fn(**{**inputs, "student_bias": torch.zeros(16)})
        with pytest.raises(ValueError, match=_exactly("student_softcap must be > 0 or None, got -2")):
            fn(**inputs, student_softcap=-2)
    with pytest.raises(ValueError, match=_exactly("top-k teacher rows (3, 6) must match the student's token shape "
                                                  "(3, 7)")):
        sparse_linear_kd(**{**inputs, "topk_logprobs": inputs["topk_logprobs"][:, :6],
                            "topk_indices": inputs["topk_indices"][:, :6]})
    with pytest.raises(ValueError, match=_exactly("labels shape (3, 6) must equal the hidden states' leading shape "
                                                  "(3, 7) (labels aligned with positions, see shift_labels)")):
        sparse_linear_kd(**{**inputs, "labels": inputs["labels"][:, :6]})
    bad = inputs["topk_indices"].clone()
    bad[0, 0, 0] = 17  # one past the vocabulary
    with pytest.raises(ValueError, match=_exactly("topk_indices must be token ids in [0, 17); the teacher's "
                                                  "vocabulary does not match the student's")):
        sparse_linear_kd(**{**inputs, "topk_indices": bad})
    with pytest.raises(ValueError, match=_exactly("topk_logprobs (3, 7, 4) and topk_indices (3, 7, 5) must have the "
                                                  "same shape (..., k)")):
        sparse_linear_kd(**{**inputs, "topk_logprobs": inputs["topk_logprobs"][..., :4]})
    wide = {**inputs, "topk_logprobs": inputs["topk_logprobs"][..., [0] * 18],
            "topk_indices": inputs["topk_indices"][..., [0] * 18]}  # more entries than the vocabulary has tokens
    with pytest.raises(ValueError, match=_exactly("top-k size k=18 must be in [1, V=17]")):
        sparse_linear_kd(**wide)
    top1 = make_sparse_inputs(k=1)  # k = 1 is a valid top-k
    torch.testing.assert_close(sparse_linear_kd(**top1), sparse_kd_reference(**top1))


def test_cross_vocab_input_checks():
    hs, ws, ht, wt, targets = cross_inputs()
    shared = dict(shared_student=SHARED_S, shared_teacher=SHARED_T)
    with pytest.raises(ValueError, match=_exactly(f"aligned rows must be student_hidden (N, Hs), teacher_hidden "
                                                  f"(N, Ht) and targets (N,); got ({N}, {HS}), ({N}, {HT}), "
                                                  f"({N - 1},)")):
        uld(hs, ws, ht, wt, targets[:-1])
    for bad_hs, bad_ht in ((hs[:, None], ht), (hs, ht[:, None])):  # a 3-D side with the right number of rows
        with pytest.raises(ValueError, match="^aligned rows must be student_hidden"):
            uld(bad_hs, ws, bad_ht, wt, targets)
    with pytest.raises(ValueError, match=_exactly(f"LM heads must be (V, H) matching the hidden widths; got student "
                                                  f"({VS}, {HS}) for H={HS}, teacher ({VT}, {HT + 1}) for H={HT}")):
        uld(hs, ws, ht, torch.zeros(VT, HT + 1, dtype=wt.dtype), targets)
    with pytest.raises(ValueError, match=_exactly(f"LM heads must be (V, H) matching the hidden widths; got student "
                                                  f"({VS}, {HS + 1}) for H={HS}, teacher ({VT}, {HT}) for H={HT}")):
        uld(hs, torch.zeros(VS, HS + 1, dtype=ws.dtype), ht, wt, targets)
    for weights in ({"exact_weight": -1.0, "uld_weight": 1.0}, {"exact_weight": 1.0, "uld_weight": -0.5}):
        message = f"exact_weight={weights['exact_weight']} and uld_weight={weights['uld_weight']} must be >= 0"
        with pytest.raises(ValueError, match=_exactly(message)):
            cross_vocab_kd(hs, ws, ht, wt, targets, **shared, **weights)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match=_exactly(f"chunk_size must be a positive int, got {bad!r}")):
            cross_vocab_kd(hs, ws, ht, wt, targets, **shared, chunk_size=bad)
    for missing in ({"shared_student": None, "shared_teacher": SHARED_T},
                    {"shared_student": SHARED_S, "shared_teacher": None}):
        with pytest.raises(ValueError, match=_exactly("the exact-match part (exact_weight > 0) needs shared_student "
                                                      "and shared_teacher")):
            cross_vocab_kd(hs, ws, ht, wt, targets, **missing)
    with pytest.raises(ValueError, match=_exactly("shared_student (2, 3) and shared_teacher (2, 3) must be two 1-D "
                                                  "tensors of one length")):
        cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S.reshape(2, 3),
                       shared_teacher=SHARED_T.reshape(2, 3))
    for student_id, teacher_id in ((VS, 0), (0, VT)):  # one past either vocabulary
        with pytest.raises(ValueError, match=_exactly(f"shared token ids reach past a vocabulary (student {VS}, "
                                                      f"teacher {VT} rows)")):
            cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=torch.tensor([1, student_id]),
                           shared_teacher=torch.tensor([2, teacher_id]))
    last = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=torch.tensor([VS - 1]),
                          shared_teacher=torch.tensor([VT - 1]))  # the last ids are valid
    assert torch.isfinite(last)


def test_logit_losses_need_a_vocabulary_dimension():
    with pytest.raises(ValueError, match=_exactly("student_logits must have a vocabulary dimension (..., V)")):
        forward_kl(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0))


def test_logit_losses_check_the_labels_shape_and_upcast_low_precision_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    with pytest.raises(ValueError, match=_exactly("labels shape (2, 4) must equal the logits' leading shape (2, 5) "
                                                  "(labels aligned with positions, see shift_labels)")):
        forward_kl(s, t, labels[:, :4])
    low = forward_kl(s.bfloat16(), t.bfloat16(), labels)  # computed in fp32 from the bf16 values
    assert low.dtype == torch.float32
    assert torch.equal(low, forward_kl(s.bfloat16().float(), t.bfloat16().float(), labels))


@pytest.mark.parametrize("loss", list(SPARSE))
def test_the_sparse_reference_with_k_equal_to_the_vocabulary_is_the_dense_loss(loss):
    inputs, teacher_logits = make_sparse_inputs(k=17, teacher_logits=True)
    student_logits = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
    dense = {"forward_kl": forward_kl}.get(loss) or getattr(__import__("kd_plugins.functional", fromlist=[loss]), loss)
    expected = dense(student_logits, teacher_logits, inputs["labels"], temperature=1.5, **SPARSE[loss])
    got = sparse_kd_reference(**inputs, loss=loss, loss_kwargs=SPARSE[loss], temperature=1.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", ["none", "weight", "hidden"])
def test_gradients_follow_the_outputs_weight(bias, frozen):
    """3 * loss has three times the gradients of loss, whichever student tensors need one."""
    inputs = make_linear_inputs(bias=bias)
    name = {"weight": "student_weight", "hidden": "student_hidden"}.get(frozen)
    if name is not None:
        inputs[name] = inputs[name].detach()
    params = [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if k in inputs
              and inputs[k].requires_grad]
    got = torch.autograd.grad(3.0 * fused_linear_kd(**inputs, chunk_size=4), params)
    want = torch.autograd.grad(3.0 * linear_kd_reference(**inputs), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_task_grad_ratio_that_backward_does_not_follow_is_refused_with_the_ratio_it_saw():
    inputs = make_linear_inputs(bias=True)
    kd, ce = fused_linear_kd(**inputs, return_task_loss=True, task_grad_ratio=0.5, chunk_size=4)
    message = ("fused_linear_kd was called with task_grad_ratio=0.5, so the KD and CE gradients were combined before "
               "the LM head, but backward received CE / KD output gradients in the ratio {}. Use the outputs only as "
               "a * kd + a * task_grad_ratio * ce, or pass task_grad_ratio=None when the weights are not known before "
               "the forward (or the outputs are differentiated separately)")
    with pytest.raises(RuntimeError, match=_exactly(message.format(2))):
        (kd + 2.0 * ce).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=_exactly(message.format(0))):
        kd.backward()  # the CE output unused: its gradient is none, not half the KD one


def test_the_task_loss_alone_has_the_reference_gradients():
    inputs = make_linear_inputs(bias=True)
    params = [inputs[k] for k in ("student_hidden", "student_weight", "student_bias")]
    _, ce = fused_linear_kd(**inputs, return_task_loss=True, chunk_size=4)
    reference = linear_ce_reference(inputs["student_hidden"], inputs["student_weight"], inputs["labels"],
                                    bias=inputs["student_bias"])
    for a, b in zip(torch.autograd.grad(ce, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_bf16_task_loss_gradient_over_several_chunks():
    """bf16 inputs: the fused CE's gradients accumulated over chunks against a float64 reference. Measured relative
    errors (norm) 2.8e-3 to 4.9e-3 over seeds 0-4; the bound is 3x the largest, so a gradient off by 10 % fails."""
    inputs = make_linear_inputs(shape=(4, 9), vocab=33, bias=True, seed=3)
    low = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
           for k, v in inputs.items()}
    high = {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in low.items()}
    names = ("student_hidden", "student_weight", "student_bias")
    _, ce = fused_linear_kd(**low, return_task_loss=True, chunk_size=5)
    reference = linear_ce_reference(high["student_hidden"], high["student_weight"], high["labels"],
                                    bias=high["student_bias"])
    got = torch.autograd.grad(ce, [low[k] for k in names])
    want = torch.autograd.grad(reference, [high[k] for k in names])
    for name, a, b in zip(names, got, want):
        error = float((a.double() - b).norm() / b.norm())
        assert error < 1.5e-2, (name, error)


def test_a_task_grad_ratio_without_the_task_loss_is_refused():
    for fn, inputs in ((fused_linear_kd, make_linear_inputs()), (sparse_linear_kd, make_sparse_inputs())):
        with pytest.raises(ValueError, match=_exactly("task_grad_ratio only applies with return_task_loss=True")):
            fn(**inputs, task_grad_ratio=0.5)
