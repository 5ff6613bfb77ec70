"""A teacher cache checked against the training data before the first step.

:func:`check_cache_covers` looks every sequence of the dataset the trainer will iterate up in the cache (by
content) and refuses, before training, a dataset the cache does not fully cover -- rather than failing at the
first uncovered batch after training on the covered ones.

One mismatch is expected and served exactly: TRL tokenises text data and appends the EOS token, while a cache built
from the same ids (``tokenizer(text).input_ids``) lacks it. For a causal teacher the outputs at the positions before
that EOS depend only on the tokens before it, so the cached example ``ids`` gives exactly the teacher's top-k
log-probs for the training row ``ids + [EOS]`` at every position that predicts a token; the EOS position itself
predicts nothing (its target is ``ignore_index``). :class:`AppendedEosCache` serves such rows. The cache holds no
hidden states at that EOS position, so alignment terms on cached hidden states then need a cache built from the
trainer's rows (ids + EOS) and are refused with that advice.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from kd_plugins.types import BatchContext, ModelCapture, ModelInfo, Requirements

logger = logging.getLogger(__name__)

__all__ = ["AppendedEosCache", "check_cache_covers", "training_sequences"]

_SHOWN = 3  # missing rows quoted in a refusal


def training_sequences(dataset: Any) -> list[list[int]] | None:
    """The token sequences a trainer will train on, row by row, or None when they cannot be listed up front
    (an iterable dataset, rows without ``input_ids``).

    A ``datasets.Dataset`` with ``input_ids`` (TRL's prepared training set) is read column-wise; a packed row is split
    at its ``seq_lengths`` (TRL's packing). A map-style torch dataset is read item by item; ``attention_mask`` (when
    present) keeps the real tokens.
    """
    if dataset is None:
        return None
    if hasattr(dataset, "column_names"):
        columns = dataset.column_names
        if not isinstance(columns, list) or "input_ids" not in columns:
            return None
        ids = dataset["input_ids"]
        masks = dataset["attention_mask"] if "attention_mask" in columns else [None] * len(ids)
        lengths = dataset["seq_lengths"] if "seq_lengths" in columns else [None] * len(ids)
        out: list[list[int]] = []
        for row, mask, seq_lengths in zip(ids, masks, lengths):
            out.extend(_split_row(list(map(int, row)), mask, seq_lengths))
        return out
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None
    out = []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, Mapping) or "input_ids" not in item:
            return None
        out.extend(_split_row(_as_list(item["input_ids"]), item.get("attention_mask"), item.get("seq_lengths")))
    return out


def check_cache_covers(cache: Any, sequences: Sequence[Sequence[int]], *, eos_token_id: int | None,
                       requirements: Requirements) -> Any:
    """Return the teacher source for a cache that covers every training sequence: the cache itself, or an
    :class:`AppendedEosCache` when some rows are cached examples plus a trailing EOS.

    Raises:
        TeacherCacheError: a sequence is not in the cache (the message quotes the first ones and the likely
            causes), or rows need the EOS normalisation while a term needs cached teacher hidden states.
    """
    from kd_plugins.integrations.teacher_cache import TeacherCacheError

    missing = cache.missing_rows(sequences)
    if not missing:
        return cache
    # rows that are a cached example plus the EOS the trainer appended
    ends_with_eos = [i for i in missing if eos_token_id is not None and len(sequences[i]) > 1
                     and sequences[i][-1] == eos_token_id]
    still_missing = set(cache.missing_rows([list(sequences[i][:-1]) for i in ends_with_eos]))
    eos_rows = [i for position, i in enumerate(ends_with_eos) if position not in still_missing]
    missing = sorted(set(missing) - set(eos_rows))
    if missing:
        shown = "; ".join(f"sequence {i} ({len(sequences[i])} tokens, starting {list(sequences[i][:6])})"
                          for i in missing[:_SHOWN])
        raise TeacherCacheError(
            f"teacher cache {cache.path} does not cover the training data: {len(missing)} of {len(sequences)} "
            f"training sequences are not cached examples ({shown}{'; ...' if len(missing) > _SHOWN else ''}). The data "
            "differ from the cached dataset, or the trainer changed the examples (max_length truncation, packing "
            "across examples, a chat template); build the cache from the sequences the trainer trains on "
            "(unpacked: e.g. cache_teacher(teacher, tokenizer, trainer.train_dataset, ...)) -- nothing was trained"
        )
    if requirements.teacher_layers:
        raise TeacherCacheError(
            f"teacher cache {cache.path}: {len(eos_rows)} training rows end with the EOS token (id {eos_token_id}) the "
            "trainer appended, which the cached examples lack; the cache can serve their logits exactly but holds no "
            f"teacher hidden states (layers {sorted(requirements.teacher_layers)}) at that EOS position. Build the "
            "cache from the trainer's rows (ids + EOS, e.g. cache_teacher(..., trainer.train_dataset, ...))"
        )
    logger.info("kd_plugins: %d training rows are cached examples plus the EOS token the trainer appended; their "
                "teacher log-probs are read from the cache without the EOS", len(eos_rows))
    return AppendedEosCache(cache, eos_token_id)


class AppendedEosCache:
    """A :class:`~kd_plugins.TeacherSource` over a teacher cache whose examples lack the EOS token the trainer
    appended to each row (see the module docstring): a sequence that is not cached but whose tokens without the
    trailing EOS are, gets the cached rows at its other positions and the cache's placeholder at the EOS.

    Args:
        cache: the :class:`~kd_plugins.integrations.teacher_cache.TeacherCache`.
        eos_token_id: the EOS id.
    """

    def __init__(self, cache: Any, eos_token_id: int):
        self.cache = cache
        self.eos_token_id = int(eos_token_id)

    @property
    def info(self) -> ModelInfo:
        return self.cache.info

    @property
    def path(self):
        return self.cache.path

    def prepare(self, requirements: Requirements) -> None:
        self.cache.prepare(requirements)

    def capture(self, inputs: Mapping[str, Any], requirements: Requirements) -> ModelCapture:
        input_ids: Tensor = inputs["input_ids"]
        segments = list(_segments(inputs))
        rows, places = [], []
        for b, start, stop in segments:
            ids = input_ids[b, start:stop]
            if (stop - start > 1 and int(ids[-1]) == self.eos_token_id
                    and self.cache.missing_rows([ids.tolist()]) and not self.cache.missing_rows([ids[:-1].tolist()])):
                stop -= 1
            rows.append(input_ids[b, start:stop])
            places.append((b, start, stop))
        width = max((len(r) for r in rows), default=1)
        packed = torch.zeros(len(rows), width, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(packed)
        for r, ids in enumerate(rows):
            packed[r, : len(ids)] = ids
            mask[r, : len(ids)] = 1
        part = self.cache.capture({"input_ids": packed, "attention_mask": mask}, requirements)
        batch, length = input_ids.shape
        k = part.topk_logprobs.shape[-1]
        logprobs = torch.full((batch, length, k), -float(torch.log(torch.tensor(float(k)))), device=input_ids.device)
        indices = torch.arange(k, device=input_ids.device).expand(batch, length, k).clone()
        hidden = {layer: torch.zeros(batch, length, value.shape[-1], dtype=value.dtype, device=value.device)
                  for layer, value in part.hidden_states.items()}
        for r, (b, start, stop) in enumerate(places):
            n = stop - start
            logprobs[b, start:stop] = part.topk_logprobs[r, :n]
            indices[b, start:stop] = part.topk_indices[r, :n]
            for layer, value in part.hidden_states.items():
                hidden[layer][b, start:stop] = value[r, :n]
        capture = ModelCapture(info=self.info, hidden_states=hidden, topk_logprobs=logprobs, topk_indices=indices)
        capture.logit_scale, capture.logit_softcap = part.logit_scale, part.logit_softcap
        if part.final_hidden is not None:  # a cache with final hidden states: the full distribution, as the cache's
            capture.final_hidden = torch.zeros(batch, length, part.final_hidden.shape[-1],
                                               dtype=part.final_hidden.dtype, device=part.final_hidden.device)
            for r, (b, start, stop) in enumerate(places):
                capture.final_hidden[b, start:stop] = part.final_hidden[r, : stop - start]
            capture.lm_head_weight, capture.lm_head_bias = part.lm_head_weight, part.lm_head_bias
        return capture


# --- helpers ----------------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[int]:
    if isinstance(value, Tensor):
        return value.reshape(-1).tolist()
    return list(map(int, value))


def _split_row(ids: list[int], mask: Any, seq_lengths: Any) -> Iterable[list[int]]:
    if mask is not None:
        keep = _as_list(mask)
        real = [i for i, m in enumerate(keep) if m]
        ids = ids[real[0] : real[-1] + 1] if real else []
    if seq_lengths is None:
        return [ids] if ids else []
    out, start = [], 0
    for n in _as_list(seq_lengths):
        out.append(ids[start : start + n])
        start += n
    return [s for s in out if s]


def _segments(inputs: Mapping[str, Any]):
    """``(row, start, stop)`` of every real sequence of a causal-LM batch, as :class:`~kd_plugins.BatchContext`
    delimits them (attention mask; padding-free rows split where ``position_ids`` restart)."""
    batch = BatchContext.from_inputs(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                     position_ids=inputs.get("position_ids"))
    ids = batch.sequence_ids
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        t = 0
        while t < len(row):
            if row[t] < 0:
                t += 1
                continue
            start = t
            while t < len(row) and row[t] == row[start]:
                t += 1
            yield b, start, t
