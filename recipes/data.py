"""Real text for the main job, available offline: the Python reference-manual topics in ``pydoc_data``.

``pydoc_data.topics.topics`` ships with every CPython (it backs ``help("topic")``): its distinct documents, ~465 KB of
English technical prose and code from the Python Language Reference, under the PSF License. Nobody on this
project wrote it, and no hub is needed to get it.

Pipeline: :func:`load_corpus` -> :func:`split_corpus` (by document, so held-out text is never trained on) ->
:func:`token_blocks` (fixed-length blocks, documents joined by EOS) -> :func:`lm_dataset` (a pre-tokenised
``datasets.Dataset`` that TRL's ``SFTTrainer`` uses as-is: it sees ``input_ids`` and skips tokenisation).

Out-of-domain corpora, **for evaluation only** (:func:`load_eval_corpus`, :data:`EVAL_CORPORA`): ordinary English
that no training path reads. :func:`load_corpus` -- the only loader the training recipes call -- refuses their
names, and ``tests/recipes/test_data.py`` checks that no training loader returns their text.

* ``wikipedia``: the 106 articles of the shortened English Wikipedia dump that the ``gensim`` wheel ships as test
  data (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, a 2016
  dump: Anarchism, Autism, Albedo, Abraham Lincoln, Aristotle, ...), wiki markup stripped to plain paragraphs.
  Text: Wikipedia contributors, CC BY-SA 3.0 (and GFDL).
* ``dialog``: the English conversations of ``chatterbot-corpus`` (BSD-3-Clause), without its technical categories
  (``coding``, ``tech_support``, ``computers``): short everyday questions and answers about food, history,
  literature, money, movies, science, sports, trivia, ...

Both packages are in the ``eval`` extra (``pip install 'kd_plugins[eval]'``); only their data files are read
(``gensim`` is located, never imported).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

CORPORA = ("pydoc_topics",)
"""Corpora a training recipe may read (:func:`load_corpus`)."""

EVAL_CORPORA = ("wikipedia", "dialog")
"""Out-of-domain corpora for evaluation only (:func:`load_eval_corpus`); never returned by :func:`load_corpus`."""

EVAL_CORPUS_SOURCES = {
    "wikipedia": "English Wikipedia, 106 articles of a 2016 dump shipped as test data by the gensim wheel "
                 "(CC BY-SA 3.0 / GFDL, Wikipedia contributors), markup stripped",
    "dialog": "chatterbot-corpus English conversations without the coding / tech_support / computers categories "
              "(BSD-3-Clause)",
}

__all__ = [
    "CORPORA", "EVAL_CORPORA", "EVAL_CORPUS_SOURCES", "dialog_conversations", "load_corpus", "load_eval_corpus",
    "lm_dataset", "split_corpus", "token_blocks", "wikipedia_articles", "wikitext_to_text",
]


def load_corpus(name: str = "pydoc_topics") -> list[str]:
    """The distinct documents of a built-in corpus, in a deterministic order (sorted by topic name).

    Several pydoc topics share one text (aliases such as ``TYPES``/``types``); each text appears once, so a
    by-document split can never put the same text on both sides.

    This is the loader for training text. The evaluation-only corpora (:data:`EVAL_CORPORA`) are refused here:
    read them with :func:`load_eval_corpus`, which no training recipe calls.

    Raises:
        ValueError: unknown corpus name, or an evaluation-only corpus.
    """
    if name in EVAL_CORPORA:
        raise ValueError(f"corpus {name!r} is for evaluation only and is never training data; "
                         f"read it with load_eval_corpus({name!r}); training corpora: {CORPORA}")
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


def load_eval_corpus(name: str) -> list[str]:
    """The documents of an out-of-domain **evaluation-only** corpus (see :data:`EVAL_CORPORA`), deterministic.

    For evaluation (:mod:`kd_plugins.recipes.retention`, ``kd-plugins eval``, the task generator in
    ``recipes/tasks/``) only: no training path reads these, so they measure what a student keeps outside its
    training text.

    * ``wikipedia``: one document per article (markup stripped; reference sections dropped), in dump order.
    * ``dialog``: one document per chatterbot-corpus category file (sorted by name), one utterance per line and a
      blank line between conversations.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the package that ships the corpus is missing (the message has the install command).
    """
    if name == "wikipedia":
        return _wikipedia_articles()
    if name == "dialog":
        return ["\n\n".join("\n".join(turns) for turns in conversations)
                for conversations in _dialog_conversations().values()]
    raise ValueError(f"evaluation corpus {name!r} is unknown; available: {EVAL_CORPORA}")


def dialog_conversations() -> dict[str, list[list[str]]]:
    """The ``dialog`` corpus as ``{category: [conversation, ...]}``, each conversation a list of utterances.

    Evaluation only, like :func:`load_eval_corpus` (the task generator builds its reply-selection task from it).
    """
    return _dialog_conversations()


def wikipedia_articles() -> list[tuple[str, str]]:
    """The ``wikipedia`` corpus as ``(title, plain text)`` pairs, in dump order. Evaluation only."""
    return list(_wikipedia_pages())


# --- evaluation corpora: helpers ------------------------------------------------------------------------------

_EVAL_INSTALL = "pip install 'kd_plugins[eval]'  (or: pip install gensim chatterbot-corpus)"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_DIALOG_SKIP = ("coding", "tech_support", "computers")  # technical categories: too close to the training domain
_WIKI_STOP_SECTIONS = ("see also", "references", "external links", "further reading", "notes", "bibliography",
                       "sources", "footnotes", "citations")


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the evaluation corpus needs the package {package!r}, which is not installed: "
                                f"{_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _wikipedia_articles() -> list[str]:
    return [text for _, text in _wikipedia_pages()]


def _wikipedia_pages():
    import bz2
    import xml.etree.ElementTree as ET

    path = _package_dir("gensim") / "test" / "test_data" / _WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim package; reinstall it: {_EVAL_INSTALL}")
    root = ET.fromstring(bz2.decompress(path.read_bytes()))
    ns = {"m": root.tag.split("}")[0].lstrip("{")}
    for page in root.findall("m:page", ns):
        if page.find("m:redirect", ns) is not None or page.findtext("m:ns", namespaces=ns) != "0":
            continue
        text = wikitext_to_text(page.findtext("m:revision/m:text", default="", namespaces=ns))
        if len(text.split()) >= 50:
            yield page.findtext("m:title", namespaces=ns), text


def _dialog_conversations() -> dict[str, list[list[str]]]:
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no English conversations in {folder}; reinstall chatterbot-corpus: {_EVAL_INSTALL}")
    out: dict[str, list[list[str]]] = {}
    for file in files:
        if file.stem in _DIALOG_SKIP:
            continue
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        conversations = [[" ".join(str(turn).split()) for turn in conv if str(turn).strip()]
                         for conv in data.get("conversations") or []]
        conversations = [conv for conv in conversations if len(conv) >= 2]
        if conversations:
            out[file.stem] = conversations
    return out


def wikitext_to_text(wikitext: str) -> str:
    """Plain paragraphs from MediaWiki markup: templates, tables, references, files, categories, HTML and list /
    table lines removed; links replaced by their label; everything from a reference section (See also,
    References, External links, ...) on dropped; paragraphs of fewer than 8 words dropped."""
    import html
    import re

    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for opening, closing in (("{{", "}}"), ("{|", "|}")):
        text = _drop_nested(text, opening, closing)
    link = r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]"
    for _ in range(3):  # links nested inside file captions
        text = re.sub(r"\[\[(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]", "", text)
        text = re.sub(link, lambda m: m.group(2) if m.group(2) is not None else m.group(1), text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    paragraphs: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            if heading.group(1).strip().lower() in _WIKI_STOP_SECTIONS:
                break
            continue
        if not line or line[0] in "*#:;|!{}" or line.startswith("__"):
            continue
        line = re.sub(r"\(\s*[;,]?\s*\)", "", " ".join(line.split()))  # "( )" left by removed templates
        line = " ".join(re.sub(r"\s+([,.;:])", r"\1", line).split())
        if len(line.split()) >= 8:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """``text`` without any (nested) ``opening ... closing`` span; an unclosed span runs to the end."""
    import re

    out: list[str] = []
    depth = start = 0
    for match in re.finditer(re.escape(opening) + "|" + re.escape(closing), text):
        if match.group() == opening:
            if depth == 0:
                out.append(text[start:match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                start = match.end()
    if depth == 0:
        out.append(text[start:])
    return "".join(out)
