"""Masking, normalisation and shifting shared by every loss (written once, used everywhere)."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Turn Hugging Face causal-LM labels into targets aligned with positions.

    A causal LM's logits at position ``t`` predict token ``t+1``; HF passes unshifted ``labels`` and shifts
    inside the loss. Our losses take aligned targets: ``shift_labels(labels)[:, t] == labels[:, t+1]`` and the
    last position gets ``ignore_index``. Shapes: ``(B, T) -> (B, T)``.
    """
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def valid_mask(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Bool mask of positions that have a target."""
    return labels != ignore_index


def normalize_token_sum(
    per_token: Tensor, mask: Tensor, num_items_in_batch: Tensor | int | float | None = None
) -> Tensor:
    """Sum ``per_token`` over valid positions and divide by the normaliser, in fp32 (fp64 stays fp64).

    The normaliser is ``num_items_in_batch`` when given (the host trainer's target-token count over a whole
    gradient-accumulation step, so terms scale exactly like its CE loss), else the number of valid positions.
    An all-masked batch gives an exact, finite 0 (never 0/0), with a zero gradient.
    """
    if per_token.dtype != torch.float64:
        per_token = per_token.float()
    total = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
    if num_items_in_batch is None:
        denom = mask.sum().clamp(min=1).to(total.dtype)
    elif isinstance(num_items_in_batch, Tensor):
        denom = num_items_in_batch.to(device=total.device, dtype=total.dtype).clamp(min=1)
    else:
        denom = max(float(num_items_in_batch), 1.0)
    return total / denom


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
