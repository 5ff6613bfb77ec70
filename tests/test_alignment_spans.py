"""The span algebra of cross-tokenizer distillation: aligning two tokenizations of one text by character offsets,
padding the spans into tensors, and pooling token features over spans (against a plain loop, in float64)."""

from __future__ import annotations

import pytest
import torch

from kd_plugins.alignment_spans import SharedVocabulary, SpanAlignment, align_offsets, pool_spans


def _offsets(text, pieces):
    """Character ranges of ``pieces`` found left to right in ``text`` (a hand-made tokenization)."""
    out, at = [], 0
    for piece in pieces:
        start = text.index(piece, at)
        out.append((start, start + len(piece)))
        at = start + len(piece)
    return out


def test_identical_tokenizations_give_one_span_per_token():
    offsets = [(0, 3), (3, 7), (7, 9)]
    assert align_offsets(offsets, offsets) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]


def test_a_word_one_side_splits_and_the_other_does_not():
    text = "unbelievably long"
    student = _offsets(text, ["un", "believ", "ably", " long"])
    teacher = _offsets(text, ["unbeliev", "ably", " lo", "ng"])
    # "unbeliev" ends at 8, inside "believ" (2..8): both end at 8 -> first span; then "ably"; then " long" vs 2 tokens
    assert align_offsets(student, teacher) == [(0, 2, 0, 1), (2, 3, 1, 2), (3, 4, 2, 4)]


def test_whitespace_one_side_drops_stays_inside_the_spans():
    text = "tokenisation  is   fun"
    student = _offsets(text, ["token", "is", "ation", "  is", "   fun"])  # spaces inside tokens (byte-level style)
    teacher = _offsets(text, ["tokenisation", "is", "fun"])  # whitespace dropped (WordPiece style)
    assert align_offsets(student, teacher) == [(0, 3, 0, 1), (3, 4, 1, 2), (4, 5, 2, 3)]


def test_unicode_characters_split_into_byte_tokens_share_one_range():
    # byte-level BPE gives each byte of "—" a token with the character's range (11, 12): both join one span
    student = [(0, 5), (5, 10), (10, 11), (11, 12), (11, 12), (12, 15)]
    teacher = [(0, 5), (6, 10), (11, 12), (13, 15)]
    assert align_offsets(student, teacher) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 5, 2, 3), (5, 6, 3, 4)]


def test_special_tokens_join_no_span_and_a_tail_only_one_side_covers_closes_the_last_span():
    student = [(0, 0), (0, 3), (3, 6), (0, 0)]  # BOS ... EOS
    teacher = [(0, 3), (3, 5), (5, 8)]  # the teacher's text runs on past the student's
    assert align_offsets(student, teacher) == [(1, 2, 0, 1), (2, 3, 1, 3)]
    assert align_offsets([], teacher) == []


def test_from_spans_pads_rows_and_marks_comparable_next_positions():
    spans = [[(1, 2, 0, 1), (2, 4, 1, 2)], [(0, 1, 0, 2)]]
    al = SpanAlignment.from_spans(spans, student_length=5, teacher_length=3)
    assert al.student_span_ids.tolist() == [[-1, 0, 1, 1, -1], [0, -1, -1, -1, -1]]
    assert al.teacher_span_ids.tolist() == [[0, 1, -1], [0, 0, -1]]
    assert al.span_mask.tolist() == [[True, True], [True, False]]
    assert al.student_last.tolist() == [[1, 3], [0, 0]] and al.teacher_last.tolist() == [[0, 1], [1, 0]]
    assert al.student_size.tolist() == [[1, 2], [1, 0]]
    assert al.next_span_mask.tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="overlaps the previous span"):
        SpanAlignment.from_spans([[(0, 2, 0, 1), (1, 3, 1, 2)]], student_length=4, teacher_length=3)
    restricted = al.restricted_to(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert restricted.span_mask.tolist() == [[True, False], [True, False]]
    assert restricted.next_span_mask.tolist() == [[False, False], [False, False]]


def test_shared_vocabulary_needs_two_equal_1d_id_lists():
    with pytest.raises(ValueError, match="one length"):
        SharedVocabulary(torch.tensor([1, 2]), torch.tensor([3]))
    assert len(SharedVocabulary(torch.tensor([1, 2]), torch.tensor([3, 4]))) == 2


@pytest.mark.parametrize("mode", ["mean", "last"])
def test_pool_spans_matches_a_loop_and_its_gradient(mode):
    g = torch.Generator().manual_seed(0)
    spans = [[(0, 2, 0, 1), (2, 3, 1, 3), (4, 7, 3, 4)], [(1, 4, 0, 2)], []]
    al = SpanAlignment.from_spans(spans, student_length=7, teacher_length=4)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pooled = pool_spans(hidden, al.student_span_ids, al.student_last, al.num_spans, mode)
    reference = torch.zeros(3, al.num_spans, 5, dtype=torch.float64)
    for b, row in enumerate(spans):
        for k, (s0, s1, _, _) in enumerate(row):
            reference[b, k] = hidden[b, s0:s1].mean(0) if mode == "mean" else hidden[b, s1 - 1]
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-12)
    weights = torch.randn(pooled.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((pooled * weights).sum(), hidden)
    expected = torch.zeros_like(hidden)
    for b, row in enumerate(spans):
        for k, (s0, s1, _, _) in enumerate(row):
            if mode == "mean":
                expected[b, s0:s1] += weights[b, k] / (s1 - s0)
            else:
                expected[b, s1 - 1] += weights[b, k]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert pooled.dtype == torch.float64
    with pytest.raises(ValueError, match="mode='max' is invalid"):
        pool_spans(hidden, al.student_span_ids, al.student_last, al.num_spans, "max")
