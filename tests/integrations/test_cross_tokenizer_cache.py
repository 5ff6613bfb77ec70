"""A teacher cache for a teacher with its own tokenizer: written from the student's examples, it holds the teacher's
outputs on the teacher's tokenization of each example (the ids a cross-tokenizer step gives the live teacher), its
final hidden states and LM head for the cross-vocabulary logit terms, and its tokenizer. A KDSFTTrainer trains from
it with ``cross_tokenizer: true`` exactly as from the live teacher; every mismatch is refused before the first step,
naming it."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from kd_plugins import ConfigError, IncompatibleModelsError
from kd_plugins.capture import FeatureCapture, find_decoder
from kd_plugins.integrations.cross_tokenizer import CrossTokenizer
from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher, main, tokenizer_hash
from kd_plugins.integrations.trl import KDSFTTrainer
from kd_plugins.types import ModelInfo, Requirements

from ._two_tokenizers import CORPUS, byte_bpe, wordpiece
from .conftest import kd_config, sft_args, tiny_model

TEXTS = CORPUS + ["the cat and the dog sat", "a dog on a mat", "the log on the mat", "café déjà vu"]
TERMS = [{"name": "cross_vocab_kd", "weight": 1.0, "uld_weight": 0.5},
         {"name": "mse", "weight": 1.0, "layers": "uniform"}]
TEACHER_LAYERS = [0, 1, 2]


def _student():
    return tiny_model(vocab=len(byte_bpe()), seed=0)


def _teacher():
    return tiny_model(vocab=len(wordpiece()), seed=1, hidden=48, layers=3, heads=4, kv_heads=4)


def _trainer(tmp_path, teacher, *, terms=TERMS, config=None, max_steps=3, texts=TEXTS, **kwargs):
    args = sft_args(tmp_path, max_steps=max_steps, per_device_train_batch_size=5, learning_rate=1e-1, optim="sgd")
    return KDSFTTrainer(model=_student(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                        processing_class=byte_bpe(), teacher=teacher,
                        kd_config=kd_config(terms, **({"ce_weight": 0.5, "cross_tokenizer": True} | (config or {}))),
                        **kwargs)


def _student_rows(tmp_path):
    """The student's training rows, as the trainer tokenises them (its EOS appended)."""
    return [list(r) for r in _trainer(tmp_path / "rows", _teacher(), teacher_tokenizer=wordpiece()).train_dataset[
        "input_ids"]]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross_cache")
    rows = _student_rows(tmp)
    cache = cache_teacher(_teacher(), wordpiece(), rows, tmp / "cache", k=8, layers=TEACHER_LAYERS,
                          dtype="float32", final_hidden=True, student_tokenizer=byte_bpe(), progress=False)
    return tmp, rows, cache


def test_the_cache_holds_the_teachers_outputs_on_its_own_tokenization(written):
    _, rows, cache = written
    assert cache.cross_tokenizer and cache.final_hidden and cache.manifest["format_version"] == 3
    assert cache.manifest["tokenizer_hash"] == tokenizer_hash(wordpiece())
    assert cache.manifest["student_tokenizer_hash"] == tokenizer_hash(byte_bpe())
    assert tokenizer_hash(cache.teacher_tokenizer()) == tokenizer_hash(wordpiece())
    teacher_rows = CrossTokenizer(byte_bpe(), wordpiece()).teacher_sequences(rows)
    assert cache.manifest["num_tokens"] == sum(map(len, teacher_rows))
    teacher, tok = _teacher().eval(), wordpiece()
    capture = FeatureCapture(teacher, info=ModelInfo.from_config(teacher.config), layers=TEACHER_LAYERS,
                             final_hidden=True)
    for i, (student_row, teacher_row) in enumerate(zip(rows, teacher_rows)):
        text = byte_bpe().decode(student_row, skip_special_tokens=True)
        assert teacher_row == tok(text)["input_ids"]  # the teacher's own ids of the text, its BOS first
        stored = cache.example(i)
        assert stored["input_ids"].tolist() == teacher_row
        with torch.no_grad(), capture.recording():
            find_decoder(teacher)[0](input_ids=torch.tensor([teacher_row]), use_cache=False)
            live = capture.result()
        logits = live.final_hidden[0] @ teacher.lm_head.weight.T
        top = logits.log_softmax(-1).topk(8, -1)
        torch.testing.assert_close(stored["topk_logprobs"], top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored["final_hidden"], live.final_hidden[0], rtol=1e-5, atol=1e-5)
        for layer in TEACHER_LAYERS:
            torch.testing.assert_close(stored[f"hidden.{layer}"], live.hidden_states[layer][0], rtol=1e-5, atol=1e-5)
    capture.remove()
    torch.testing.assert_close(cache.lm_head()["weight"], teacher.lm_head.weight)


