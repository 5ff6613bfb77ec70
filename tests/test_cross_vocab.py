"""Logit terms across vocabularies: the exact-match path on the shared sub-vocabulary, ULD (sorted
probabilities, Boizard et al. 2024) and their hybrid -- functional and module forms against float64 loops over rows,
gradients included, chunked == unchunked, masks, the all-masked batch a finite 0."""

from __future__ import annotations


import pytest
import torch

from kd_plugins.alignment_spans import SharedVocabulary, SpanAlignment
from kd_plugins.components.cross_vocab import build_cross_vocab_kd, build_uld
from kd_plugins.errors import ConfigError
from kd_plugins.functional import cross_vocab_kd, dkd, generalized_jsd, reverse_kl, sorted_l1, uld
from kd_plugins.types import BatchContext, ModelCapture, ModelInfo

N, HS, HT, VS, VT = 9, 5, 7, 13, 17
SHARED_S = torch.tensor([0, 2, 3, 5, 8, 11])
SHARED_T = torch.tensor([4, 1, 16, 7, 9, 0])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(VS, HS, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(VT, HT, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 1, -100, 5, 12, 11, -100, 3, 4])
    return hs, ws, ht, wt, targets


def _naive_exact(zs, zt, target, loss, options, temperature):
    if loss == "forward_kl":
        ls = torch.log_softmax(zs / temperature, 0)
        lt = torch.log_softmax(zt / temperature, 0)
        return sum(lt[k].exp() * (lt[k] - ls[k]) for k in range(zs.numel())) * temperature**2
    fn = {"reverse_kl": reverse_kl, "generalized_jsd": generalized_jsd, "dkd": dkd}[loss]
    return fn(zs[None], zt[None], torch.tensor([target]), temperature=temperature, **options)


def _naive_sorted_l1(p, q):
    a = sorted(p.unbind(), key=lambda x: float(x.detach()), reverse=True)
    b = sorted(q.unbind(), key=lambda x: float(x.detach()), reverse=True)
    zero = p.new_zeros(())
    width = max(len(a), len(b))
    a, b = a + [zero] * (width - len(a)), b + [zero] * (width - len(b))
    return sum((x - y).abs() for x, y in zip(a, b))


def naive(hs, ws, ht, wt, targets, *, loss="forward_kl", options=None, exact_weight=1.0, uld_weight=1.0,
          temperature=1.0):
    options = options or {}
    shared_s, shared_t = SHARED_S.tolist(), SHARED_T.tolist()
    unshared_s = [i for i in range(VS) if i not in shared_s]
    unshared_t = [i for i in range(VT) if i not in shared_t]
    exact, ulds = [], []
    for n in range(N):
        target = int(targets[n])
        if target == -100:
            continue
        zs, zt = ws @ hs[n], wt @ ht[n]
        if exact_weight > 0 and not (loss == "dkd" and target not in shared_s):
            mapped = shared_s.index(target) if target in shared_s else 0
            exact.append(_naive_exact(zs[shared_s], zt[shared_t], mapped, loss, options, temperature))
        ps, pt = torch.softmax(zs / temperature, 0), torch.softmax(zt / temperature, 0)
        if exact_weight > 0:
            ps, pt = ps[unshared_s], pt[unshared_t]
        ulds.append(_naive_sorted_l1(ps, pt))
    mean = lambda xs: sum(xs) / len(xs) if xs else hs.new_zeros(())  # noqa: E731
    return exact_weight * mean(exact) + uld_weight * mean(ulds)


CASES = [
    ("forward_kl", {}, 1.0, 1.0, 1.0),
    ("forward_kl", {}, 1.0, 0.0, 2.0),
    ("reverse_kl", {}, 0.5, 2.0, 1.0),
    ("generalized_jsd", {"beta": 0.3}, 1.0, 1.0, 1.5),
    ("dkd", {"alpha": 1.0, "beta": 2.0}, 1.0, 0.5, 1.0),
]


@pytest.mark.parametrize("loss, options, exact_weight, uld_weight, temperature", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_cross_vocab_kd_matches_a_loop_with_gradients(loss, options, exact_weight, uld_weight, temperature,
                                                      chunk_size):
    hs, ws, ht, wt, targets = _inputs()
    value = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S, shared_teacher=SHARED_T, loss=loss,
                           loss_kwargs=options, exact_weight=exact_weight, uld_weight=uld_weight,
                           temperature=temperature, chunk_size=chunk_size)
    reference = naive(hs, ws, ht, wt, targets, loss=loss, options=options, exact_weight=exact_weight,
                      uld_weight=uld_weight, temperature=temperature)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(value, (hs, ws))
    expected = torch.autograd.grad(reference, (hs, ws))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_uld_compares_whole_sorted_distributions():
    hs, ws, ht, wt, targets = _inputs(1)
    value = uld(hs, ws, ht, wt, targets, temperature=2.0, chunk_size=3)
    reference = naive(hs, ws, ht, wt, targets, exact_weight=0.0, uld_weight=1.0, temperature=2.0)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(value, hs)[0], torch.autograd.grad(reference, hs)[0],
                               rtol=1e-9, atol=1e-12)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert float(sorted_l1(p, torch.tensor([[0.1, 0.7, 0.2]]))) == pytest.approx(0.0)  # a permutation: distance 0
    assert float(sorted_l1(p, torch.tensor([[0.5, 0.5]]))) == pytest.approx(0.2 + 0.3 + 0.1)


