"""Two tokenizations of one text: the teacher reads its own tokens, aligned with the student's by character offsets.

:class:`CrossTokenizer` holds the student's and the teacher's tokenizers (Hugging Face *fast* tokenizers: they give
each token's character range). For a student batch it rebuilds each row's text from the student's tokens, tokenises
that text with the teacher's tokenizer and aligns the two by character offsets
(:func:`kd_plugins.alignment_spans.align_offsets`), giving the teacher's inputs and the batch's
:class:`~kd_plugins.alignment_spans.SpanAlignment`. :meth:`CrossTokenizer.encode` does the same from texts, and :meth:`CrossTokenizer.teacher_sequences` gives the
teacher's ids of whole student sequences (what a cross-tokenizer teacher cache is written from and looked up by).

The student's special tokens (BOS, EOS, chat-template markers) are left out of the rebuilt text and of every span;
the teacher's tokenizer adds its own special tokens (``add_special_tokens=True``, its usual template).

:func:`shared_tokens` lists the tokens both vocabularies hold with one string (the exact-match logit path).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kd_plugins.alignment_spans import SharedVocabulary, SpanAlignment, align_offsets
from kd_plugins.errors import ConfigError

__all__ = ["CROSS_TOKENIZER_TERMS", "CrossTokenBatch", "CrossTokenizer", "check_cross_tokenizer_terms",
           "cross_tokenizer_for",
           "cross_tokenizer_term_error", "same_tokens", "shared_tokens"]

# word-start markers of byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and of SentencePiece (Llama 2, Mistral):
# both stand for a space, so "Ġthe" and "▁the" are one string
_SPACE_MARKERS = ("Ġ", "▁")


class CrossTokenBatch(dict):
    """What :meth:`CrossTokenizer.encode` returns: ``student`` and ``teacher`` (each ``input_ids`` +
    ``attention_mask``, right-padded) and ``alignment`` (:class:`~kd_plugins.alignment_spans.SpanAlignment`)."""

    @property
    def student(self) -> dict[str, Tensor]:
        return self["student"]

    @property
    def teacher(self) -> dict[str, Tensor]:
        return self["teacher"]

    @property
    def alignment(self) -> SpanAlignment:
        return self["alignment"]


class CrossTokenizer:
    """The student's and the teacher's tokenizers, and how to align their tokenizations of one text.

    Args:
        student_tokenizer, teacher_tokenizer: fast tokenizers (``return_offsets_mapping`` must work).
        teacher_max_length: cut the teacher's tokenization to this many tokens (None: no limit).

    Raises:
        ConfigError: a tokenizer cannot give character offsets (a slow, Python-only tokenizer).
    """

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, *, teacher_max_length: int | None = None):
        for role, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise ConfigError(
                    f"cross-tokenizer distillation needs the {role}'s tokenizer to give character offsets "
                    f"(return_offsets_mapping), which {type(tok).__name__} cannot; load it as a fast tokenizer "
                    "(AutoTokenizer.from_pretrained(..., use_fast=True), a tokenizer.json)"
                )
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_max_length = teacher_max_length
        self._shared: SharedVocabulary | None = None
        self._student_specials = set(student_tokenizer.all_special_ids)
        self._teacher_pad = _pad_id(teacher_tokenizer)

    @property
    def shared_vocabulary(self) -> SharedVocabulary:
        """The tokens both vocabularies hold (:func:`shared_tokens`), computed once."""
        if self._shared is None:
            self._shared = shared_tokens(self.student_tokenizer, self.teacher_tokenizer)
        return self._shared

    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> CrossTokenBatch:
        """Tokenise ``texts`` with both tokenizers (each with its own special tokens) and align them."""
        student = self.student_tokenizer(list(texts), return_offsets_mapping=True, truncation=max_length is not None,
                                         max_length=max_length)
        student_ids = [list(ids) for ids in student["input_ids"]]
        s_offsets = [[(int(a), int(b)) for a, b in offsets] for offsets in student["offset_mapping"]]
        teacher_ids, t_offsets = self._teacher_encode(list(texts))
        return self._assemble(student_ids, s_offsets, teacher_ids, t_offsets, _pad_id(self.student_tokenizer))

    def teacher_batch(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Tensor], SpanAlignment]:
        """The teacher's inputs for a student batch and their alignment.

        Args:
            inputs: the student's causal-LM batch: ``input_ids`` ``(B, T)`` and optionally ``attention_mask``.
                Padding-free (packed) batches are refused: their rows hold several texts.

        Returns:
            ``(teacher_inputs, alignment)``: ``input_ids`` / ``attention_mask`` for the teacher (right-padded, on the
            batch's device) and the :class:`~kd_plugins.alignment_spans.SpanAlignment` of the batch, with
            :attr:`shared_vocabulary`.
        """
        input_ids = inputs["input_ids"]
        if inputs.get("attention_mask") is None and inputs.get("position_ids") is not None:
            raise ConfigError("cross-tokenizer distillation cannot rebuild the texts of a padding-free (packed) batch; "
                              "train with padding_free=False (and packing=False)")
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        texts, s_offsets = [], []
        for ids, row_mask in zip(input_ids.tolist(), mask.tolist()):
            text, offsets = self._student_text(ids, row_mask)
            texts.append(text)
            s_offsets.append(offsets)
        teacher_ids, t_offsets = self._teacher_encode(texts)
        out = self._assemble([list(r) for r in input_ids.tolist()], s_offsets, teacher_ids, t_offsets, 0,
                             student_width=input_ids.shape[1])
        device = input_ids.device
        return {k: v.to(device) for k, v in out.teacher.items()}, out.alignment.to(device)

    def teacher_sequences(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 64) -> list[list[int]]:
        """The teacher's tokens of each student token sequence, as :meth:`teacher_batch` gives them to the teacher
        during training (its special tokens included, padding left out): what a cross-tokenizer teacher cache
        holds and looks up."""
        out: list[list[int]] = []
        for start in range(0, len(sequences), batch_size):
            rows = [list(map(int, row)) for row in sequences[start : start + batch_size]]
            teacher, _ = self.teacher_batch(_padded(rows, max(1, *map(len, rows)), 0))
            for row, row_mask in zip(teacher["input_ids"].tolist(), teacher["attention_mask"].tolist()):
                out.append([i for i, m in zip(row, row_mask) if m])
        return out

    # --- helpers ------------------------------------------------------------------------------------------

    def _student_text(self, ids: list[int], mask: list[bool]) -> tuple[str, list[tuple[int, int]]]:
        """A row's text without special tokens, and each student position's character range in it."""
        keep = [k for k, (i, m) in enumerate(zip(ids, mask)) if m and i not in self._student_specials]
        kept_ids = [ids[k] for k in keep]
        tok = self.student_tokenizer
        text = tok.decode(kept_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        offsets = [(0, 0)] * len(ids)
        again = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if again["input_ids"] == kept_ids:  # the text tokenises back to the row: its offsets are the row's
            for k, (a, b) in zip(keep, again["offset_mapping"]):
                offsets[k] = (int(a), int(b))
            return text, offsets
        # not round-trippable (normalisation, merges that differ): each token ends where the decoded prefix ends
        previous = 0
        for n, k in enumerate(keep):
            end = len(tok.decode(kept_ids[: n + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            end = max(previous, min(end, len(text)))
            offsets[k] = (previous, end)
            previous = end
        return text, offsets

    def _teacher_encode(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        limit = self.teacher_max_length
        enc = self.teacher_tokenizer(texts, return_offsets_mapping=True, truncation=limit is not None,
                                     max_length=limit)
        return ([list(ids) for ids in enc["input_ids"]],
                [[(int(a), int(b)) for a, b in offsets] for offsets in enc["offset_mapping"]])

    def _assemble(self, student_ids, s_offsets, teacher_ids, t_offsets, student_pad, student_width=None):
        spans = [align_offsets(s, t) for s, t in zip(s_offsets, t_offsets)]
        s_width = student_width or max((len(r) for r in student_ids), default=0)
        t_width = max((len(r) for r in teacher_ids), default=0)
        student = _padded(student_ids, s_width, student_pad)
        teacher = _padded(teacher_ids, t_width, self._teacher_pad)
        alignment = SpanAlignment.from_spans(spans, student_length=s_width, teacher_length=t_width,
                                             shared_vocabulary=self.shared_vocabulary)
        return CrossTokenBatch(student=student, teacher=teacher, alignment=alignment)


def shared_tokens(student_tokenizer: Any, teacher_tokenizer: Any) -> SharedVocabulary:
    """The tokens whose strings both vocabularies hold, special tokens left out.

    Strings are compared as the vocabularies spell them, with the byte-level and SentencePiece word-start markers
    (``Ġ``, ``▁``) read as a space; a string held by several ids of one vocabulary keeps its smallest id. Returned in
    ascending student id order.
    """
    s_map = _canonical_vocab(student_tokenizer)
    t_map = _canonical_vocab(teacher_tokenizer)
    pairs = sorted((s_id, t_map[string]) for string, s_id in s_map.items() if string in t_map)
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return SharedVocabulary(student_ids, teacher_ids)


def _canonical_vocab(tokenizer: Any) -> dict[str, int]:
    specials = set(tokenizer.all_special_ids)
    out: dict[str, int] = {}
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if index in specials:
            continue
        for marker in _SPACE_MARKERS:
            token = token.replace(marker, " ")
        out.setdefault(token, index)
    return out


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _padded(rows: list[list[int]], width: int, pad: int) -> dict[str, Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        row = row[:width]
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


CROSS_TOKENIZER_TERMS = ("contrastive", "mse", "cosine", "uld", "cross_vocab_kd")


def cross_tokenizer_for(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    teacher_kind: str = "model",
    padding_free: bool = False,
) -> CrossTokenizer | None:
    """The :class:`CrossTokenizer` of a run configured with ``cross_tokenizer: true``, checked before training; None
    when both tokenizers are one (the teacher then reads the student's ids as usual).

    Args:
        student_tokenizer, teacher_tokenizer: the two tokenizers, or None where unknown.
        teacher_kind: ``"model"`` (a live teacher, or a cross-tokenizer cache: both read the teacher's own
            tokenization), ``"self"`` or ``"cache"`` (a cache written on the student's tokens, refused).
        padding_free: the host packs rows without padding (``padding_free`` / ``packing``).

    Raises:
        ConfigError: a tokenizer is unknown, the teacher is the student or a cache of the student's tokens, or the
            batches are packed.
    """
    if teacher_kind == "self":
        raise ConfigError("cross_tokenizer: true with teacher='self': the student's own base reads the student's "
                          "tokens; drop cross_tokenizer")
    if teacher_kind == "cache":
        raise ConfigError("cross_tokenizer: true with a teacher cache written on the student's tokens: it holds the "
                          "teacher's outputs on the student's tokenization, not on its own; write a cross-tokenizer "
                          "cache (`kd-plugins cache-teacher --student_tokenizer PATH`, or cache_teacher(..., "
                          "student_tokenizer=...)) or use the live teacher (teacher=<model or path>)")
    missing = [what for what, tok in (("the student's (the trainer's processing_class)", student_tokenizer),
                                      ("the teacher's (teacher_tokenizer=)", teacher_tokenizer)) if tok is None]
    if missing:
        raise ConfigError(f"cross_tokenizer: true needs both tokenizers to rebuild each example's text and align "
                          f"the two tokenizations, but {' and '.join(missing)} tokenizer is unknown; pass it "
                          "(kd-plugins sft: teacher_tokenizer: PATH)")
    if same_tokens(student_tokenizer, teacher_tokenizer):
        return None
    if padding_free:
        raise ConfigError("cross_tokenizer: true cannot rebuild the texts of padding-free (packed) batches; set "
                          "padding_free=False and packing=False in the training arguments")
    return CrossTokenizer(student_tokenizer, teacher_tokenizer)


def same_tokens(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """Both tokenizers map every token string to the same id: the teacher can read the student's ids as they are."""
    return student_tokenizer is teacher_tokenizer or student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def check_cross_tokenizer_terms(terms: Mapping[str, Any]) -> None:
    """Refuse terms that cannot compare models with different tokenizers (``cross_tokenizer = False``).

    Raises:
        ConfigError: names the terms and the built-in ones that can.
    """
    unable = [f"{label} ({type(term).__name__})" for label, term in terms.items()
              if not term.cross_tokenizer]
    if unable:
        raise cross_tokenizer_term_error(f"terms {unable} compare positions of one tokenization (they do not declare "
                                         "cross_tokenizer = True)")


def cross_tokenizer_term_error(problem: str) -> ConfigError:
    """The refusal of a term that cannot run across tokenizers: ``problem``, then the terms that can."""
    return ConfigError(f"cross_tokenizer: true, but {problem}; use terms that compare aligned spans: "
                       f"{', '.join(CROSS_TOKENIZER_TERMS)}")
