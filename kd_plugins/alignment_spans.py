"""Aligned spans of two tokenizations of one text, and pooling hidden states over them.

A teacher with its own tokenizer reads the same text as the student but cuts it into other tokens. Both
tokenizations give every token its character range (``(start, end)`` offsets); :func:`align_offsets` groups the
tokens of each side into *spans* that cover the same text: a span ends where a student token and a teacher token
end at the same character. Tokens that cover no character (special tokens, ``start == end``) belong to no span.

:class:`SpanAlignment` holds the spans of a batch as padded tensors, and :func:`pool_spans` turns ``(B, T, H)``
hidden states into ``(B, S, H)`` span features (the mean of a span's tokens, or its last token), so a
representation term compares span ``s`` of the student with span ``s`` of the teacher exactly as it compares
tokens when both models share a tokenizer.

Pure: torch only, no tokenizer (the tokenizer-facing side is :mod:`kd_plugins.integrations.cross_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["POOLING_MODES", "SharedVocabulary", "SpanAlignment", "align_offsets", "pool_spans"]

POOLING_MODES = ("mean", "last")

Offsets = Sequence[tuple[int, int]]
# one span: [student_start, student_end) token indices, [teacher_start, teacher_end) token indices
Span = tuple[int, int, int, int]


def align_offsets(student: Offsets, teacher: Offsets) -> list[Span]:
    """Group two tokenizations of one text into spans covering the same text.

    Args:
        student, teacher: each token's character range ``(start, end)``, in token order (``return_offsets_mapping``
            of a Hugging Face fast tokenizer). Tokens with ``start >= end`` (special tokens) join no span.

    Returns:
        ``[(s0, s1, t0, t1), ...]``: student tokens ``s0..s1-1`` and teacher tokens ``t0..t1-1`` cover the same text,
        in text order. A span closes at the first character where a student token and a teacher token both end; a
        token that ends inside text already covered (two byte-level tokens of one character share its range) joins
        the span that covers it. Text that only one side covers (whitespace a tokenizer drops) stays inside the span
        around it. When the two sides never end together again, the rest is one span.
    """
    s_tokens = [i for i, (a, b) in enumerate(student) if b > a]
    t_tokens = [i for i, (a, b) in enumerate(teacher) if b > a]
    spans: list[Span] = []
    i = j = 0
    while i < len(s_tokens) and j < len(t_tokens):
        s_start, t_start = s_tokens[i], t_tokens[j]
        s_end_char, t_end_char = student[s_tokens[i]][1], teacher[t_tokens[j]][1]
        i, j = i + 1, j + 1
        while s_end_char != t_end_char:
            if s_end_char < t_end_char:
                if i == len(s_tokens):
                    break
                s_end_char = max(s_end_char, student[s_tokens[i]][1])
                i += 1
            else:
                if j == len(t_tokens):
                    break
                t_end_char = max(t_end_char, teacher[t_tokens[j]][1])
                j += 1
        if s_end_char != t_end_char:  # one side ran out: the rest of both sides is one span
            i, j = len(s_tokens), len(t_tokens)
        end_char = max(s_end_char, t_end_char)
        while i < len(s_tokens) and student[s_tokens[i]][1] <= end_char:
            i += 1
        while j < len(t_tokens) and teacher[t_tokens[j]][1] <= end_char:
            j += 1
        spans.append((s_start, s_tokens[i - 1] + 1, t_start, t_tokens[j - 1] + 1))
    if spans and (i < len(s_tokens) or j < len(t_tokens)):  # one side has text left the other never reaches
        s0, _, t0, _ = spans.pop()
        s1 = s_tokens[-1] + 1
        t1 = t_tokens[-1] + 1
        spans.append((s0, s1, t0, t1))
    return spans


@dataclass
class SharedVocabulary:
    """The tokens whose strings both vocabularies hold: ``student_ids[k]`` and ``teacher_ids[k]`` are one string.

    Attributes:
        student_ids, teacher_ids: ``(K,)`` long, the same length, each without repeats.
    """

    student_ids: Tensor
    teacher_ids: Tensor

    def __post_init__(self) -> None:
        if self.student_ids.shape != self.teacher_ids.shape or self.student_ids.dim() != 1:
            raise ValueError(f"SharedVocabulary: student_ids {tuple(self.student_ids.shape)} and teacher_ids "
                             f"{tuple(self.teacher_ids.shape)} must be two 1-D tensors of one length")

    def __len__(self) -> int:
        return int(self.student_ids.numel())

    def to(self, device: torch.device | str) -> "SharedVocabulary":
        return SharedVocabulary(self.student_ids.to(device), self.teacher_ids.to(device))


@dataclass
class SpanAlignment:
    """The aligned spans of one batch (``B`` rows, at most ``S`` spans a row), as tensors.

    Attributes:
        student_span_ids: ``(B, Ts)`` long, the span each student token belongs to, ``-1`` for none (padding,
            special tokens).
        teacher_span_ids: ``(B, Tt)`` long, the same for the teacher's tokens.
        span_mask: ``(B, S)`` bool, True for real spans.
        student_last, teacher_last: ``(B, S)`` long, the position of each span's last token on each side (0 on
            padding spans).
        student_size: ``(B, S)`` long, how many student tokens each span holds (0 on padding spans).
        next_span_mask: ``(B, S)`` bool, True for a span followed by another span of its row: the next token of both
            models starts the same text there, so their predictions at the span's last token are comparable (the
            logit terms' positions).
        shared_vocabulary: the tokens both vocabularies share (:class:`SharedVocabulary`), or None when unknown.
    """

    student_span_ids: Tensor
    teacher_span_ids: Tensor
    span_mask: Tensor
    student_last: Tensor
    teacher_last: Tensor
    student_size: Tensor
    next_span_mask: Tensor
    shared_vocabulary: SharedVocabulary | None = None

    @property
    def num_spans(self) -> int:
        return int(self.span_mask.shape[1])

    @classmethod
    def from_spans(
        cls,
        spans: Sequence[Sequence[Span]],
        *,
        student_length: int,
        teacher_length: int,
        shared_vocabulary: SharedVocabulary | None = None,
        device: torch.device | str | None = None,
    ) -> "SpanAlignment":
        """Pad per-row span lists (:func:`align_offsets`) into tensors for rows of ``student_length`` student and
        ``teacher_length`` teacher positions.

        Raises:
            ValueError: a span reaches past a row's length, or spans overlap / go backwards.
        """
        batch = len(spans)
        width = max((len(row) for row in spans), default=0)
        student_ids = torch.full((batch, student_length), -1, dtype=torch.long)
        teacher_ids = torch.full((batch, teacher_length), -1, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.bool)
        s_last = torch.zeros((batch, width), dtype=torch.long)
        t_last = torch.zeros((batch, width), dtype=torch.long)
        size = torch.zeros((batch, width), dtype=torch.long)
        for b, row in enumerate(spans):
            s_prev = t_prev = 0
            for k, (s0, s1, t0, t1) in enumerate(row):
                if not (s_prev <= s0 < s1 <= student_length and t_prev <= t0 < t1 <= teacher_length):
                    raise ValueError(f"row {b} span {k} {(s0, s1, t0, t1)} is empty, overlaps the previous span or "
                                     f"reaches past the row ({student_length} student, {teacher_length} teacher "
                                     "positions)")
                s_prev, t_prev = s1, t1
                student_ids[b, s0:s1] = k
                teacher_ids[b, t0:t1] = k
                mask[b, k] = True
                s_last[b, k], t_last[b, k] = s1 - 1, t1 - 1
                size[b, k] = s1 - s0
        next_mask = torch.zeros_like(mask)
        if width > 1:
            next_mask[:, :-1] = mask[:, 1:]
        out = cls(student_ids, teacher_ids, mask, s_last, t_last, size, next_mask, shared_vocabulary)
        return out if device is None else out.to(device)

    def to(self, device: torch.device | str) -> "SpanAlignment":
        return SpanAlignment(
            *(getattr(self, name).to(device) for name in ("student_span_ids", "teacher_span_ids", "span_mask",
                                                          "student_last", "teacher_last", "student_size",
                                                          "next_span_mask")),
            shared_vocabulary=None if self.shared_vocabulary is None else self.shared_vocabulary.to(device),
        )

    def restricted_to(self, student_mask: Tensor) -> "SpanAlignment":
        """The spans whose every student token is True in ``student_mask`` (``(B, Ts)`` bool, e.g. the attention
        mask); the others are masked out."""
        outside = (self.student_span_ids >= 0) & ~student_mask.to(self.student_span_ids.device).bool()
        bad = torch.zeros_like(self.span_mask)
        if bool(outside.any()) and self.num_spans:
            rows, cols = outside.nonzero(as_tuple=True)
            bad[rows, self.student_span_ids[rows, cols]] = True
        mask = self.span_mask & ~bad
        next_mask = torch.zeros_like(mask)
        if self.num_spans > 1:
            next_mask[:, :-1] = mask[:, 1:]
        return SpanAlignment(self.student_span_ids, self.teacher_span_ids, mask, self.student_last, self.teacher_last,
                             self.student_size, self.next_span_mask & next_mask & mask, self.shared_vocabulary)


def pool_spans(hidden: Tensor, span_ids: Tensor, last: Tensor, num_spans: int, mode: str = "mean") -> Tensor:
    """Span features from token features: ``(B, T, H) -> (B, S, H)``.

    Args:
        hidden: ``(B, T, H)`` token features of one side.
        span_ids: ``(B, T)`` long, each token's span (``-1``: none) -- :attr:`SpanAlignment.student_span_ids` or
            ``teacher_span_ids``.
        last: ``(B, S)`` long, each span's last position on this side.
        num_spans: ``S``.
        mode: ``"mean"`` (the mean of the span's tokens) or ``"last"`` (its last token: in a causal model the one that
            has read the whole span).

    Returns:
        ``(B, S, H)`` in ``hidden``'s dtype (accumulated in fp32, fp64 stays fp64); zeros on padding spans.
        Differentiable with respect to ``hidden``.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pool_spans: mode={mode!r} is invalid; expected one of {POOLING_MODES}")
    if hidden.dim() != 3 or span_ids.shape != hidden.shape[:2]:
        raise ValueError(f"pool_spans: hidden {tuple(hidden.shape)} must be (B, T, H) and span_ids "
                         f"{tuple(span_ids.shape)} (B, T)")
    batch, _, width = hidden.shape
    span_ids = span_ids.to(hidden.device)
    if mode == "last":
        index = last.to(hidden.device).unsqueeze(-1).expand(batch, num_spans, width)
        pooled = torch.gather(hidden, 1, index)
        present = torch.zeros((batch, num_spans), dtype=torch.bool, device=hidden.device)
        valid = span_ids >= 0
        if bool(valid.any()):
            rows, cols = valid.nonzero(as_tuple=True)
            present[rows, span_ids[rows, cols]] = True
        return pooled * present.unsqueeze(-1).to(pooled.dtype)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = span_ids >= 0
    # one flat bucket per (row, span) plus a last bucket that collects the tokens of no span
    flat = torch.where(valid, span_ids + num_spans * torch.arange(batch, device=hidden.device).unsqueeze(1),
                       torch.full_like(span_ids, batch * num_spans))
    sums = torch.zeros((batch * num_spans + 1, width), dtype=dtype, device=hidden.device)
    sums = sums.index_add(0, flat.reshape(-1), hidden.reshape(-1, width).to(dtype))
    counts = torch.zeros(batch * num_spans + 1, dtype=dtype, device=hidden.device)
    counts = counts.index_add(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=dtype, device=hidden.device))
    mean = sums[:-1] / counts[:-1].clamp(min=1).unsqueeze(-1)
    return mean.reshape(batch, num_spans, width).to(hidden.dtype)