def test_dkd_leaves_out_rows_whose_target_is_not_shared():
    hs, ws, ht, wt, _ = _inputs(2)
    targets = torch.tensor([1, 4, 6, 7, 9, 10, 12, -100, 1])  # none of them shared
    value = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S, shared_teacher=SHARED_T, loss="dkd",
                           uld_weight=0.0)
    assert value.item() == 0.0


def test_all_masked_rows_give_a_finite_zero_with_zero_gradients():
    hs, ws, ht, wt, _ = _inputs(3)
    targets = torch.full((N,), -100)
    for exact in (0.0, 1.0):
        value = cross_vocab_kd(hs, ws, ht, wt, targets, shared_student=SHARED_S, shared_teacher=SHARED_T,
                               exact_weight=exact)
        assert value.item() == 0.0
        grads = torch.autograd.grad(value, (hs, ws))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = cross_vocab_kd(hs[:0], ws, ht[:0], wt, targets[:0], shared_student=SHARED_S, shared_teacher=SHARED_T)
    assert empty.item() == 0.0


# --- module form ------------------------------------------------------------------------------------------------

STUDENT = ModelInfo(hidden_size=HS, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=HS, vocab_size=VS)
TEACHER = ModelInfo(hidden_size=HT, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=HT, vocab_size=VT)
SPANS = [[(0, 2, 0, 1), (2, 3, 1, 3), (3, 5, 3, 4), (5, 6, 4, 5)], [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4)]]


def _captures(seed=4):
    g = torch.Generator().manual_seed(seed)
    student = ModelCapture(info=STUDENT, final_hidden=torch.randn(2, 6, HS, generator=g, dtype=torch.float64,
                                                                  requires_grad=True),
                           lm_head_weight=torch.randn(VS, HS, generator=g, dtype=torch.float64, requires_grad=True))
    teacher = ModelCapture(info=TEACHER, final_hidden=torch.randn(2, 5, HT, generator=g, dtype=torch.float64),
                           lm_head_weight=torch.randn(VT, HT, generator=g, dtype=torch.float64))
    labels = torch.tensor([[3, 0, 5, 11, 2, 1], [-100, 7, 2, 3, 0, 0]])
    alignment = SpanAlignment.from_spans(SPANS, student_length=6, teacher_length=5,
                                         shared_vocabulary=SharedVocabulary(SHARED_S, SHARED_T))
    batch = BatchContext(labels=labels, token_mask=torch.ones(2, 6, dtype=torch.bool),
                         sequence_ids=torch.zeros(2, 6, dtype=torch.long), alignment=alignment)
    return student, teacher, batch


def test_the_term_compares_the_last_tokens_of_spans_followed_by_a_span():
    student, teacher, batch = _captures()
    term = build_cross_vocab_kd(student=STUDENT, teacher=TEACHER, loss="generalized_jsd", beta=0.4, uld_weight=0.5,
                                temperature=1.3, chunk_size=2)
    value = term(student, teacher, batch)
    # by hand: the last span of each row has no next span; row 1 span 0's student target is -100
    rows = [(0, 1, 0), (0, 2, 2), (0, 4, 3), (1, 2, 2)]  # (row, student last, teacher last)
    hs = torch.stack([student.final_hidden[b, s] for b, s, _ in rows])
    ht = torch.stack([teacher.final_hidden[b, t] for b, _, t in rows])
    targets = torch.stack([batch.labels[b, s] for b, s, _ in rows])
    reference = cross_vocab_kd(hs, student.lm_head_weight, ht, teacher.lm_head_weight, targets,
                               shared_student=SHARED_S, shared_teacher=SHARED_T, loss="generalized_jsd",
                               loss_kwargs={"beta": 0.4}, uld_weight=0.5, temperature=1.3)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    uld_term = build_uld(student=STUDENT, teacher=TEACHER)
    torch.testing.assert_close(uld_term(student, teacher, batch),
                               uld(hs, student.lm_head_weight, ht, teacher.lm_head_weight, targets),
                               rtol=1e-12, atol=1e-12)
    assert term.cross_tokenizer and uld_term.cross_tokenizer and term.requirements().final_hidden


def test_the_term_needs_aligned_spans_and_checks_its_options():
    student, teacher, batch = _captures()
    term = build_uld(student=STUDENT, teacher=TEACHER)
    with pytest.raises(ValueError, match="set cross_tokenizer: true"):
        term(student, teacher, BatchContext(labels=batch.labels, token_mask=batch.token_mask,
                                            sequence_ids=batch.sequence_ids))
    with pytest.raises(ConfigError, match="loss='kl' is invalid"):
        build_cross_vocab_kd(student=STUDENT, teacher=TEACHER, loss="kl")
    with pytest.raises(ConfigError, match=r"\['alpha'\] do not apply to loss='forward_kl'"):
        build_cross_vocab_kd(student=STUDENT, teacher=TEACHER, alpha=2.0)
    with pytest.raises(ConfigError, match="both 0"):
        build_cross_vocab_kd(student=STUDENT, teacher=TEACHER, exact_weight=0, uld_weight=0)
    with pytest.raises(ConfigError, match="temperature"):
        build_uld(student=STUDENT, teacher=TEACHER, temperature=0)
