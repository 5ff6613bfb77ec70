"""Tokenizers of teacher and student: one tokenizer, or a refusal before training.

The teacher is fed the student's token ids, so both models must read ids with one vocabulary. When both tokenizers
are known (the student's is the trainer's ``processing_class``; the teacher's comes with ``teacher_tokenizer=``, sits
beside a teacher path, or is recorded in a teacher cache), their token -> id maps are compared: different maps are
refused (cross-tokenizer distillation is not configured); one map whose models pad their vocabularies to different
sizes (Qwen2.5-0.5B: 151936 rows, 7B: 152064, one 151665-token tokenizer) gives :func:`shared_vocabulary` -- the
logit terms then compare only the real tokens both heads have. When a tokenizer is unknown, equal vocabulary sizes
are accepted with a warning and different sizes are refused (nothing says they share a tokenizer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kd_plugins.errors import ConfigError, IncompatibleModelsError
from kd_plugins.types import ModelInfo

logger = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "shared_vocabulary", "teacher_tokenizer_of", "tokenizer_of"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

CROSS_TOKENIZER_NOT_CONFIGURED = (
    "cross-tokenizer distillation is not configured: use a teacher with the student's tokenizer (or a student built "
    "from the teacher's)"
)


def tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer inside a trainer's ``processing_class`` (a tokenizer, or a processor holding one), or None."""
    if processing_class is None:
        return None
    if hasattr(processing_class, "get_vocab"):
        return processing_class
    inner = getattr(processing_class, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "get_vocab") else None


def load_tokenizer(source: Any, *, what: str = "teacher_tokenizer") -> Any:
    """A tokenizer object as it is, or ``AutoTokenizer.from_pretrained(source)`` for a path / hub id.

    Raises:
        ConfigError: ``source`` is neither, or cannot be loaded (the message names it).
    """
    if source is None:
        return None
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        tokenizer = tokenizer_of(source)
        if tokenizer is None:
            raise ConfigError(f"{what}={source!r} is invalid; expected a tokenizer (with get_vocab()) or its path")
        return tokenizer
    from transformers import AutoTokenizer

    from kd_plugins.integrations.teachers import check_model_location

    check_model_location(source, what)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}={source!r} could not be loaded as a tokenizer ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else exc!r})") from exc


def teacher_tokenizer_of(teacher: Any, teacher_tokenizer: Any = None) -> Any:
    """The teacher's tokenizer: ``teacher_tokenizer`` when given (object or path), else the one saved beside a
    teacher path (a folder with tokenizer files) or under a teacher hub id, else None (unknown)."""
    if teacher_tokenizer is not None:
        return load_tokenizer(teacher_tokenizer)
    if isinstance(teacher, (str, os.PathLike)) and str(teacher) != "self":
        folder = Path(teacher)
        if folder.is_dir():
            if any((folder / name).is_file() for name in _TOKENIZER_FILES):
                return load_tokenizer(str(folder), what="the tokenizer beside the teacher")
            return None
        try:  # a hub id the model was loaded from: its tokenizer lives there too
            return load_tokenizer(str(teacher), what="the teacher's tokenizer")
        except ConfigError:
            return None
    return None


def shared_vocabulary(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    student: ModelInfo,
    teacher: ModelInfo,
    *,
    needs_logits: bool,
) -> int | None:
    """Check that teacher and student read token ids alike; return the vocabulary the logit terms compare when it is
    smaller than a model's (one tokenizer, heads padded to different sizes), else None.

    Raises:
        IncompatibleModelsError: the tokenizers differ (the message shows the first id they disagree on), a model's
            vocabulary is smaller than the tokenizer's ids, or the vocabulary sizes differ while a tokenizer is
            unknown.
    """
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer is teacher_tokenizer:
            real = _real_tokens(student_tokenizer.get_vocab())
        else:
            s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            if s_vocab != t_vocab:
                raise IncompatibleModelsError(
                    f"teacher {teacher.name!r} and student {student.name!r} have different tokenizers "
                    f"({_first_difference(s_vocab, t_vocab)}): the teacher would read the student's token ids as "
                    f"other tokens. {CROSS_TOKENIZER_NOT_CONFIGURED}"
                )
            real = _real_tokens(s_vocab)
        for side, info in (("student", student), ("teacher", teacher)):
            if info.vocab_size < real:
                raise IncompatibleModelsError(
                    f"the shared tokenizer has {real} token ids but {side} {info.name!r} has vocab_size="
                    f"{info.vocab_size}: its embedding cannot read ids >= {info.vocab_size}"
                )
        if needs_logits and student.vocab_size != teacher.vocab_size:
            logger.info("kd_plugins: one tokenizer, vocabularies padded to %d (student) and %d (teacher) rows: logit "
                        "terms compare the %d real tokens", student.vocab_size, teacher.vocab_size, real)
            return real
        return None
    if student.vocab_size != teacher.vocab_size:
        unknown = " and ".join(side for side, tok in (("student's", student_tokenizer), ("teacher's", teacher_tokenizer))
                               if tok is None)
        raise IncompatibleModelsError(
            f"vocabulary mismatch: student {student.name!r} has vocab_size={student.vocab_size}, teacher "
            f"{teacher.name!r} has vocab_size={teacher.vocab_size}, and the {unknown} tokenizer is unknown, so "
            "kd_plugins cannot tell whether they share a tokenizer (the teacher is fed the student's token ids). Pass "
            "the tokenizers -- the student's as the trainer's processing_class, the teacher's as teacher_tokenizer= "
            "(kd-plugins sft: teacher_tokenizer: PATH) -- so they can be compared: one tokenizer padded to different "
            f"sizes then compares the shared real tokens; different tokenizers are refused ({CROSS_TOKENIZER_NOT_CONFIGURED})"
        )
    logger.warning(
        "kd_plugins: the %s tokenizer is unknown, so teacher and student tokenizers were not compared (both "
        "vocabularies have %d entries); pass teacher_tokenizer= to check that they are the same",
        "student's" if student_tokenizer is None else "teacher's", student.vocab_size,
    )
    return None


# --- helpers ----------------------------------------------------------------------------------------------------


def _real_tokens(vocab: dict[str, int]) -> int:
    return max(vocab.values()) + 1 if vocab else 0


def _first_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    s_by_id = {i: t for t, i in student.items()}
    t_by_id = {i: t for t, i in teacher.items()}
    sizes = f"student tokenizer: {len(student)} tokens, teacher tokenizer: {len(teacher)}"
    for index in sorted(set(s_by_id) | set(t_by_id)):
        a, b = s_by_id.get(index), t_by_id.get(index)
        if a != b:
            return f"{sizes}; first difference at id {index}: student {a!r}, teacher {b!r}"
    return sizes  # pragma: no cover - equal id maps are equal vocabularies
