"""Count the LM-head-sized matmuls a piece of code runs (forward and backward), by the vocabulary dimension.

A matrix product is counted when one of its operand dimensions equals ``vocab`` and its output is not empty: the
projection of hidden states through an LM head (``N x H @ H x V``), its gradient with respect to the hidden states
(``N x V @ V x H``) and with respect to the head (``V x N @ N x H``). Pick a vocabulary size no other dimension of
the model or batch can take (a prime such as 131 for tiny models).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
            torch.ops.aten.baddbmm_}


class VocabMatmuls(TorchDispatchMode):
    """``with VocabMatmuls(vocab) as count: ...`` then ``count.total`` (and ``count.shapes``)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.shapes: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.shapes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _MATMULS and isinstance(out, torch.Tensor) and out.numel() > 0:
            operands = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if any(self.vocab in a.shape[-2:] for a in operands):
                self.shapes[tuple(tuple(a.shape) for a in operands)] += 1
        return out
