"""``kd-plugins cache-teacher`` under ``torchrun --nproc_per_node 2`` (gloo on CPU): each rank writes its own shards
over a rank-strided split of the data, rank 0 merges the index, and the cache reads row for row like one written
by a single process -- bit for bit when both run the same kernels (one thread each, one example per forward:
batching other examples together may change float rounding, not the encoding, which is row-local).

The ranks are launched as ``python -m torch.distributed.run`` with this interpreter (a ``torchrun`` script may
belong to another environment)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, _agree, cache_teacher

from .conftest import tiny_tokenizer
from .test_teacher_cache import _blocks, _teacher

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.slow

CASES = {  # name: (layers, options of cache_teacher) -- the CLI gets the same as flags
    "raw": ([0, 2], {"dtype": "float32"}),
    "compressed": ([1], {"logprob_bits": 4, "hidden_codec": "int8"}),
}


def _flags(layers, options) -> list[str]:
    flags = ["--layers", *map(str, layers)]
    for key, value in options.items():
        flags += [f"--{key}", str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, teacher: Path, data: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "KD_PLUGINS_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "kd_plugins.cli", "cache-teacher", "--teacher", str(teacher),
               "--data", str(data), "--out", str(out), "--k", "8", "--shard_tokens", "30", "--batch_size", "1", *extra]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_ddp")
    _teacher().save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    blocks = _blocks(13, seed=3, min_len=3, max_len=12)  # rank 0 gets 7 examples, rank 1 six
    (root / "data.json").write_text(json.dumps(blocks))
    (root / "taken").mkdir()
    (root / "taken" / "something").write_text("x")
    procs = {name: _launch(root / name, root / "teacher", root / "data.json", _flags(*case))
             for name, case in CASES.items()}
    procs["taken"] = _launch(root / "taken", root / "teacher", root / "data.json", [])
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return root, blocks, codes


def _single(root: Path, blocks, name: str) -> TeacherCache:
    """The same cache written by one process in this one (one thread, like each rank)."""
    from transformers import AutoModelForCausalLM

    layers, options = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
        return cache_teacher(teacher, tiny_tokenizer(), blocks, root / f"{name}_single", k=8, layers=layers,
                             shard_tokens=30, batch_size=1, teacher_id=str(root / "teacher"), progress=False,
                             **options)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_write_the_single_process_cache_row_for_row(runs, name):
    root, blocks, codes = runs
    assert codes[name] == 0, (root / f"{name}.log").read_text()[-4000:]
    log = (root / f"{name}.log").read_text()
    assert log.count("wrote 13 examples") == 1 and "by 2 ranks" in log  # rank 0 reports, once
    sharded, single = TeacherCache(root / name, tokenizer=tiny_tokenizer(), dataset=blocks), _single(root, blocks, name)
    shards = sorted(sharded.manifest["shards"])
    assert any(s.startswith("shard-r00000-") for s in shards) and any(s.startswith("shard-r00001-") for s in shards)
    assert sorted(p.name for p in (root / name).iterdir()) == sorted(["index.json", "manifest.json", *shards])
    assert sharded.manifest["world_size"] == 2 and single.manifest["world_size"] == 1
    index = json.loads((root / name / "index.json").read_text())["examples"]
    assert [entry[0] for entry in index] == list(range(len(blocks)))  # merged, in order, each example once
    assert all(entry[1].startswith(f"shard-r{entry[0] % 2:05d}-") for entry in index)  # rank r wrote r, r+2, ...
    for key in ("dataset_fingerprint", "tokenizer_hash", "k", "layers", "num_tokens", "num_examples",
                "logprob_codec", "hidden_codec", "teacher_info"):
        assert sharded.manifest[key] == single.manifest[key], key
    assert len(sharded) == len(single) == len(blocks)
    for i in range(len(blocks)):
        a, b = sharded.example(i), single.example(i)
        assert a.keys() == b.keys() and a["input_ids"].tolist() == blocks[i]
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    # lookup by content across the ranks' shards: example 4 (rank 0) and 7 (rank 1) in one padded batch
    length = max(len(blocks[4]), len(blocks[7]))
    ids, mask = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length, dtype=torch.long)
    for row, i in enumerate((4, 7)):
        ids[row, : len(blocks[i])], mask[row, : len(blocks[i])] = torch.tensor(blocks[i]), 1
    capture = sharded.capture({"input_ids": ids, "attention_mask": mask}, layers=sharded.layers)
    for row, i in enumerate((4, 7)):
        n = len(blocks[i])
        assert torch.equal(capture.topk_logprobs[row, :n], single.example(i)["topk_logprobs"])
        assert torch.equal(capture.topk_indices[row, :n], single.example(i)["topk_indices"])


def test_a_refused_output_directory_stops_every_rank(runs):
    """The output directory is not empty: the CLI's input check refuses it on every rank before the teacher is
    loaded, and both ranks exit with the message (nobody waits at a collective, nothing is written)."""
    root, _, codes = runs
    assert codes["taken"] != 0
    log = (root / "taken.log").read_text()
    assert log.count("exists and is not an empty folder; choose a new directory") == 2
    assert sorted(p.name for p in (root / "taken").iterdir()) == ["something"]


def test_a_failure_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """``_agree`` is one all-gather: the failing rank re-raises its own error, the others a TeacherCacheError naming
    it; with no failure nobody raises."""
    import torch.distributed as dist

    gathered = ["", "rank 1: ValueError: bad hidden state"]
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), gathered))
    with pytest.raises(TeacherCacheError, match="failed on another rank: rank 1: ValueError: bad hidden state"):
        _agree("", rank=0, world=2)
    with pytest.raises(ValueError, match="its own"):
        _agree(gathered[1], rank=1, world=2, error=ValueError("its own"))
    gathered[:] = ["", ""]
    _agree("", rank=0, world=2)