def test_training_from_the_cache_equals_the_live_teacher(written, tmp_path):
    _, _, cache = written
    live = _trainer(tmp_path / "live", _teacher(), teacher_tokenizer=wordpiece())
    live.train()
    cached = _trainer(tmp_path / "cached", TeacherCache(cache.path))  # its tokenizer comes from the cache
    assert isinstance(cached.kd_teacher, TeacherCache) and cached._kd_installed.cross_tokenizer is not None
    cached.train()
    live_logs = [e for e in live.state.log_history if "loss" in e]
    cached_logs = [e for e in cached.state.log_history if "loss" in e]
    assert len(live_logs) == len(cached_logs) == 3
    for a, b in zip(live_logs, cached_logs):
        assert a["kd/loss/cross_vocab_kd"] > 0 and a["kd/loss/mse"] > 0
        for key in ("loss", "kd/loss/cross_vocab_kd", "kd/loss/mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert live_logs[0]["loss"] != pytest.approx(live_logs[-1]["loss"], rel=1e-3)  # it trained
    for (name, p), q in zip(live.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_span_terms_train_from_a_cache_without_final_hidden_states_and_logit_terms_are_refused(written, tmp_path):
    tmp, rows, _ = written
    cache = cache_teacher(_teacher(), wordpiece(), rows, tmp_path / "topk", k=8, layers=TEACHER_LAYERS,
                          student_tokenizer=byte_bpe(), progress=False)
    assert cache.cross_tokenizer and not cache.final_hidden
    with pytest.raises(TeacherCacheError, match=r"holds the teacher's top-k log-probs only, but the "
                                                r"cross-vocabulary logit terms \(uld, cross_vocab_kd\) need its full "
                                                r"next-token distribution.*--final_hidden"):
        _trainer(tmp_path / "refused", cache)
    trainer = _trainer(tmp_path / "mse", cache, terms=[TERMS[1]], max_steps=2)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kd/loss/mse" in e]
    assert len(logs) == 2 and all(e["kd/loss/mse"] > 0 for e in logs)


def test_mismatches_are_refused_before_the_first_step(written, tmp_path):
    tmp, rows, cache = written
    with pytest.raises(IncompatibleModelsError, match=r"is a cross-tokenizer cache .* does not set "
                                                      r"cross_tokenizer: true"):
        _trainer(tmp_path / "a", cache, config={"cross_tokenizer": False}, terms=[TERMS[1]])
    with pytest.raises(TeacherCacheError, match=r"written for another teacher tokenizer \(hash "):
        _trainer(tmp_path / "b", cache, teacher_tokenizer=wordpiece(vocab=140))
    wordpiece(vocab=140).save_pretrained(tmp_path / "other_teacher_tok")  # a path is loaded, then compared
    with pytest.raises(TeacherCacheError, match=r"written for another teacher tokenizer \(hash "):
        _trainer(tmp_path / "b2", cache, teacher_tokenizer=str(tmp_path / "other_teacher_tok"))
    other_student = byte_bpe(vocab=280)
    with pytest.raises(TeacherCacheError, match=r"written for another student tokenizer"):
        KDSFTTrainer(model=tiny_model(vocab=len(other_student), seed=0), args=sft_args(tmp_path / "c"),
                     train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=other_student, teacher=cache,
                     kd_config=kd_config(TERMS, cross_tokenizer=True))
    with pytest.raises(TeacherCacheError, match=r"does not cover the training data: 1 of 11 training sequences"):
        _trainer(tmp_path / "d", cache, texts=TEXTS + ["a mat on a log"])
    plain = cache_teacher(_teacher(), wordpiece(), [[2, 5, 6, 7]], tmp_path / "plain", k=4, progress=False)
    with pytest.raises(ConfigError, match=r"with a teacher cache written on the student's tokens.*--student_tokenizer"):
        _trainer(tmp_path / "e", plain, terms=[TERMS[1]], teacher_tokenizer=wordpiece())


def test_the_writer_refuses_what_cannot_be_a_cross_tokenizer_cache(written, tmp_path):
    _, rows, _ = written
    with pytest.raises(ValueError, match="needs the teacher's tokenizer as tokenizer="):
        cache_teacher(_teacher(), None, rows, tmp_path / "a", student_tokenizer=byte_bpe(), progress=False)
    with pytest.raises(ValueError, match=r"student_tokenizer= is the teacher's tokenizer"):
        cache_teacher(_teacher(), wordpiece(), rows, tmp_path / "b", student_tokenizer=wordpiece(), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything


def test_a_one_vocabulary_cache_with_final_hidden_states_serves_the_full_distribution(tmp_path):
    teacher = _teacher()
    blocks = [[2, 5, 9, 11, 4], [2, 7, 7, 30, 8, 6]]
    cache = cache_teacher(teacher, wordpiece(), blocks, tmp_path / "c", k=4, dtype="float32", final_hidden=True,
                          progress=False)
    ids = torch.tensor([blocks[1]])
    capture = cache.capture({"input_ids": ids}, Requirements(final_hidden=True))
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    dense = capture.final_hidden @ capture.lm_head_weight.T
    torch.testing.assert_close(dense, logits, rtol=1e-5, atol=1e-5)
    assert cache.capture({"input_ids": ids}, Requirements()).final_hidden is None  # read only when needed
    head = tmp_path / "c" / "lm_head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TeacherCacheError, match="lm_head.safetensors is corrupt"):
        TeacherCache(tmp_path / "c")
    head.unlink()
    with pytest.raises(TeacherCacheError, match=r"lm_head.safetensors \(the teacher's LM head\) is missing"):
        TeacherCache(tmp_path / "c")


def test_the_cli_writes_a_cross_tokenizer_cache(written, tmp_path, capsys):
    _, rows, _ = written
    _teacher().save_pretrained(tmp_path / "teacher")
    wordpiece().save_pretrained(tmp_path / "teacher")
    byte_bpe().save_pretrained(tmp_path / "student_tok")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(TeacherCacheError, match=r"--student_tokenizer '.*nowhere' is not a folder"):
        main(["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "rows.json"), "--out",
              str(tmp_path / "x"), "--student_tokenizer", str(tmp_path / "nowhere")])
    assert main(["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "rows.json"), "--out",
                 str(tmp_path / "c"), "--k", "4", "--student_tokenizer", str(tmp_path / "student_tok"),
                 "--final_hidden"]) == 0
    out = capsys.readouterr().out
    assert "teacher tokens (cross-tokenizer cache)" in out and "final hidden states + LM head" in out
    cache = TeacherCache(tmp_path / "c")
    assert cache.cross_tokenizer and cache.final_hidden and len(cache) == len(rows)
    first = CrossTokenizer(byte_bpe(), wordpiece()).teacher_sequences(rows[:1])[0]
    assert cache.example(0)["input_ids"].tolist() == first
