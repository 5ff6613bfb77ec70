"""Teacher and student tokenizers are compared, not only their vocabulary sizes: different tokenizers
are refused (cross-tokenizer distillation is not configured), one tokenizer whose models pad the vocabulary to
different sizes trains logit terms on the shared real tokens -- equal to a float64 reference on that sub-vocabulary
-- and an unknown tokenizer with different sizes is refused instead of crashing with ``IndexError``."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kd_plugins import BatchContext, IncompatibleModelsError
from kd_plugins.integrations.trl import KDSFTTrainer
from kd_plugins.plan import StudentMode

from .conftest import SPECIALS, kd_config, sft_args, tiny_dataset, tiny_model, tiny_tokenizer

MSE = {"name": "mse", "weight": 1.0, "layers": "uniform"}


def _tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _other_tokenizer(vocab=128):
    """Same size as tiny_tokenizer(vocab), other strings: the teacher would read every id as another word."""
    return _tokenizer([f"x{i}" for i in range(vocab - len(SPECIALS))])


def _trainer(tmp_path, teacher, terms, *, processing_class=None, **kwargs):
    return KDSFTTrainer(model=kwargs.pop("student", None) or tiny_model(), args=sft_args(tmp_path, max_steps=2),
                        train_dataset=tiny_dataset(8), processing_class=processing_class or tiny_tokenizer(),
                        teacher=teacher, kd_config=kd_config(terms, **kwargs.pop("config", {})), **kwargs)


@pytest.mark.parametrize("terms", [[{"name": "dkd"}], [MSE]], ids=["logit", "representation"])
def test_a_teacher_tokenizer_with_other_strings_is_refused(tmp_path, terms):
    with pytest.raises(IncompatibleModelsError) as info:
        _trainer(tmp_path, tiny_model(seed=1), terms, teacher_tokenizer=_other_tokenizer())
    message = str(info.value)
    assert "have different tokenizers (student tokenizer: 128 tokens, teacher tokenizer: 128; first difference at " \
           "id 4: student 'w0', teacher 'x0')" in message
    assert "cross-tokenizer distillation is not configured" in message


def test_the_tokenizer_saved_beside_a_teacher_path_is_compared(tmp_path):
    tiny_model(seed=1).save_pretrained(tmp_path / "teacher")
    _other_tokenizer().save_pretrained(tmp_path / "teacher")
    with pytest.raises(IncompatibleModelsError, match="have different tokenizers.*cross-tokenizer distillation is "
                                                      "not configured"):
        _trainer(tmp_path / "run", str(tmp_path / "teacher"), [{"name": "dkd"}])
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")  # the student's tokenizer: fine
    _trainer(tmp_path / "run2", str(tmp_path / "teacher"), [{"name": "dkd"}])


def test_a_tokenizer_path_can_be_given(tmp_path):
    _other_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(IncompatibleModelsError, match="have different tokenizers"):
        _trainer(tmp_path, tiny_model(seed=1), [{"name": "dkd"}], teacher_tokenizer=str(tmp_path / "tok"))


@pytest.mark.parametrize("terms", [[{"name": "dkd"}], [MSE]], ids=["logit", "representation"])
def test_different_sizes_with_an_unknown_teacher_tokenizer_are_refused(tmp_path, terms):
    """Before: a smaller teacher vocabulary crashed mid-step with IndexError (representation terms) or was refused
    with advice to use representation terms only."""
    with pytest.raises(IncompatibleModelsError) as info:
        _trainer(tmp_path, tiny_model(seed=1, vocab=100), terms)
    message = str(info.value)
    for fragment in ("vocab_size=128", "vocab_size=100", "the teacher's tokenizer is unknown",
                     "teacher_tokenizer=", "cross-tokenizer distillation is not configured"):
        assert fragment in message, (fragment, message)


def test_equal_sizes_with_an_unknown_teacher_tokenizer_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kd_plugins.integrations.vocabulary"):
        _trainer(tmp_path, tiny_model(seed=1), [{"name": "dkd"}])
    assert any("teacher and student tokenizers were not compared" in r.getMessage() for r in caplog.records)


def test_a_tokenizer_larger_than_a_model_vocabulary_is_refused(tmp_path):
    big = tiny_tokenizer(140)
    with pytest.raises(IncompatibleModelsError, match="the shared tokenizer has 140 token ids but student 'student' "
                                                      "has vocab_size=128"):
        _trainer(tmp_path, tiny_model(seed=1, vocab=144), [{"name": "dkd"}], processing_class=big,
                 teacher_tokenizer=tiny_tokenizer(140))


# --- one tokenizer, vocabularies padded to different sizes -----------------------------------------------------------


def _padded_trainer(tmp_path, terms, **config):
    """A 120-token tokenizer; the student's head has 128 rows, the teacher's 136 (Qwen2.5-0.5B vs 7B in small)."""
    return _trainer(tmp_path, tiny_model(seed=1, vocab=136, hidden=48, layers=3), terms,
                    student=tiny_model(vocab=128), processing_class=tiny_tokenizer(120),
                    teacher_tokenizer=tiny_tokenizer(120), config=config)


def _reference(student_logits, teacher_logits, labels, loss, temperature):
    """float64, position by position, over the given (already restricted) vocabulary."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == -100:
                continue
            log_s = torch.log_softmax(student_logits[b, t].double() / temperature, -1)
            log_t = torch.log_softmax(teacher_logits[b, t].double() / temperature, -1)
            kl = (log_t.exp() * (log_t - log_s)).sum() if loss == "forward_kl" else (log_s.exp() * (log_s - log_t)).sum()
            total, count = total + kl * temperature**2, count + 1
    return total / count


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_padded_vocabularies_compare_the_shared_tokens_exactly(tmp_path, loss):
    trainer = _padded_trainer(tmp_path, [{"name": loss, "temperature": 2.0}])
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    context = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs.get("attention_mask"))
    teacher = trainer.kd_teacher.capture(inputs, trainer._kd_requirements)
    with trainer._kd_student_capture.recording():
        trainer.model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
    student = trainer._kd_student_capture.result()
    # the terms never see the padding rows
    assert student.lm_head_weight.shape[0] == teacher.lm_head_weight.shape[0] == 120
    got = trainer.distiller(student, teacher, context).losses[loss]
    with torch.no_grad():
        full_s = trainer.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        full_t = trainer.kd_teacher.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert full_s.shape[-1] == 128 and full_t.shape[-1] == 136
    want = _reference(full_s[..., :120], full_t[..., :120], context.labels, loss, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the full heads would give another value: the padding rows matter
    trimmed = _reference(full_s[..., :128], full_t[..., :128], context.labels, loss, 2.0)
    assert abs(float(trimmed) - float(want)) > 1e-4


def test_padded_vocabularies_train_and_keep_the_host_cross_entropy(tmp_path):
    trainer = _padded_trainer(tmp_path, [{"name": "dkd"}, MSE])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["kd/loss/dkd"])) for e in logs)
    # the task CE stays the host's, over the student's whole head: the carrier's CE would be over 120 tokens only
    facts = trainer._kd_host_facts(trainer.model, {}, {"labels": torch.ones(1, 4, dtype=torch.long)},
                                   BatchContext.from_inputs(labels=torch.ones(1, 4, dtype=torch.long)), None, None,
                                   False)
    assert not facts.fusable_task_loss
    assert trainer.distiller.plan(facts).student_mode is StudentMode.HOST


def test_a_cache_built_with_another_tokenizer_is_refused(tmp_path):
    from kd_plugins.integrations.teacher_cache import cache_teacher

    blocks = [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    cache = cache_teacher(tiny_model(seed=1), _other_tokenizer(), blocks, tmp_path / "cache", k=4, progress=False)
    with pytest.raises(IncompatibleModelsError) as info:
        _trainer(tmp_path / "run", cache, [{"name": "forward_kl"}])
    message = str(info.value)
    assert f"teacher cache {cache.path} was built with another tokenizer than the student's" in message
    assert "cross-tokenizer distillation is not configured" in message
