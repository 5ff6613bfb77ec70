"""Prompts for teacher-generated distillation data: hand-written instructions and training-corpus openings.

Two sources, and only these two, so no evaluation text can ever become a prompt:

* ``instructions`` -- generic requests (``"Explain {subject} to a beginner."``) built from :data:`TEMPLATES` and
  :data:`SUBJECTS`, both written for this package; rendered with the teacher's chat template.
* ``corpus`` -- the opening words of paragraphs of a *training* corpus (:data:`TRAINING_CORPORA`), from the
  training side of the same by-document split the main job uses, continued as plain text.

``mixed`` alternates the two. Every prompt carries its source (``kind``) into the generation records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

PROMPT_SOURCES = ("instructions", "corpus", "mixed")
# Corpora a prompt may come from: the training corpora only. Evaluation corpora are never listed here.
TRAINING_CORPORA = ("pydoc_topics",)

TEMPLATES = (
    "Explain {s} to a beginner.",
    "Write a short paragraph about {s}.",
    "What are the main advantages and disadvantages of {s}?",
    "Give three interesting facts about {s}.",
    "Describe the history of {s} in a few sentences.",
    "How would you teach a ten-year-old about {s}?",
    "Write a short story in which {s} plays an important part.",
    "What do people often misunderstand about {s}?",
    "List a few common questions about {s} and answer one of them in detail.",
    "Compare {s} with something similar and explain the differences.",
    "Why does {s} matter in everyday life?",
    "Write a friendly note to a colleague recommending that they learn more about {s}.",
    "What are the first steps for someone who wants to get started with {s}?",
    "Write a haiku about {s}, then explain what it means.",
    "Describe {s} as if you were a museum guide.",
    "What problems can {s} cause, and how can they be avoided?",
    "Write a short dialogue between two friends who disagree about {s}.",
    "Give a step-by-step explanation of how {s} works.",
    "Create a short quiz with three questions about {s}, and give the answers.",
    "What might {s} look like fifty years from now?",
    "Summarize the most important ideas about {s} in a bulleted list.",
    "Write a product description for a book about {s}.",
    "What would a scientist find most surprising about {s}?",
    "Tell me a joke about {s} and explain why it is funny.",
)

SUBJECTS = (
    "photosynthesis", "the water cycle", "volcanoes", "black holes", "the immune system", "honeybees",
    "the printing press", "the Roman Empire", "jazz music", "chess openings", "sourdough bread", "composting",
    "electric cars", "solar panels", "recycling plastic", "sleep", "public libraries", "learning a second language",
    "a household budget", "job interviews", "working from home", "city parks", "bicycles", "night trains",
    "lighthouses", "the moon", "ocean tides", "earthquakes", "rainforests", "deserts", "coral reefs",
    "migratory birds", "adopting a dog", "house cats", "octopuses", "vaccines", "antibiotics", "the human heart",
    "nutrition labels", "clean drinking water", "weather forecasts", "climate change", "wind turbines",
    "rechargeable batteries", "the internet", "email etiquette", "strong passwords", "sorting algorithms",
    "recursion in programming", "relational databases", "spreadsheets", "version control", "unit testing",
    "Python dictionaries", "binary numbers", "prime numbers", "probability", "fractions", "geometry in architecture",
    "paper maps", "the stock market", "running a small bakery", "customer service", "teamwork", "public speaking",
    "writing a resume", "time management", "meditation", "training for a marathon", "learning to swim",
    "growing tomatoes", "houseplants", "cooking rice", "coffee", "green tea", "dark chocolate", "olive oil",
    "spices", "board games", "video games", "photography", "watercolor painting", "origami", "knitting",
    "science museums", "community theater", "poetry", "fairy tales", "science fiction", "local newspapers",
    "podcasts", "voting", "the scientific method", "telescopes", "microscopes", "dinosaurs", "fossils",
    "the periodic table", "magnets", "household electricity", "suspension bridges", "skyscrapers", "ancient Egypt",
    "the Silk Road", "the invention of the telephone", "airplanes", "rockets", "weather satellites",
    "household robots", "machine translation", "recycling paper", "basic first aid", "brushing your teeth",
    "friendship", "moving to a new city", "camping", "mountain hiking", "rivers", "snowflakes", "the four seasons",
    "ocean currents", "birdwatching", "wildlife conservation", "organic farming", "pollination",
)

__all__ = [
    "PROMPT_SOURCES",
    "Prompt",
    "SUBJECTS",
    "TEMPLATES",
    "TRAINING_CORPORA",
    "build_prompts",
    "corpus_openings",
    "instruction_prompts",
    "word_ngrams",
]


@dataclass(frozen=True)
class Prompt:
    """One generation prompt: its text, its token ids (as the teacher reads it) and its source."""

    text: str
    ids: tuple[int, ...]
    kind: str  # "instruction", "corpus" or "file"


def instruction_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct instructions, each a template of :data:`TEMPLATES` filled with a subject of :data:`SUBJECTS`.

    Raises:
        ValueError: ``n`` exceeds the number of distinct (template, subject) pairs.
    """
    pairs = [(t, s) for t in TEMPLATES for s in SUBJECTS]
    if not 0 <= n <= len(pairs):
        raise ValueError(f"n={n} instructions requested; {len(pairs)} distinct ones exist (0 <= n <= {len(pairs)})")
    random.Random(seed).shuffle(pairs)
    return [template.format(s=subject) for template, subject in pairs[:n]]


