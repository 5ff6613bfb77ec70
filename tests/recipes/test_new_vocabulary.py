"""A student with a new, smaller vocabulary, on a tiny teacher with an in-test byte-level BPE:
the new tokenizer keeps the teacher's pipeline, each new token's embedding is the mean of the teacher rows of its
string, the derived student reads the new ids, and bits per character is a per-character score."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from kd_plugins.recipes.new_vocabulary import (  # noqa: E402
    bits_per_character,
    derive_new_vocabulary_student,
    embeddings_from_teacher,
    train_student_tokenizer,
)
from tests.integrations._two_tokenizers import CORPUS, byte_bpe  # noqa: E402
from tests.integrations.conftest import tiny_model  # noqa: E402


def test_new_tokens_start_from_the_teacher_rows_of_their_strings():
    teacher_tok = byte_bpe(300)
    student_tok = train_student_tokenizer(teacher_tok, CORPUS, 290)
    assert len(student_tok) <= 290 and student_tok.eos_token == teacher_tok.eos_token
    assert student_tok.get_vocab() != teacher_tok.get_vocab()
    weight = torch.randn(len(teacher_tok), 8, generator=torch.Generator().manual_seed(0))
    rows = embeddings_from_teacher(weight, teacher_tok, student_tok)
    t_vocab = teacher_tok.get_vocab()
    for token, index in student_tok.get_vocab().items():
        if index in student_tok.all_special_ids:
            torch.testing.assert_close(rows[index], weight[t_vocab[token]])
            continue
        # by hand: split the string greedily into the teacher's own merges, as its BPE does
        pieces = teacher_tok.backend_tokenizer.model.tokenize(token)
        assert "".join(p.value for p in pieces) == token
        torch.testing.assert_close(rows[index], weight[[t_vocab[p.value] for p in pieces]].mean(0))


def test_the_derived_student_reads_the_new_vocabulary():
    teacher_tok = byte_bpe(300)
    student_tok = train_student_tokenizer(teacher_tok, CORPUS, 280)
    teacher = tiny_model(vocab=len(teacher_tok), layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, kept = derive_new_vocabulary_student(teacher, teacher_tok, student_tok, num_layers=2)
    assert kept == [0, 3]
    assert student.config.vocab_size == len(student_tok)
    assert student.get_input_embeddings().weight.shape[0] == len(student_tok)
    assert student.get_output_embeddings().weight.shape[0] == len(student_tok)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
    expected = embeddings_from_teacher(teacher.get_input_embeddings().weight.detach(), teacher_tok, student_tok)
    torch.testing.assert_close(student.get_input_embeddings().weight.detach(), expected)
    ids = student_tok(CORPUS[0], return_tensors="pt")["input_ids"]
    assert torch.isfinite(student(input_ids=ids).logits).all()
    assert student.config.eos_token_id == student_tok.eos_token_id


def test_bits_per_character_is_the_summed_nll_over_characters():
    tok = byte_bpe(300)
    model = tiny_model(vocab=len(tok))
    texts = CORPUS[:3]
    score = bits_per_character(model, tok, texts)
    nll, chars = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tok.eos_token_id] + tok(text)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            nll += sum(-torch.log_softmax(logits[i], -1)[ids[i + 1]].item() for i in range(len(ids) - 1))
            chars += len(text)
    assert score["chars"] == chars
    assert score["bits_per_char"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)
