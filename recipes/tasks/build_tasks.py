"""Rebuild the shipped multiple-choice task data (``recipes/tasks/data/*.jsonl``) from text that ships offline.

    .venv/bin/python -m kd_plugins.recipes.tasks.build_tasks          # rewrites data/*.jsonl, prints counts
    .venv/bin/python -m kd_plugins.recipes.tasks.build_tasks --check  # exit 1 if the shipped files differ

Deterministic (fixed seeds, sorted inputs): the shipped JSONL files are exactly this script's output for the
installed corpus packages (``tests/recipes/test_retention.py`` checks that when they are installed). Every source is
an evaluation-only corpus of :mod:`kd_plugins.recipes.data` (``wikipedia``, ``dialog``), which no training path
reads. Sources and licences: ``README.md`` here.

Each line: ``{"id", "context", "choices": [4 strings], "label": index of the right choice, "source"}``; the task
YAMLs score ``context + " " + choice`` by log-likelihood (lm-evaluation-harness ``multiple_choice``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
ITEMS = 250
CHOICES = 4

__all__ = ["build_all", "cloze_items", "dialog_reply_items", "main"]


def build_all(items: int = ITEMS) -> dict[str, list[dict]]:
    """Every task's items, ``{task name: [item, ...]}`` (task names as in the YAML files)."""
    from kd_plugins.recipes.data import dialog_conversations, wikipedia_articles

    wiki = [(title, text) for title, text in wikipedia_articles()]
    return {
        "kd_wiki_cloze": cloze_items([t for _, t in wiki], items, seed=1, source="wikipedia",
                                     names=[n for n, _ in wiki]),
        "kd_dialog_reply": dialog_reply_items(dialog_conversations(), items, seed=2),
    }


def cloze_items(docs: Sequence[str], n: int, *, seed: int, source: str, names: Sequence[str] | None = None) -> list[dict]:
    """Last-word cloze: a sentence without its final word; the choices are that word and three other sentences'
    final words (lower-case, alphabetic, at least 4 letters, absent from the sentence). Sentences are taken
    round-robin over the documents so every document contributes."""
    rng = random.Random(seed)
    per_doc = []
    for d, doc in enumerate(docs):
        found = [s for s in _sentences(doc) if _cloze_ok(s)]
        rng.shuffle(found)
        per_doc.append([(d, s) for s in found])
    pool = sorted({_last_word(s) for doc in per_doc for _, s in doc})
    picked = _round_robin(per_doc, n)
    out = []
    for i, (d, sentence) in enumerate(picked):
        answer = _last_word(sentence)
        context = sentence[: sentence.rstrip(".").rfind(" ")]
        seen = {w.lower().strip(".,;:()\"'") for w in context.split()}
        distractors = _sample(rng, pool, 3, lambda w: w != answer and w not in seen)
        choices, label = _shuffled(rng, answer, distractors)
        where = names[d] if names else f"document {d}"
        out.append({"id": i, "context": context, "choices": choices, "label": label, "source": f"{source}: {where}"})
    return out


def dialog_reply_items(conversations: dict[str, list[list[str]]], n: int, *, seed: int) -> list[dict]:
    """Reply selection: ``Q: <utterance>\\nA:``; the choices are the reply the corpus gives and three replies from
    conversations of *other* categories (so the question decides). One item per distinct question."""
    rng = random.Random(seed)
    pairs, replies_to = [], {}
    for category in sorted(conversations):
        for conv in conversations[category]:
            for question, reply in zip(conv, conv[1:]):
                if 2 <= len(question.split()) <= 20 and 3 <= len(reply.split()) <= 20:
                    pairs.append((category, question, reply))
                    replies_to.setdefault(_norm(question), set()).add(_norm(reply))
    first: dict[str, tuple[str, str, str]] = {}
    for pair in pairs:
        first.setdefault(_norm(pair[1]), pair)
    chosen = list(first.values())
    rng.shuffle(chosen)
    chosen = sorted(chosen[:n], key=lambda p: (p[0], p[1]))
    out = []
    for i, (category, question, reply) in enumerate(chosen):
        wrong = replies_to[_norm(question)]
        others = [r for c, _, r in pairs if c != category and _norm(r) not in wrong]
        distractors = _sample(rng, sorted(set(others)), 3, lambda r: True)
        choices, label = _shuffled(rng, reply, distractors)
        out.append({"id": i, "context": f"Q: {question}\nA:", "choices": choices, "label": label,
                    "source": f"chatterbot-corpus english/{category}"})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd_plugins.recipes.tasks.build_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=ITEMS, help="items per task (default %(default)s)")
    p.add_argument("--out", type=Path, default=DATA, help="output folder (default: the shipped data folder)")
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing them")
    args = p.parse_args(argv)
    tasks = build_all(args.items)
    differ = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        path = args.out / f"{name}.jsonl"
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differ.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
        print(f"{name}: {len(items)} items{' -> ' + str(path) if not args.check else ''}")
    if differ:
        print(f"differ from the generator's output: {differ}", file=sys.stderr)
        return 1
    return 0


# --- helpers ------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(doc: str) -> Iterable[str]:
    for paragraph in re.split(r"\n\s*\n", doc):  # hard-wrapped lines (pydoc) are joined first
        if paragraph.startswith((" ", "\t")):  # an indented block: code or a grammar rule, not prose
            continue
        text = " ".join(paragraph.split())
        yield from (s.strip() for s in _SENTENCE_END.split(text) if s.strip())


def _cloze_ok(sentence: str) -> bool:
    words = sentence.split()
    return (8 <= len(words) <= 25 and sentence.endswith(".") and not sentence.endswith("..")
            and sentence.isascii() and re.fullmatch(r"[a-z]{4,}\.", words[-1]) is not None
            and sentence[0].isupper() and sentence.count("(") == sentence.count(")")
            and not re.search(r"[{}\[\]<>=_`|\\]|::", sentence))


def _last_word(sentence: str) -> str:
    return sentence.split()[-1].rstrip(".")


def _round_robin(per_doc: list[list], n: int) -> list:
    out, queues, depth = [], [q for q in per_doc if q], 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out[:n]


def _sample(rng: random.Random, pool: Sequence[str], k: int, ok: Callable[[str], bool]) -> list[str]:
    picked: list[str] = []
    for _ in range(1000):
        word = pool[rng.randrange(len(pool))]
        if ok(word) and word not in picked:
            picked.append(word)
            if len(picked) == k:
                return picked
    raise ValueError(f"could not draw {k} distinct distractors from a pool of {len(pool)}")


def _shuffled(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


if __name__ == "__main__":
    sys.exit(main())
