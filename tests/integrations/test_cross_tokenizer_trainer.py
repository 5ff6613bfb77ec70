"""A KDSFTTrainer with a teacher of another tokenizer: with ``cross_tokenizer: true`` the teacher reads
its own tokenization and the span terms train (the transfer loss falls); without it the teacher is refused, naming
the fix; impossible combinations are refused before the first step."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from kd_plugins import ConfigError, IncompatibleModelsError
from kd_plugins.integrations.trl import KDSFTTrainer

from ._two_tokenizers import CORPUS, byte_bpe, wordpiece
from .conftest import kd_config, sft_args, tiny_model

TEXTS = CORPUS + ["the cat and the dog sat", "a dog on a mat", "the log on the mat", "café déjà vu"]
TERMS = [{"name": "cross_vocab_kd", "weight": 1.0, "uld_weight": 0.5},
         {"name": "mse", "weight": 1.0, "layers": "uniform"}]


def _student():
    return tiny_model(vocab=len(byte_bpe()), seed=0)


def _teacher():
    return tiny_model(vocab=len(wordpiece()), seed=1, hidden=48, layers=3, heads=4, kv_heads=4)


def _trainer(tmp_path, *, terms=TERMS, teacher=None, config=None, max_steps=2, **kwargs):
    args = sft_args(tmp_path, max_steps=max_steps, per_device_train_batch_size=len(TEXTS), learning_rate=1e-2,
                    **kwargs.pop("args", {}))
    return KDSFTTrainer(model=_student(), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                        processing_class=byte_bpe(), teacher=teacher if teacher is not None else _teacher(),
                        kd_config=kd_config(terms, **({"ce_weight": 0.0, "cross_tokenizer": True} | (config or {}))),
                        **kwargs)


def test_the_transfer_loss_falls_when_the_teacher_reads_its_own_tokens(tmp_path):
    trainer = _trainer(tmp_path, max_steps=12, teacher_tokenizer=wordpiece())
    seen = []
    capture = trainer.kd_teacher.capture

    def recording(inputs, requirements):
        seen.append(inputs["input_ids"].clone())
        return capture(inputs, requirements)

    trainer.kd_teacher.capture = recording
    trainer.train()
    losses = [log["kd/transfer"] for log in trainer.state.log_history if "kd/transfer" in log]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all(log["kd/loss/cross_vocab_kd"] > 0 and log["kd/loss/mse"] > 0 for log in trainer.state.log_history
               if "kd/loss/mse" in log)
    # the teacher was given the teacher tokenizer's ids of the texts (its BOS first), not the student's
    teacher_tok = wordpiece()
    first = seen[0][0]
    assert int(first[0]) == teacher_tok.bos_token_id
    row_texts = {tuple(teacher_tok(t)["input_ids"]) for t in TEXTS}
    assert tuple(int(i) for i in first if i != teacher_tok.pad_token_id) in row_texts


def test_without_cross_tokenizer_the_teacher_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(IncompatibleModelsError) as info:
        _trainer(tmp_path, config={"cross_tokenizer": False}, terms=[TERMS[1]], teacher_tokenizer=wordpiece())
    message = str(info.value)
    assert "have different tokenizers" in message
    assert "cross-tokenizer distillation is not configured" in message
    assert "set cross_tokenizer: true in the KD config" in message


def test_terms_that_compare_positions_are_refused(tmp_path):
    relation = {"name": "attention_relation", "student_layer": -1, "teacher_layer": -1, "relation_heads": 2}
    with pytest.raises(ConfigError, match=r"cross_tokenizer: true, but terms \['attention_relation "
                                          r"\(AttentionRelationLoss\)'\] compare positions of one tokenization.*"
                                          r"contrastive, mse, cosine, uld, cross_vocab_kd"):
        _trainer(tmp_path, terms=[TERMS[1], relation], teacher_tokenizer=wordpiece())
    with pytest.raises(ConfigError, match=r"cross_tokenizer: true, but logit term 'dkd' compares the output "
                                          r"distributions.*use terms that compare aligned spans: contrastive"):
        _trainer(tmp_path, terms=[{"name": "dkd"}], teacher_tokenizer=wordpiece())


def test_an_unknown_teacher_tokenizer_packed_batches_and_a_self_teacher_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"the teacher's \(teacher_tokenizer=\) tokenizer is unknown"):
        _trainer(tmp_path, terms=[TERMS[1]])
    with pytest.raises(ConfigError, match="padding-free"):
        _trainer(tmp_path, terms=[TERMS[1]], teacher_tokenizer=wordpiece(), args={"packing": True})
    with pytest.raises(ConfigError, match="teacher='self'"):
        _trainer(tmp_path, terms=[TERMS[1]], teacher="self", teacher_tokenizer=wordpiece())


def test_one_tokenizer_with_cross_tokenizer_trains_as_usual(tmp_path):
    trainer = _trainer(tmp_path, terms=[{"name": "dkd"}], teacher=_student(), teacher_tokenizer=byte_bpe())
    assert trainer._kd_installed.cross_tokenizer is None
    trainer.train()


def test_enable_distillation_and_the_yaml_key(tmp_path):
    from trl import SFTTrainer

    from kd_plugins import KDConfig
    from kd_plugins.integrations.trl import enable_distillation

    (tmp_path / "kd.yaml").write_text("ce_weight: 1.0\ncross_tokenizer: true\nterms:\n  - {name: uld}\n"
                                      "  - {name: cosine, layers: last, span_pooling: last}\n")
    assert KDConfig.from_yaml(tmp_path / "kd.yaml").cross_tokenizer is True
    with pytest.raises(ConfigError, match="cross_tokenizer='yes' is invalid"):
        KDConfig.from_dict({"terms": ["uld"], "cross_tokenizer": "yes"})
    trainer = SFTTrainer(model=_student(), args=sft_args(tmp_path / "run", max_steps=1),
                         train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=byte_bpe())
    enable_distillation(trainer, teacher=_teacher(), config=str(tmp_path / "kd.yaml"), teacher_tokenizer=wordpiece())
    assert trainer._kd_installed.cross_tokenizer is not None
    trainer.train()
    assert any("kd/loss/uld" in log for log in trainer.state.log_history)
