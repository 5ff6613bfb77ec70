"""Offline teacher cache: round trip, refusals of stale/mismatched/corrupt caches, lookup by content, and KD
training from the cache matching training with the live teacher when k == V."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher, main
from kd_plugins.integrations.trl import KDSFTTrainer
from kd_plugins.types import Requirements

from .conftest import VOCAB, kd_config, sft_args, tiny_model, tiny_tokenizer


def _blocks(n=12, seed=0, min_len=6, max_len=12):
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        blocks.append(torch.randint(4, VOCAB, (length,), generator=g).tolist())
    return blocks


def _teacher():
    return tiny_model(seed=1, hidden=48, layers=3, heads=4, kv_heads=2)


@pytest.fixture
def built(tmp_path):
    teacher, blocks = _teacher(), _blocks()
    cache = cache_teacher(teacher, tiny_tokenizer(), blocks, tmp_path / "cache", k=8, layers=(0, -1),
                          dtype="float32", shard_tokens=30, progress=False)
    return teacher, blocks, cache


def test_round_trip(built):
    teacher, blocks, cache = built
    assert len(cache) == len(blocks) and cache.k == 8 and cache.layers == [0, 2]
    assert len(cache.manifest["shards"]) > 1  # shard_tokens=30 splits the data
    assert cache.manifest["teacher_info"]["vocab_size"] == VOCAB
    for i in (0, 5, len(blocks) - 1):
        rows = cache.example(i)
        ids = torch.tensor([blocks[i]])
        with torch.no_grad():
            out = teacher(ids, output_hidden_states=True)
        top = torch.log_softmax(out.logits[0].float(), -1).topk(8, -1)
        assert rows["input_ids"].tolist() == blocks[i]
        torch.testing.assert_close(rows["topk_logprobs"], top.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(rows["topk_indices"].long(), top.indices)
        # hidden_states[j + 1] is the output of block j (the last one after the final norm in HF; block 2 is
        # the last here, so compare block 0 only)
        torch.testing.assert_close(rows["hidden.0"], out.hidden_states[1][0], rtol=1e-5, atol=1e-5)
        assert rows["hidden.2"].shape == (len(blocks[i]), 48)
    # bytes per token: 8k (fp32 log-probs + int32 ids) + 4 (input id) + 2 layers * 48 * 4 + safetensors headers
    assert 8 * 8 + 4 + 2 * 48 * 4 <= cache.bytes_per_token() < 8 * 8 + 4 + 2 * 48 * 4 + 64


def test_capture_by_content_padded_and_shuffled(built):
    _, blocks, cache = built
    order = [3, 0, 7]
    length = max(len(blocks[i]) for i in order)
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for b, i in enumerate(order):
        ids[b, : len(blocks[i])] = torch.tensor(blocks[i])
        mask[b, : len(blocks[i])] = 1
    capture = cache.capture({"input_ids": ids, "attention_mask": mask}, layers=[2])
    assert capture.final_hidden is None and capture.topk_logprobs.shape == (3, length, 8)
    for b, i in enumerate(order):
        rows = cache.example(i)
        n = len(blocks[i])
        assert torch.equal(capture.topk_logprobs[b, :n], rows["topk_logprobs"])
        assert torch.equal(capture.topk_indices[b, :n], rows["topk_indices"].long())
        assert torch.equal(capture.hidden_states[2][b, :n], rows["hidden.2"])
        assert torch.isfinite(capture.topk_logprobs[b]).all()
    # padding-free (packed) row: sequences split at position_ids == 0
    packed = torch.tensor([blocks[1] + blocks[4]])
    positions = torch.tensor([list(range(len(blocks[1]))) + list(range(len(blocks[4])))])
    capture = cache.capture({"input_ids": packed, "position_ids": positions})
    assert torch.equal(capture.topk_indices[0, len(blocks[1]):], cache.example(4)["topk_indices"].long())
    with pytest.raises(TeacherCacheError, match="batch row 0.*not in teacher cache.*max_length"):
        cache.capture({"input_ids": torch.tensor([blocks[0][:-1]])})


def test_refusals(built, tmp_path):
    teacher, blocks, cache = built
    path = cache.path
    TeacherCache(path, tokenizer=tiny_tokenizer(), dataset=blocks, k=8, layers=[0, -1])  # all fine
    with pytest.raises(TeacherCacheError, match="another tokenizer"):
        TeacherCache(path, tokenizer=tiny_tokenizer(VOCAB + 1))
    with pytest.raises(TeacherCacheError, match="other data.*stale"):
        TeacherCache(path, dataset=blocks[:-1])
    with pytest.raises(TeacherCacheError, match="other data"):
        TeacherCache(path, dataset=Dataset.from_dict({"input_ids": [b[::-1] for b in blocks]}))
    with pytest.raises(TeacherCacheError, match="k=8.*k=16"):
        TeacherCache(path, k=16)
    with pytest.raises(TeacherCacheError, match=r"layers \[0, 2\].*needs layers \[1\]"):
        TeacherCache(path, layers=[1])
    with pytest.raises(TeacherCacheError, match="q/k/v"):
        cache.check_requirements(Requirements(teacher_qkv_layers=frozenset({2})))
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        TeacherCache(tmp_path)
    with pytest.raises(TeacherCacheError, match="not empty"):
        cache_teacher(teacher, None, blocks, path, k=4, progress=False)
    shard = path / sorted(cache.manifest["shards"])[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="corrupt"):
        TeacherCache(path)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match="missing"):
        TeacherCache(path)


def test_cli_writes_a_cache(tmp_path, capsys):
    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "data.json").write_text(json.dumps(_blocks(4)))
    assert main(["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data.json"),
                 "--out", str(tmp_path / "c"), "--k", "4", "--layers", "1"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    cache = TeacherCache(tmp_path / "c", tokenizer=tiny_tokenizer(), k=4, layers=[1])
    assert len(cache) == 4


def _train(tmp_path, teacher, terms, steps=3):
    trainer = KDSFTTrainer(
        model=tiny_model(seed=0),
        args=sft_args(tmp_path, max_steps=steps, learning_rate=1e-1, optim="sgd"),  # SGD: updates linear in grads
        train_dataset=Dataset.from_dict({"input_ids": _blocks(16, seed=2)}),
        processing_class=tiny_tokenizer(),
        teacher=teacher,
        kd_config=kd_config(terms),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return trainer, logs


def test_training_from_a_full_vocabulary_cache_matches_the_live_teacher(tmp_path):
    terms = [
        {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0, "temperature": 2.0},
        {"name": "mse", "weight": 0.7, "layers": "uniform"},
    ]
    live, live_logs = _train(tmp_path / "live", _teacher(), terms)
    cache = cache_teacher(_teacher(), tiny_tokenizer(), _blocks(16, seed=2), tmp_path / "cache", k=VOCAB,
                          layers=range(3), dtype="float32", progress=False)
    cached, cached_logs = _train(tmp_path / "cached", cache, terms)
    assert cached.kd_teacher is cache  # the cache is the teacher source: no teacher model at all
    assert len(live_logs) == len(cached_logs) == 3
    for a, b in zip(live_logs, cached_logs):
        for key in ("loss", "kd/loss/dkd", "kd/loss/mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for (name, p), q in zip(live.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_refuses_a_cache_without_needed_teacher_features(tmp_path):
    cache = cache_teacher(_teacher(), tiny_tokenizer(), _blocks(16, seed=2), tmp_path / "cache", k=8,
                          progress=False)
    with pytest.raises(TeacherCacheError, match="q/k/v"):
        _train(tmp_path / "t", cache, [{"name": "attention_relation", "weight": 0.5, "student_layer": -1,
                                        "teacher_layer": -1, "relation_heads": 2}])
    with pytest.raises(TeacherCacheError, match="needs layers"):
        _train(tmp_path / "t2", cache, [{"name": "mse", "weight": 0.7, "layers": "uniform"}])
    # a top-k (k < V) cache trains a logit term
    _, logs = _train(tmp_path / "t3", cache, [{"name": "forward_kl", "weight": 1.0}], steps=2)
    assert len(logs) == 2
    assert all(math.isfinite(e["kd/loss/forward_kl"]) and e["kd/loss/forward_kl"] > 0 for e in logs), logs