def corpus_openings(texts: Sequence[str], n: int, *, seed: int = 0, min_words: int = 8, max_words: int = 24,
                    avoid: Sequence[str] = ()) -> list[str]:
    """The first ``min_words..max_words`` words of ``n`` distinct paragraphs of ``texts`` (paragraphs: blank-line
    separated, with at least ``max_words + 8`` words so the teacher continues real prose, not a fragment's tail).

    ``avoid``: texts no opening may share a run of eight words with (a corpus split by document can repeat a
    paragraph on both sides; the held-out side goes here).

    Raises:
        ValueError: fewer than ``n`` usable paragraphs, or bad word bounds.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"min_words={min_words}, max_words={max_words}: expected 1 <= min_words <= max_words")
    forbidden = set().union(*(word_ngrams(text) for text in avoid)) if avoid else set()
    paragraphs = []
    seen = set()
    for text in texts:
        for paragraph in text.split("\n\n"):
            words = paragraph.split()
            if len(words) >= max_words + 8 and not (word_ngrams(" ".join(words[:max_words])) & forbidden):
                key = " ".join(words[:max_words])
                if key not in seen:
                    seen.add(key)
                    paragraphs.append(words)
    if n > len(paragraphs):
        raise ValueError(f"n={n} corpus openings requested; the texts have {len(paragraphs)} usable paragraphs")
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    return [" ".join(words[: rng.randint(min_words, max_words)]) for words in paragraphs[:n]]


def word_ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Every run of ``n`` whitespace-separated words of ``text`` (the whole text when it is shorter)."""
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def build_prompts(tokenizer, source: str = "mixed", n: int = 64, *, seed: int = 0, corpus: str = "pydoc_topics",
                  texts: Sequence[str] | None = None, chat_template: bool = True) -> list[Prompt]:
    """``n`` prompts from ``source`` (``instructions``, ``corpus`` or ``mixed``: alternating, instructions first).

    Args:
        tokenizer: the teacher's tokenizer. Instructions go through its chat template (with the generation prompt)
            when it has one and ``chat_template`` is true, else they are plain text followed by a newline.
        source: see :data:`PROMPT_SOURCES`.
        n: number of prompts.
        seed: choice and order of prompts.
        corpus: the training corpus the openings come from (one of :data:`TRAINING_CORPORA`); its training side of
            :func:`kd_plugins.recipes.data.split_corpus` (held-out fraction 0.1, seed 0, like the main job), minus
            any paragraph that shares eight consecutive words with the held-out side.
        texts: documents to take openings from instead of ``corpus`` (the caller vouches they are training text).

    Raises:
        ValueError: unknown ``source``, a ``corpus`` that is not a training corpus, or too few prompts available.
    """
    if source not in PROMPT_SOURCES:
        raise ValueError(f"source={source!r} is invalid; expected one of {PROMPT_SOURCES} (or a prompt file for the "
                         "command line)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid; expected an integer >= 1")
    n_instructions = {"instructions": n, "corpus": 0, "mixed": (n + 1) // 2}[source]
    n_corpus = n - n_instructions
    prompts: list[Prompt] = []
    for text in instruction_prompts(n_instructions, seed=seed):
        prompts.append(Prompt(text=text, ids=_instruction_ids(tokenizer, text, chat_template), kind="instruction"))
    openings: list[Prompt] = []
    if n_corpus:
        train, heldout = _training_texts(corpus) if texts is None else (texts, ())
        for text in corpus_openings(train, n_corpus, seed=seed, avoid=heldout):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            openings.append(Prompt(text=text, ids=ids, kind="corpus"))
    if source == "mixed":  # interleave so any prefix of the prompts mixes both sources
        mixed: list[Prompt] = []
        for i in range(max(len(prompts), len(openings))):
            mixed.extend(p[i] for p in (prompts, openings) if i < len(p))
        return mixed
    return prompts + openings


# --- helpers ------------------------------------------------------------------------------------------------


def _training_texts(corpus: str) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` documents of a training corpus, split like the main job."""
    if corpus not in TRAINING_CORPORA:
        raise ValueError(f"corpus={corpus!r} cannot be a prompt source: prompts come only from training corpora "
                         f"{TRAINING_CORPORA} (evaluation text must never be trained on)")
    from kd_plugins.recipes.data import load_corpus, split_corpus

    return split_corpus(load_corpus(corpus), heldout_fraction=0.1, seed=0)


def _instruction_ids(tokenizer, text: str, chat_template: bool) -> tuple[int, ...]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        return tuple(int(i) for i in ids)
    return tuple(tokenizer(text + "\n", add_special_tokens=False)["input_ids"])
