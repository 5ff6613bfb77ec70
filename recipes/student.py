"""Derive a shallower student from a decoder-only teacher by keeping a subset of its blocks.

The student is the teacher's architecture with ``num_hidden_layers`` reduced: embeddings, final norm and LM
head are copied, and student block ``k`` is a copy of teacher block ``kept[k]``. Distillation then only has to
repair the gaps the removed blocks leave, which starts the student far closer to the teacher than a random
initialisation of the same shape.

Which blocks to keep (``strategy``):

``uniform``
    evenly spaced over the depth (first and last always kept when ``keep_first_last``).
``block_influence``
    ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
    Expect"): a block's influence is ``BI_i = 1 - E_t[cos(h_in, h_out)]`` over calibration tokens; blocks that
    barely turn the residual stream are dropped, the most influential ``num_layers`` are kept.
``angular``
    Gromov et al., 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): remove the *contiguous*
    run of ``n`` blocks whose input and output are closest in angular distance
    ``arccos(cos(h_l, h_{l+n})) / pi``; the blocks before and after the run are kept.

Both data-driven strategies read hidden states through forward hooks on the decoder blocks (the block's input
and output, before the final norm), so they work with any attention implementation.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from kd_plugins.capture import find_decoder

STRATEGIES = ("uniform", "block_influence", "angular")

__all__ = [
    "STRATEGIES",
    "count_parameters",
    "derive_student",
    "kept_layer_pairs",
    "layer_importance",
    "select_layers",
]


def derive_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    keep_layers: Sequence[int] | None = None,
    strategy: str = "uniform",
    calibration=None,
    keep_first_last: bool = True,
) -> tuple[nn.Module, list[int]]:
    """Build a student that keeps ``num_layers`` of the teacher's decoder blocks.

    Args:
        teacher: a Hugging Face causal LM with a ``ModuleList`` of decoder blocks (Llama, Qwen, Mistral, ...).
            It is not modified.
        num_layers: how many blocks the student keeps (``1..teacher layers``). Optional when ``keep_layers``
            is given.
        keep_layers: explicit teacher block indices to keep (negative indices count from the end); overrides
            ``strategy``. Kept in increasing order.
        strategy: ``uniform``, ``block_influence`` or ``angular`` (see the module docstring).
        calibration: token batches for the data-driven strategies: a ``(B, T)`` LongTensor, a list of such
            tensors, or a list of equal-length token-id lists.
        keep_first_last: always keep the first and the last block (``uniform``/``block_influence``); for
            ``angular`` the removed run may not touch them.

    Returns:
        ``(student, kept)``: the student (fp32, train mode, its own copy of every weight) and the sorted list of
        teacher block indices it kept; ``student.config.kd_kept_layers`` records the same list.

    Raises:
        ValueError: bad ``num_layers``/``keep_layers``/``strategy``, or a data-driven strategy without
            ``calibration``.
    """
    _, teacher_blocks = decoder_layers(teacher)
    total = len(teacher_blocks)
    if keep_layers is not None:
        kept = _check_keep_layers(keep_layers, total)
        if num_layers is not None and num_layers != len(kept):
            raise ValueError(f"num_layers={num_layers} disagrees with keep_layers={list(keep_layers)} ({len(kept)} layers)")
    else:
        if num_layers is None:
            raise ValueError("derive_student needs num_layers or keep_layers")
        kept = select_layers(
            teacher, num_layers, strategy=strategy, calibration=calibration, keep_first_last=keep_first_last
        )
    return _build_student(teacher, kept), kept


def select_layers(
    teacher: nn.Module,
    num_layers: int,
    *,
    strategy: str = "uniform",
    calibration=None,
    keep_first_last: bool = True,
) -> list[int]:
    """The sorted teacher block indices a ``strategy`` keeps (see :func:`derive_student` for the arguments)."""
    _, blocks = decoder_layers(teacher)
    total = len(blocks)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers!r} is invalid; expected an integer in 1..{total} (the teacher's layers)")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid; expected one of {STRATEGIES}")
    if keep_first_last and num_layers < 2 and total > 1:
        raise ValueError("keep_first_last=True needs num_layers >= 2; pass keep_first_last=False for a 1-layer student")
    if num_layers == total:
        return list(range(total))
    if strategy == "uniform":
        return _uniform(total, num_layers, keep_first_last)
    if calibration is None:
        raise ValueError(f"strategy={strategy!r} needs calibration token batches (calibration=...)")
    if strategy == "block_influence":
        scores = layer_importance(teacher, calibration, metric="block_influence")
        forced = {0, total - 1} if keep_first_last else set()
        rest = sorted((i for i in range(total) if i not in forced), key=lambda i: -scores[i])
        return sorted(forced | set(rest[: num_layers - len(forced)]))
    # angular: drop the contiguous run of n blocks whose ends are closest
    removed = total - num_layers
    distances = run_angular_distances(teacher, calibration, removed)
    first = 1 if keep_first_last else 0
    last_start = total - removed - (1 if keep_first_last else 0)
    start = min(range(first, last_start + 1), key=lambda l: distances[l])
    return [i for i in range(total) if not start <= i < start + removed]


def layer_importance(teacher: nn.Module, calibration, metric: str = "block_influence") -> list[float]:
    """Per-block importance over calibration tokens, one float per teacher block (higher = more important).

    ``block_influence``: ``1 - mean_t cos(h_in, h_out)`` (ShortGPT). ``angular``: ``mean_t arccos(cos) / pi``
    (Gromov et al.'s distance for a run of one block). Every calibration token counts (no padding mask): pass
    full blocks of text, e.g. from :func:`kd_plugins.recipes.data.token_blocks`.
    """
    if metric not in ("block_influence", "angular"):
        raise ValueError(f"metric={metric!r} is invalid; expected 'block_influence' or 'angular'")
    states = _boundary_states(teacher, calibration)  # L+1 entries of (N, H)
    scores = []
    for i in range(len(states) - 1):
        cos = _token_cosine(states[i], states[i + 1])
        if metric == "block_influence":
            scores.append(float(1.0 - cos.mean()))
        else:
            scores.append(float(torch.arccos(cos).mean() / math.pi))
    return scores


def run_angular_distances(teacher: nn.Module, calibration, run_length: int) -> list[float]:
    """``d[l] = mean_t arccos(cos(h_l, h_{l+n})) / pi`` for every start ``l`` of a run of ``n`` blocks."""
    states = _boundary_states(teacher, calibration)
    total = len(states) - 1
    return [float(torch.arccos(_token_cosine(states[l], states[l + run_length])).mean() / math.pi)
            for l in range(total - run_length + 1)]


def kept_layer_pairs(kept: Sequence[int], teacher_layers: int) -> list[tuple[int, int]]:
    """Alignment pairs ``(student_layer, teacher_layer)`` that follow the residual stream of a pruned student.

    Student block ``k`` is teacher block ``kept[k]``, and the student's next block is teacher block
    ``kept[k+1]``; so student block ``k``'s output should stand in for the teacher's state just before
    ``kept[k+1]``, i.e. the output of teacher block ``kept[k+1] - 1``. The last student block meets the last
    teacher block.
    """
    kept = sorted(kept)
    pairs = [(k, kept[k + 1] - 1) for k in range(len(kept) - 1)]
    pairs.append((len(kept) - 1, teacher_layers - 1))
    return pairs


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": ..., "non_embedding": ...}`` counting shared (tied) tensors once.

    ``non_embedding`` excludes the input embedding matrix and the LM head when it is not tied to it.
    """
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # parameters() already yields a tied tensor once
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    embedding = 0
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp_weight = getattr(inp, "weight", None)
    out_weight = getattr(out, "weight", None)
    if inp_weight is not None:
        embedding += inp_weight.numel()
    if out_weight is not None and (inp_weight is None or out_weight is not inp_weight):
        embedding += out_weight.numel()
        if getattr(out, "bias", None) is not None:
            embedding += out.bias.numel()
    return {"total": total, "non_embedding": total - embedding}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(state-dict prefix, ModuleList)`` of the decoder blocks, e.g. ``("model.layers", ...)``.

    The backbone is located by :func:`kd_plugins.capture.find_decoder`, the same lookup the feature capture uses.
    """
    decoder, path = find_decoder(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder blocks (looked for '{path}.layers')")
    return f"{path}.layers", layers


# --- helpers ------------------------------------------------------------------------------------------------


def _uniform(total: int, num_layers: int, keep_first_last: bool) -> list[int]:
    if keep_first_last:
        if num_layers == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)})
    # centre of each of num_layers equal slices
    return sorted({int((i + 0.5) * total / num_layers) for i in range(num_layers)})


def _check_keep_layers(keep_layers: Sequence[int], total: int) -> list[int]:
    resolved = []
    for index in keep_layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"keep_layers entries must be integers, got {index!r}")
        value = index + total if index < 0 else index
        if not 0 <= value < total:
            raise ValueError(f"keep_layers entry {index} is out of range for a teacher with {total} layers")
        resolved.append(value)
    if not resolved:
        raise ValueError("keep_layers is empty; keep at least one layer")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"keep_layers={list(keep_layers)} names a layer more than once")
    return sorted(resolved)


def _build_student(teacher: nn.Module, kept: list[int]) -> nn.Module:
    prefix, _ = decoder_layers(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) > max(kept):
        config.layer_types = [layer_types[i] for i in kept]
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # weights in memory are already dequantised
    config.kd_kept_layers = list(kept)
    config.dtype = torch.float32
    student = type(teacher)(config).to(torch.float32)

    position = {teacher_index: k for k, teacher_index in enumerate(kept)}
    head = prefix + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(head):
            index, rest = key[len(head):].split(".", 1)
            if int(index) not in position:
                continue
            key = f"{head}{position[int(index)]}.{rest}"
        state[key] = value
    result = student.load_state_dict(state, strict=False)  # copies into the student's own tensors
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"could not copy the teacher's weights into the student: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    if tied and hasattr(student, "tie_weights"):
        student.tie_weights()
    _, blocks = decoder_layers(student)
    for k, block in enumerate(blocks):  # the KV cache is indexed by each attention's layer_idx
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = k
    student.train()
    return student


def _as_batches(calibration, batch_size: int = 8) -> list[Tensor]:
    if isinstance(calibration, Tensor):
        tensor = calibration if calibration.dim() == 2 else calibration.unsqueeze(0)
        return list(tensor.long().split(batch_size))
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty")
    if all(isinstance(item, Tensor) for item in items):
        return [item.long() if item.dim() == 2 else item.long().unsqueeze(0) for item in items]
    rows = [torch.as_tensor(list(item), dtype=torch.long) for item in items]
    if len({row.numel() for row in rows}) != 1:
        raise ValueError("calibration token lists must all have the same length (pass full blocks of text)")
    return list(torch.stack(rows).split(batch_size))


@torch.no_grad()
def _boundary_states(model: nn.Module, calibration) -> list[Tensor]:
    """The residual stream at every block boundary: ``L + 1`` tensors ``(N_tokens, H)`` in fp32."""
    _, blocks = decoder_layers(model)
    collected: list[list[Tensor]] = [[] for _ in range(len(blocks) + 1)]

    def pre_hook(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            collected[index].append(hidden.detach().float().reshape(-1, hidden.shape[-1]))
        return hook

    def post_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        collected[-1].append(hidden.detach().float().reshape(-1, hidden.shape[-1]))

    handles = [block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in _as_batches(calibration):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in collected]


def _token_cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)
