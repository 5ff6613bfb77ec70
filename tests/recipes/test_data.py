"""The offline corpus, the by-document split, token blocks and the SFT-ready dataset."""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")

from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks  # noqa: E402


class _CharTokenizer:
    """One id per character (ids 3..), EOS = 1: enough to check blocking without a real tokenizer."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_corpus_is_real_deterministic_text():
    docs = load_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert docs == load_corpus()
    assert all(isinstance(d, str) and d for d in docs)
    with pytest.raises(ValueError, match="unknown"):
        load_corpus("reddit")


def test_split_is_deterministic_disjoint_and_by_document():
    docs = load_corpus()
    train, heldout = split_corpus(docs, heldout_fraction=0.1, seed=0)
    assert (train, heldout) == split_corpus(docs, heldout_fraction=0.1, seed=0)
    assert len(heldout) == round(0.1 * len(docs)) and len(train) + len(heldout) == len(docs)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(docs)
    other = split_corpus(docs, heldout_fraction=0.1, seed=1)[1]
    assert other != heldout


def test_split_edge_cases():
    assert split_corpus(["a", "b"], heldout_fraction=0.01) == (["a"], ["b"]) or split_corpus(
        ["a", "b"], heldout_fraction=0.01
    ) == (["b"], ["a"])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_corpus(["a", "b"], heldout_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_corpus(["a"])


def test_token_blocks_join_with_eos_and_drop_the_tail():
    tok = _CharTokenizer()
    blocks = token_blocks(["abcde", "fgh"], tok, block_size=3)
    stream = tok("abcde")["input_ids"] + [1] + tok("fgh")["input_ids"] + [1]  # 10 ids -> 3 full blocks
    assert blocks == [stream[0:3], stream[3:6], stream[6:9]]
    assert token_blocks(["abcde", "fgh"], tok, block_size=3, max_blocks=2) == blocks[:2]
    with pytest.raises(ValueError, match="block_size"):
        token_blocks(["abc"], tok, block_size=1)


def test_lm_dataset_is_pretokenised():
    ds = lm_dataset([[5, 6, 7], [8, 9, 10]])
    assert ds.column_names == ["input_ids"] and ds[1]["input_ids"] == [8, 9, 10]

