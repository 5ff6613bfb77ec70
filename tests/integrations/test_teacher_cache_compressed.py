"""Compressed teacher caches (``logprob_bits`` / ``hidden_codec``): decoded transparently by ``TeacherCache``, the
decoded top-k consistent with the teacher's true tail mass, sparse losses and their gradients close to the
uncompressed cache's, manifest records, refusals, the CLI, and training from a compressed cache."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from kd_plugins.functional import sparse_linear_kd
from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher, main
from kd_plugins.integrations.trl import KDSFTTrainer

from .conftest import VOCAB, kd_config, sft_args, tiny_model, tiny_tokenizer
from .test_teacher_cache import _blocks, _teacher

K = 8
OPTIONS = {  # name: (logprob_bits, hidden_codec, log-prob tolerance, relative hidden-state tolerance)
    "q8_int8": (8, "int8", 0.01, 0.01),
    "q4_fp8": (4, "fp8", 0.03, 0.06),
    "q2_int4": (2, "int4", 0.15, 0.2),
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    teacher, blocks = _sharp_teacher(), _blocks()
    built = {"raw": cache_teacher(teacher, tiny_tokenizer(), blocks, root / "raw", k=K, layers=(0, -1),
                                  dtype="float32", shard_tokens=30, progress=False)}
    for name, (bits, codec, _, _) in OPTIONS.items():
        built[name] = cache_teacher(teacher, tiny_tokenizer(), blocks, root / name, k=K, layers=(0, -1),
                                    logprob_bits=bits, hidden_codec=codec, shard_tokens=30, progress=False)
    return teacher, blocks, built


def _sharp_teacher():
    """The tiny teacher with its LM head scaled up: peaked distributions like a trained LM's (the random model's
    are nearly flat, where every codec is almost exact)."""
    teacher = _teacher()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(12.0)
    return teacher


@pytest.mark.parametrize("name", list(OPTIONS))
def test_decoded_rows_are_close_and_keep_the_true_tail(caches, name):
    teacher, blocks, built = caches
    raw, cache = built["raw"], built[name]
    _, _, lp_tol, hidden_tol = OPTIONS[name]
    for i in range(len(blocks)):
        a, b = raw.example(i), cache.example(i)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["topk_indices"], b["topk_indices"])
        assert b["topk_logprobs"].dtype == torch.float32
        assert (b["topk_logprobs"] - a["topk_logprobs"]).abs().max() < lp_tol
        with torch.no_grad():
            full = torch.log_softmax(teacher(torch.tensor([blocks[i]])).logits[0].double(), -1)
        true_tail = 1.0 - full.gather(-1, a["topk_indices"]).exp().sum(-1)
        implied_tail = 1.0 - b["topk_logprobs"].double().exp().sum(-1)  # what sparse_linear_kd implies
        torch.testing.assert_close(implied_tail, true_tail, rtol=0, atol=2e-6)
        for layer in (0, 2):
            x, y = a[f"hidden.{layer}"], b[f"hidden.{layer}"]
            assert y.dtype == torch.float32
            assert ((y - x).norm(dim=-1) / x.norm(dim=-1)).max() < hidden_tol


@pytest.mark.parametrize("loss,options", [("forward_kl", {}), ("dkd", {"alpha": 1.0, "beta": 2.0})])
def test_sparse_losses_and_gradients_from_a_compressed_cache(caches, loss, options):
    """The sparse loss of a padded, shuffled batch read from each compressed cache vs from the fp32 cache."""
    _, blocks, built = caches
    order = [5, 0, 9, 3]
    length = max(len(blocks[i]) for i in order)
    ids = torch.zeros(len(order), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, i in enumerate(order):
        ids[b, : len(blocks[i])] = torch.tensor(blocks[i])
        mask[b, : len(blocks[i])] = 1
    labels = torch.where(mask.bool(), torch.roll(ids, -1, 1), -100)
    labels[torch.arange(len(order)), mask.sum(1) - 1] = -100
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(order), length, 16, generator=g)
    weight = torch.randn(VOCAB, 16, generator=g) * 0.5

    def loss_and_grad(cache):
        capture = cache.capture({"input_ids": ids, "attention_mask": mask})
        h = hidden.clone().requires_grad_(True)
        value = sparse_linear_kd(h, weight, capture.topk_logprobs, capture.topk_indices, labels, loss=loss,
                                 loss_kwargs=options)
        value.backward()
        return value.detach(), h.grad

    ref_value, ref_grad = loss_and_grad(built["raw"])
    errors = {}
    for name in OPTIONS:
        value, grad = loss_and_grad(built[name])
        errors[name] = (float((value - ref_value).abs() / ref_value), float((grad - ref_grad).norm() / ref_grad.norm()))
    # measured (forward KL and DKD alike): value 1e-5 / 4e-5 / 1.5e-4, gradient 2e-4 / 6e-4 / 3e-3
    assert errors["q8_int8"][0] < 5e-5 and errors["q8_int8"][1] < 1e-3, errors
    assert errors["q4_fp8"][0] < 2e-4 and errors["q4_fp8"][1] < 3e-3, errors
    assert errors["q2_int4"][0] < 1e-3 and errors["q2_int4"][1] < 1.5e-2, errors
    assert errors["q8_int8"][1] < errors["q4_fp8"][1] < errors["q2_int4"][1]


def test_bytes_manifest_and_refusals(caches, tmp_path):
    teacher, blocks, built = caches
    raw, q8 = built["raw"], built["q8_int8"]
    assert raw.manifest["format_version"] == 1 and raw.manifest["logprob_codec"] == {"name": "float32"}
    assert q8.manifest["format_version"] == 2
    assert q8.manifest["logprob_codec"] == {"name": "powerlaw", "bits": 8, "head": 2, "degree": 3, "id_bits": 7}
    assert q8.manifest["hidden_codec"] == {"name": "int8", "outliers": 4}
    # k = 8, V = 128: 7-bit ids (7 B) + 6 x 8-bit residuals (6 B) + 7 fp16 side values (14 B) + fp32 log tail (4 B)
    assert raw.logit_bytes_per_token() == 64 and q8.logit_bytes_per_token() == 7 + 6 + 14 + 4
    assert q8.hidden_bytes_per_token() == 2 * (48 + 4 + 16)
    header = 64  # safetensors headers, spread over few tokens here
    assert 4 + 31 + 136 <= q8.bytes_per_token() < 4 + 31 + 136 + 3 * header
    assert q8.bytes_per_token() < raw.bytes_per_token() / 2
    with pytest.raises(ValueError, match="both set how hidden states are stored"):
        cache_teacher(teacher, None, blocks, tmp_path / "x", k=K, dtype="float32", hidden_codec="int8", progress=False)
    with pytest.raises(ValueError, match="hidden_codec='int3' is invalid"):
        cache_teacher(teacher, None, blocks, tmp_path / "y", k=K, hidden_codec="int3", progress=False)
    # a format-1 manifest without codec records (written before codecs existed) still reads
    old = tmp_path / "old"
    old.mkdir()
    for f in raw.path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("logprob_codec", "hidden_codec", "world_size"):
        manifest.pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert torch.equal(TeacherCache(old).example(3)["topk_logprobs"], raw.example(3)["topk_logprobs"])
    manifest["logprob_codec"] = {"name": "zstd-magic"}
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="unknown log-prob codec 'zstd-magic'.*rebuild"):
        TeacherCache(old)


def test_cli_writes_a_compressed_cache(tmp_path, capsys):
    _teacher().save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "data.json").write_text(json.dumps(_blocks(4)))
    assert main(["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data.json"), "--out",
                 str(tmp_path / "c"), "--k", "4", "--layers", "1", "--logprob_bits", "4", "--hidden_codec", "fp8"]) == 0
    assert "'powerlaw'" in capsys.readouterr().out
    cache = TeacherCache(tmp_path / "c", k=4, layers=[1])
    assert cache.manifest["hidden_codec"] == {"name": "fp8"} and cache.manifest["logprob_codec"]["bits"] == 4


def test_training_from_a_compressed_cache_tracks_the_uncompressed_one(caches, tmp_path):
    """Same student, data order and terms (a logit term + mse on both cached layers): the losses of 3 SGD steps
    from the 8-bit / int8 cache stay within 1 % of those from the fp32 cache."""
    _, _, built = caches
    terms = [{"name": "forward_kl", "weight": 1.0}, {"name": "mse", "weight": 0.7, "layers": [[0, 0], [1, 2]]}]
    data = Dataset.from_dict({"input_ids": _blocks()})
    logs = {}
    for name in ("raw", "q8_int8"):
        trainer = KDSFTTrainer(model=tiny_model(seed=0), args=sft_args(tmp_path / name, max_steps=3, optim="sgd",
                                                                       learning_rate=0.1),
                               train_dataset=data, processing_class=tiny_tokenizer(), teacher=built[name],
                               kd_config=kd_config(terms))
        trainer.train()
        logs[name] = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs["raw"]) == len(logs["q8_int8"]) == 3
    for a, b in zip(logs["raw"], logs["q8_int8"]):
        for key in ("loss", "kd/loss/forward_kl", "kd/loss/mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-2), key
