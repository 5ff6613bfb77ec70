"""The teacher cache against the training data: checked up front (a half-matching dataset is refused
before the first step, not at step 4), text data that TRL tokenises with an appended EOS matches a cache built from
the same ids (exactly: equal to the live teacher), a cache can be named in the KD config or as a teacher path, and
``kd-plugins cache-teacher`` prints messages, not tracebacks, for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from kd_plugins import cli
from kd_plugins.errors import ConfigError
from kd_plugins.integrations.cache_coverage import AppendedEosCache
from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher
from kd_plugins.integrations.trl import KDSFTTrainer
from kd_plugins.types import Requirements

from .conftest import VOCAB, kd_config, sft_args, tiny_model, tiny_texts, tiny_tokenizer

LOGIT = [{"name": "dkd", "weight": 1.0, "temperature": 2.0}]


def _teacher():
    return tiny_model(seed=1, hidden=48, layers=3)


def _blocks(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _trainer(tmp_path, teacher, data, terms=LOGIT, steps=2, **args):
    return KDSFTTrainer(model=tiny_model(seed=0), args=sft_args(tmp_path, max_steps=steps, optim="sgd",
                                                                learning_rate=0.1, **args),
                        train_dataset=data, processing_class=tiny_tokenizer(), teacher=teacher,
                        kd_config=kd_config(terms))


def _logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def test_a_dataset_the_cache_only_half_covers_is_refused_before_training(tmp_path):
    cached = _blocks(12, seed=0)
    cache = cache_teacher(_teacher(), tiny_tokenizer(), cached, tmp_path / "cache", k=8, progress=False)
    data = Dataset.from_dict({"input_ids": cached[:8] + _blocks(8, seed=5)})
    with pytest.raises(TeacherCacheError) as info:
        _trainer(tmp_path / "run", cache, data)
    message = str(info.value)
    assert f"teacher cache {cache.path} does not cover the training data: 8 of 16 training sequences are not " \
           "cached examples" in message
    assert "nothing was trained" in message and "max_length truncation" in message


def test_a_covered_dataset_uses_the_cache_itself(tmp_path):
    blocks = _blocks(8, seed=0)
    cache = cache_teacher(_teacher(), tiny_tokenizer(), blocks, tmp_path / "cache", k=8, progress=False)
    trainer = _trainer(tmp_path / "run", cache, Dataset.from_dict({"input_ids": blocks}))
    assert trainer.kd_teacher is cache


def _text_cache(tmp_path, texts, **kwargs):
    """A full-vocabulary cache built from the ids the tokenizer gives the texts -- without the EOS TRL appends."""
    tok = tiny_tokenizer()
    ids = [tok(text)["input_ids"] for text in texts]
    assert all(row[-1] != tok.eos_token_id for row in ids)
    return cache_teacher(_teacher(), tok, ids, tmp_path / "cache", k=VOCAB, dtype="float32", progress=False, **kwargs)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_text_data_with_an_appended_eos_matches_a_cache_of_the_same_ids(tmp_path, packing):
    texts = tiny_texts(16, seed=3)
    data = Dataset.from_dict({"text": texts})
    extra = {"packing": True, "padding_free": True, "per_device_train_batch_size": 2} if packing else {}
    live = _trainer(tmp_path / "live", _teacher(), data, **extra)
    assert all(row[-1] == tiny_tokenizer().eos_token_id for row in live.train_dataset["input_ids"]) or packing
    live.train()
    cached = _trainer(tmp_path / "cached", _text_cache(tmp_path, texts), data, **extra)
    assert isinstance(cached.kd_teacher, AppendedEosCache)
    cached.train()
    for a, b in zip(_logs(live), _logs(cached), strict=True):
        for key in ("loss", "kd/loss/dkd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for (name, p), q in zip(live.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_an_appended_eos_with_cached_hidden_states_is_refused(tmp_path):
    texts = tiny_texts(8, seed=3)
    cache = _text_cache(tmp_path, texts, layers=(0, 1, 2))
    with pytest.raises(TeacherCacheError) as info:
        _trainer(tmp_path / "run", cache, Dataset.from_dict({"text": texts}),
                 terms=[{"name": "mse", "weight": 1.0, "layers": "uniform"}])
    message = str(info.value)
    assert "8 training rows end with the EOS token (id 1) the trainer appended" in message
    assert "holds no teacher hidden states" in message and "trainer.train_dataset" in message


# --- naming a cache -------------------------------------------------------------------------------------------------


def _cache_and_data(tmp_path):
    blocks = _blocks(8, seed=0)
    cache_teacher(_teacher(), tiny_tokenizer(), blocks, tmp_path / "cache", k=8, progress=False)
    return tmp_path / "cache", Dataset.from_dict({"input_ids": blocks})


def test_the_kd_config_can_name_a_cache(tmp_path):
    folder, data = _cache_and_data(tmp_path)
    trainer = KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path / "run", max_steps=1), train_dataset=data,
                           processing_class=tiny_tokenizer(), kd_config=kd_config(LOGIT, teacher_cache=str(folder)))
    assert isinstance(trainer.kd_teacher, TeacherCache) and trainer.kd_teacher.path == folder
    trainer.train()
    assert "kd/loss/dkd" in _logs(trainer)[-1]


def test_a_teacher_path_naming_a_cache_folder_reads_the_cache(tmp_path):
    folder, data = _cache_and_data(tmp_path)
    trainer = _trainer(tmp_path / "run", str(folder), data)
    assert isinstance(trainer.kd_teacher, TeacherCache)


def test_a_cache_and_a_teacher_together_are_refused(tmp_path):
    folder, data = _cache_and_data(tmp_path)
    with pytest.raises(ConfigError, match=r"both teacher=LlamaForCausalLM and teacher_cache=.* are given; pass one"):
        KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path / "run"), train_dataset=data,
                     processing_class=tiny_tokenizer(), teacher=_teacher(),
                     kd_config=kd_config(LOGIT, teacher_cache=str(folder)))


def test_a_missing_cache_folder_is_named(tmp_path):
    with pytest.raises(TeacherCacheError, match=r"teacher_cache='.*no_cache' does not exist .*kd-plugins cache-teacher"):
        KDSFTTrainer(model=tiny_model(), args=sft_args(tmp_path / "run"), train_dataset=_cache_and_data(tmp_path)[1],
                     processing_class=tiny_tokenizer(), kd_config=kd_config(LOGIT, teacher_cache=str(tmp_path / "no_cache")))


# --- kd-plugins cache-teacher: messages, not tracebacks -------------------------------------------------------------


@pytest.fixture
def teacher_dir(tmp_path):
    _teacher().save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


@pytest.mark.parametrize("case, fragment", [
    ("teacher", "--teacher './no/such/teacher' does not exist"),
    ("data", "--data '{tmp}/missing.json' does not exist"),
    ("json", "--data '{tmp}/bad.json' is not valid JSON"),
    ("shape", "--data '{tmp}/flat.json' must hold a non-empty list of non-empty token-id lists"),
    ("k", "k=1000 must be in [1, vocab_size=128]"),
    ("layers", "layer 7 is out of range"),
    ("out", "exists and is not an empty folder"),
])
def test_cache_teacher_bad_input_prints_a_message(tmp_path, teacher_dir, capsys, case, fragment):
    (tmp_path / "data.json").write_text(json.dumps(_blocks(3, seed=0)))
    (tmp_path / "bad.json").write_text("[[1, 2,")
    (tmp_path / "flat.json").write_text("[]")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {"teacher": str(teacher_dir), "data": str(tmp_path / "data.json"), "out": str(tmp_path / "c")}
    extra: list[str] = []
    if case == "teacher":
        args["teacher"] = "./no/such/teacher"
    elif case == "data":
        args["data"] = str(tmp_path / "missing.json")
    elif case == "json":
        args["data"] = str(tmp_path / "bad.json")
    elif case == "shape":
        args["data"] = str(tmp_path / "flat.json")
    elif case == "k":
        extra = ["--k", "1000"]
    elif case == "layers":
        extra = ["--layers", "7"]
    elif case == "out":
        args["out"] = str(tmp_path / "full")
    argv = ["cache-teacher", *(x for key, value in args.items() for x in (f"--{key}", value)), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("kd-plugins cache-teacher: ") and "Traceback" not in err
    assert fragment.format(tmp=tmp_path) in err, err


def test_an_appended_eos_keeps_the_full_distribution_of_a_cache_with_final_hidden_states(tmp_path):
    tok, teacher = tiny_tokenizer(), _teacher()
    ids = [tok(text)["input_ids"] for text in tiny_texts(4, seed=3)]
    cache = cache_teacher(teacher, tok, ids, tmp_path / "cache", k=4, dtype="float32", final_hidden=True,
                          progress=False)
    eos = tok.eos_token_id
    width = max(map(len, ids)) + 1
    batch = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(batch)
    for b, row in enumerate(ids):  # the rows as TRL trains on them: the ids + EOS, right-padded
        batch[b, : len(row) + 1] = torch.tensor(row + [eos])
        mask[b, : len(row) + 1] = 1
    capture = AppendedEosCache(cache, eos).capture({"input_ids": batch, "attention_mask": mask},
                                                   Requirements(final_hidden=True))
    assert capture.final_hidden is not None and capture.lm_head_weight is not None
    with torch.no_grad():
        for b, row in enumerate(ids):  # every position before the EOS: the teacher's own logits
            logits = teacher(input_ids=torch.tensor([row])).logits[0]
            dense = capture.final_hidden[b, : len(row)] @ capture.lm_head_weight.T
            torch.testing.assert_close(dense, logits, rtol=1e-5, atol=1e-5)
