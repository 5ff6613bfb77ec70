"""Two tokenizations of one text: a byte-level BPE student and a WordPiece teacher, both trained in the
test, tokenise each example; :class:`CrossTokenizer` aligns them by character offsets -- from texts, and from a
student batch whose text it rebuilds."""

from __future__ import annotations

import pytest
import torch

from kd_plugins.errors import ConfigError
from kd_plugins.integrations.cross_tokenizer import CrossTokenizer, shared_tokens

from ._two_tokenizers import byte_bpe, wordpiece

TEXTS = ["the cat sat on the mat", "naïve café — déjà vu", "tokenisation  is   fun", "unbelievably long words"]


def test_every_span_covers_one_text_on_both_sides():
    student, teacher = byte_bpe(), wordpiece()
    cross = CrossTokenizer(student, teacher)
    batch = cross.encode(TEXTS)
    al = batch.alignment
    for b, text in enumerate(TEXTS):
        s_enc = student(text, return_offsets_mapping=True)["offset_mapping"]
        t_enc = teacher(text, return_offsets_mapping=True)["offset_mapping"]
        for k in range(int(al.span_mask[b].sum())):
            s_tok = [s_enc[i] for i in range(len(s_enc)) if al.student_span_ids[b, i] == k]
            t_tok = [t_enc[i] for i in range(len(t_enc)) if al.teacher_span_ids[b, i] == k]
            s_text = text[s_tok[0][0]:s_tok[-1][1]]
            t_text = text[t_tok[0][0]:t_tok[-1][1]]
            assert s_text.strip() == t_text.strip(), (text, k, s_text, t_text)
    # the teacher's own BOS joins no span; the student's padding joins none either
    assert (al.teacher_span_ids[:, 0] == -1).all()
    assert (al.student_span_ids[batch.student["attention_mask"] == 0] == -1).all()


def test_the_hand_checked_spans_of_one_sentence():
    cross = CrossTokenizer(byte_bpe(), wordpiece())
    text = "naïve café — déjà vu"
    al = cross.encode([text]).alignment
    words = []
    enc = wordpiece()(text, return_offsets_mapping=True)["offset_mapping"]
    for k in range(int(al.span_mask[0].sum())):
        tok = [enc[i] for i in range(len(enc)) if al.teacher_span_ids[0, i] == k]
        words.append(text[tok[0][0]:tok[-1][1]])
    assert words == ["naïve", "café", "—", "déjà", "vu"]  # the BPE splits "ï", "é", "—" into byte tokens


def test_a_student_batch_is_rebuilt_to_text_and_retokenised_for_the_teacher():
    student, teacher = byte_bpe(), wordpiece()
    cross = CrossTokenizer(student, teacher)
    enc = student(TEXTS, padding=True, return_tensors="pt")
    teacher_inputs, al = cross.teacher_batch(enc)
    expected = teacher(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(teacher_inputs["input_ids"], expected["input_ids"])
    assert torch.equal(teacher_inputs["attention_mask"], expected["attention_mask"])
    from_texts = cross.encode(TEXTS).alignment
    assert torch.equal(al.span_mask, from_texts.span_mask)
    assert torch.equal(al.teacher_span_ids, from_texts.teacher_span_ids)
    assert torch.equal(al.student_span_ids, from_texts.student_span_ids)


def test_student_special_tokens_are_left_out_of_the_text():
    student, teacher = byte_bpe(), wordpiece()
    cross = CrossTokenizer(student, teacher)
    ids = student(TEXTS[0])["input_ids"] + [student.eos_token_id]
    teacher_inputs, al = cross.teacher_batch({"input_ids": torch.tensor([ids])})
    assert teacher_inputs["input_ids"][0].tolist() == teacher(TEXTS[0])["input_ids"]
    assert al.student_span_ids[0, -1] == -1


def test_packed_batches_and_slow_tokenizers_are_refused():
    cross = CrossTokenizer(byte_bpe(), wordpiece())
    with pytest.raises(ConfigError, match="padding-free"):
        cross.teacher_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.arange(4)[None]})

    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="character offsets"):
        CrossTokenizer(Slow(), wordpiece())


def test_shared_tokens_are_the_strings_both_vocabularies_hold():
    student, teacher = byte_bpe(), wordpiece()
    shared = shared_tokens(student, teacher)
    s_vocab = {i: t for t, i in student.get_vocab().items()}
    t_vocab = {i: t for t, i in teacher.get_vocab().items()}
    pairs = list(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert len(pairs) > 10
    for s, t in pairs:
        assert s_vocab[s].replace("Ġ", " ") == t_vocab[t]
    assert student.pad_token_id not in shared.student_ids.tolist()
    assert teacher.pad_token_id not in shared.teacher_ids.tolist()
    expected = {w for w in student.get_vocab() if w in teacher.get_vocab() and w not in ("<pad>", "<eos>")}
    assert {s_vocab[s] for s, _ in pairs} >= expected


def test_the_checks_of_a_cross_tokenizer_run():
    from kd_plugins.integrations.cross_tokenizer import cross_tokenizer_for

    student, teacher = byte_bpe(), wordpiece()
    assert isinstance(cross_tokenizer_for(student, teacher), CrossTokenizer)
    assert cross_tokenizer_for(student, byte_bpe()) is None  # one tokenizer: nothing to align
    with pytest.raises(ConfigError, match=r"with a teacher cache written on the student's tokens: it holds the "
                                          r"teacher's outputs on the student's tokenization, not on its own; write a "
                                          r"cross-tokenizer cache"):
        cross_tokenizer_for(student, None, teacher_kind="cache")
    with pytest.raises(ConfigError, match=r"the student's \(the trainer's processing_class\) tokenizer is unknown"):
        cross_tokenizer_for(None, teacher)
    with pytest.raises(ConfigError, match="padding-free"):
        cross_tokenizer_for(student, teacher, padding_free=True)
