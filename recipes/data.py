"""Real text for the main job, available offline: the Python reference-manual topics in ``pydoc_data``.

``pydoc_data.topics.topics`` ships with every CPython (it backs ``help("topic")``): its distinct documents, ~465 KB of
English technical prose and code from the Python Language Reference, under the PSF License. Nobody on this
project wrote it, and no hub is needed to get it.

Pipeline: :func:`load_corpus` -> :func:`split_corpus` (by document, so held-out text is never trained on) ->
:func:`token_blocks` (fixed-length blocks, documents joined by EOS) -> :func:`lm_dataset` (a pre-tokenised
``datasets.Dataset`` that TRL's ``SFTTrainer`` uses as-is: it sees ``input_ids`` and skips tokenisation).
"""

from __future__ import annotations

import random
from typing import Sequence

CORPORA = ("pydoc_topics",)

__all__ = ["CORPORA", "load_corpus", "lm_dataset", "split_corpus", "token_blocks"]


def load_corpus(name: str = "pydoc_topics") -> list[str]:
    """The distinct documents of a built-in corpus, in a deterministic order (sorted by topic name).

    Several pydoc topics share one text (aliases such as ``TYPES``/``types``); each text appears once, so a
    by-document split can never put the same text on both sides.

    Raises:
        ValueError: unknown corpus name.
    """
    if name != "pydoc_topics":
        raise ValueError(f"corpus {name!r} is unknown; available: {CORPORA}")
    from pydoc_data.topics import topics

    docs: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(text)
    return docs


def split_corpus(
    docs: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split by document into ``(train, heldout)``; deterministic for a given ``seed``.

    At least one document goes to each side (when there are two or more). Order inside each side follows
    ``docs``.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} is invalid; expected 0 < fraction < 1")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(docs) - 1, max(1, round(len(docs) * heldout_fraction)))
    heldout_ids = set(order[:n_heldout])
    train = [doc for i, doc in enumerate(docs) if i not in heldout_ids]
    heldout = [doc for i, doc in enumerate(docs) if i in heldout_ids]
    return train, heldout


def token_blocks(
    texts: Sequence[str], tokenizer, block_size: int = 128, max_blocks: int | None = None
) -> list[list[int]]:
    """Tokenise, join documents with the EOS token, and cut into full blocks of ``block_size`` ids.

    The tail shorter than a block is dropped. ``max_blocks`` keeps only the first blocks.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size!r} is invalid; expected >= 2")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return blocks[:max_blocks] if max_blocks is not None else blocks


def lm_dataset(blocks: Sequence[Sequence[int]]):
    """A ``datasets.Dataset`` with one ``input_ids`` column: plain language modelling on every token.

    TRL's ``SFTTrainer`` treats a dataset with ``input_ids`` as already processed (no chat template, no
    completion mask), and its collator makes ``labels`` a copy of ``input_ids``.
    """
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(map(int, block)) for block in blocks]})
