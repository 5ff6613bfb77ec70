"""A student with its own, smaller vocabulary, derived from a teacher and distilled across tokenizers.

* :func:`train_student_tokenizer` -- a new BPE tokenizer of ``vocab_size`` tokens trained on the training text with
  the teacher's tokenizer pipeline (normaliser, pre-tokeniser, special tokens), via ``train_new_from_iterator``;
* :func:`embeddings_from_teacher` -- each new token's embedding row: the mean of the teacher's rows of the teacher
  tokens its string splits into (special tokens: the teacher's row of the same special token);
* :func:`derive_new_vocabulary_student` -- the teacher's blocks kept as
  :func:`~kd_plugins.recipes.student.derive_student` keeps them, the embedding (and a tied LM head) replaced by
  the new vocabulary's;
* :func:`bits_per_character` -- a language-modelling score that two tokenizers can share: the summed next-token
  negative log-likelihood of a text over its characters.

``benchmarks/new_vocabulary.py`` trains and measures it with the SmolLM2 teacher.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from kd_plugins.recipes.student import derive_student

__all__ = ["bits_per_character", "derive_new_vocabulary_student", "embeddings_from_teacher", "train_student_tokenizer"]


def train_student_tokenizer(teacher_tokenizer: Any, texts: Iterable[str], vocab_size: int) -> Any:
    """A fast tokenizer of ``vocab_size`` tokens trained on ``texts`` with the teacher tokenizer's pipeline and
    special tokens (``PreTrainedTokenizerFast.train_new_from_iterator``).

    Raises:
        ValueError: the teacher's tokenizer is not a fast one, or ``vocab_size`` is too small for its specials.
    """
    if not getattr(teacher_tokenizer, "is_fast", False):
        raise ValueError("train_student_tokenizer needs the teacher's fast tokenizer (train_new_from_iterator)")
    specials = len(teacher_tokenizer.all_special_ids)
    if vocab_size <= specials + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for the teacher's {specials} special tokens")
    return teacher_tokenizer.train_new_from_iterator(list(texts), vocab_size)


def embeddings_from_teacher(teacher_embedding: torch.Tensor, teacher_tokenizer: Any,
                            student_tokenizer: Any) -> torch.Tensor:
    """``(V_student, H)``: row ``i`` is the mean of the teacher's embedding rows of the teacher tokens that student
    token ``i``'s string splits into.

    A token string is first split by the teacher's own token model (both tokenizers spell tokens in one alphabet when
    the student's was trained from the teacher's, e.g. byte-level ``Ġ`` for a space); a string the teacher's model
    cannot split is decoded to text and tokenised. A student special token takes the teacher's row of the same special
    token, else the mean of all teacher rows.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    model = teacher_tokenizer.backend_tokenizer.model
    unk = teacher_tokenizer.unk_token_id
    mean_row = teacher_embedding.mean(0)
    specials = set(student_tokenizer.all_special_ids)
    size = max(student_tokenizer.get_vocab().values()) + 1
    rows = torch.empty(size, teacher_embedding.shape[1], dtype=teacher_embedding.dtype)
    for token, index in student_tokenizer.get_vocab().items():
        if index in specials:
            teacher_id = teacher_vocab.get(token)
            rows[index] = teacher_embedding[teacher_id] if teacher_id is not None else mean_row
            continue
        ids = [piece.id for piece in model.tokenize(token)]
        if not ids or (unk is not None and unk in ids):
            text = student_tokenizer.convert_tokens_to_string([token])
            ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        rows[index] = teacher_embedding[ids].mean(0) if ids else mean_row
    return rows


def derive_new_vocabulary_student(
    teacher: nn.Module,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    num_layers: int | None = None,
    keep_layers: Sequence[int] | None = None,
    strategy: str = "uniform",
    calibration=None,
) -> tuple[nn.Module, list[int]]:
    """The teacher's kept blocks (:func:`~kd_plugins.recipes.student.derive_student`) with the student tokenizer's
    vocabulary: the embedding rows from :func:`embeddings_from_teacher`, a tied LM head following it (an untied head
    gets the same rows), and the config's vocabulary size and special-token ids set to the student tokenizer's.
    The teacher is not modified."""
    student, kept = derive_student(teacher, num_layers=num_layers, keep_layers=keep_layers, strategy=strategy,
                                   calibration=calibration)
    rows = embeddings_from_teacher(teacher.get_input_embeddings().weight.detach().float().cpu(), teacher_tokenizer,
                                   student_tokenizer)
    student.resize_token_embeddings(rows.shape[0], mean_resizing=False)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(rows)
        head = student.get_output_embeddings()
        if head is not None and head.weight is not student.get_input_embeddings().weight:
            head.weight.copy_(rows)
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    config = student.config
    config.vocab_size = rows.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(student_tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
            if getattr(student, "generation_config", None) is not None:
                setattr(student.generation_config, name, value)
    return student, kept


@torch.no_grad()
def bits_per_character(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 512) -> dict:
    """``{"bits_per_char", "chars", "tokens"}``: the model's summed next-token negative log-likelihood of ``texts``
    (in bits) over their characters. Every token is predicted: the tokenizer's EOS (or BOS) comes first as context.
    A text longer than ``max_tokens`` tokens is cut at a token boundary and only the characters its kept tokens
    cover are counted, so two tokenizers are compared on the text each actually scores."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    nll = chars = tokens = 0.0
    try:
        for text in texts:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
            if not ids:
                continue
            row = torch.tensor([[start, *ids]], device=device)
            logits = model(input_ids=row).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, row[0, 1:], reduction="sum"))
            chars += offsets[-1][1]
            tokens += len(ids)
    finally:
        model.train(was_training)
    return {"bits_per_char": nll / math.log(2) / max(chars, 1.0), "chars": int(chars), "tokens": int(tokens)}
