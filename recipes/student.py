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
``width``
    every block is kept and made narrower: attention heads, MLP channels and (optionally) embedding channels are
    pruned by activation importance over calibration tokens, after Minitron (Muralidharan et al., 2024, "Compact
    Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679). See :func:`width_importance`.
``mixed``
    depth and width: ``num_layers`` blocks chosen by ``block_influence``, then pruned in width like ``width``.
    Width arguments given with any depth strategy make a mixed student the same way.

Width pruning keeps the architecture (and so plain ``AutoModelForCausalLM`` loading): every block keeps the same
number of heads and MLP channels (which ones differ per block), the head width stays the teacher's
(``config.head_dim``), and grouped-query attention stays grouped -- whole key/value groups are removed with their
query heads, and every kept group keeps the same number of query heads.

The data-driven strategies read hidden states and activations through forward hooks (block inputs and outputs
before the final norm; the inputs of ``o_proj`` and ``down_proj``; the norms' outputs), so they work with any
attention implementation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from kd_plugins.capture import find_decoder

DEPTH_STRATEGIES = ("uniform", "block_influence", "angular")
STRATEGIES = DEPTH_STRATEGIES + ("width", "mixed")

__all__ = [
    "DEPTH_STRATEGIES",
    "STRATEGIES",
    "WidthImportance",
    "count_parameters",
    "derive_student",
    "kept_layer_pairs",
    "layer_importance",
    "select_layers",
    "width_importance",
]


def derive_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    keep_layers: Sequence[int] | None = None,
    strategy: str = "uniform",
    calibration=None,
    keep_first_last: bool = True,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
) -> tuple[nn.Module, list[int]]:
    """Build a student from the teacher's weights: fewer blocks (depth), narrower blocks (width), or both.

    Args:
        teacher: a Hugging Face causal LM with a ``ModuleList`` of decoder blocks (Llama, Qwen, Mistral, ...).
            It is not modified.
        num_layers: how many blocks the student keeps (``1..teacher layers``). Optional when ``keep_layers``
            is given, or for ``strategy="width"`` (every block is kept).
        keep_layers: explicit teacher block indices to keep (negative indices count from the end); overrides
            the depth part of ``strategy``. Kept in increasing order.
        strategy: ``uniform``, ``block_influence``, ``angular``, ``width`` or ``mixed`` (see the module docstring).
        calibration: token batches for the data-driven strategies (and for any width pruning): a ``(B, T)``
            LongTensor, a list of such tensors, or a list of equal-length token-id lists.
        keep_first_last: always keep the first and the last block (``uniform``/``block_influence``/``mixed``); for
            ``angular`` the removed run may not touch them.
        num_heads: query heads per block to keep (width pruning); a multiple of ``num_kv_heads``.
        num_kv_heads: key/value heads (GQA groups) per block to keep; default: the teacher's count when it
            divides ``num_heads``.
        intermediate_size: MLP channels per block to keep.
        hidden_size: residual-stream (embedding) channels to keep; the same channels in the embeddings, every
            block and the final norm.

    Returns:
        ``(student, kept)``: the student (fp32, train mode, its own copy of every weight) and the sorted list of
        teacher block indices it kept; ``student.config.kd_kept_layers`` records the same list, and a student
        pruned in its residual width also records the kept channels in ``student.config.kd_kept_channels``.

    Raises:
        ValueError: bad ``num_layers``/``keep_layers``/``strategy``/width sizes, a data-driven strategy or width
            pruning without ``calibration``, or ``width``/``mixed`` without a width size.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid; expected one of {STRATEGIES}")
    _, teacher_blocks = decoder_layers(teacher)
    total = len(teacher_blocks)
    sizes = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                 hidden_size=hidden_size)
    narrow = any(v is not None for v in sizes.values())
    if strategy in ("width", "mixed") and not narrow:
        raise ValueError(f"strategy={strategy!r} needs at least one width size: num_heads, intermediate_size or "
                         "hidden_size (e.g. intermediate_size=768)")
    if keep_layers is not None:
        kept = _check_keep_layers(keep_layers, total)
        if num_layers is not None and num_layers != len(kept):
            raise ValueError(f"num_layers={num_layers} disagrees with keep_layers={list(keep_layers)} ({len(kept)} layers)")
    elif strategy == "width":
        if num_layers is not None and num_layers != total:
            raise ValueError(f"strategy='width' keeps every block, but num_layers={num_layers} (teacher: {total}); "
                             "use strategy='mixed' for a shallower and narrower student")
        kept = list(range(total))
    else:
        if num_layers is None:
            raise ValueError("derive_student needs num_layers or keep_layers")
        depth = "block_influence" if strategy == "mixed" else strategy
        kept = select_layers(
            teacher, num_layers, strategy=depth, calibration=calibration, keep_first_last=keep_first_last
        )
    plan = None
    if narrow:
        if calibration is None:
            raise ValueError("width pruning ranks heads and channels by activation importance and needs calibration "
                             "token batches (calibration=...)")
        plan = _width_plan(teacher, kept, width_importance(teacher, calibration), **sizes)
    return _build_student(teacher, kept, plan), kept


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
    if strategy not in DEPTH_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid for choosing blocks; expected one of {DEPTH_STRATEGIES}")
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


@dataclass(frozen=True)
class WidthImportance:
    """Activation importance of a teacher's prunable width, measured over calibration tokens (Minitron).

    Attributes:
        heads: ``(layers, num_heads)``: per block and query head, the mean over tokens of the L2 norm of the head's
            attention output (its slice of the ``o_proj`` input).
        mlp: ``(layers, intermediate_size)``: per block and MLP channel, the mean over tokens of ``|act(gate) * up|``
            (the ``down_proj`` input).
        channels: ``(layers + 1, hidden_size)``: per block, the mean over tokens of ``|x|`` of both norms' outputs
            (``input_layernorm`` + ``post_attention_layernorm``), the residual-stream channels as the block reads
            them; the last row is the final norm's output (what the LM head reads).
    """

    heads: Tensor
    mlp: Tensor
    channels: Tensor


@torch.no_grad()
def width_importance(teacher: nn.Module, calibration) -> WidthImportance:
    """Measure :class:`WidthImportance` of every teacher block over ``calibration`` (see :func:`derive_student`).

    Minitron (arXiv 2407.14679, section 2.2) ranks heads by the L2 norm of their outputs, MLP neurons and
    embedding channels by the magnitude of their activations (the norms' outputs for channels), from a forward
    pass over a small calibration set -- no gradients. Every calibration token counts.

    Raises:
        ValueError: the blocks are not Llama-style (``self_attn.o_proj`` and ``mlp.down_proj``).
    """
    decoder, _ = find_decoder(teacher)
    _, blocks = decoder_layers(teacher)
    info_heads = _num_heads(teacher.config)
    heads = torch.zeros(len(blocks), info_heads, dtype=torch.float64)
    mlp: list[Tensor | None] = [None] * len(blocks)
    channels = torch.zeros(len(blocks) + 1, int(teacher.config.hidden_size), dtype=torch.float64)
    counts = {"tokens": 0}
    handles = []

    def head_hook(index):
        def hook(module, args):
            x = args[0].detach().double()
            x = x.reshape(-1, info_heads, x.shape[-1] // info_heads)
            heads[index] += x.norm(dim=-1).sum(0).cpu()
        return hook

    def mlp_hook(index):
        def hook(module, args):
            x = args[0].detach().double().abs().reshape(-1, args[0].shape[-1]).sum(0).cpu()
            mlp[index] = x if mlp[index] is None else mlp[index] + x
        return hook

    def channel_hook(index):
        def hook(module, args, output):
            channels[index] += output.detach().double().abs().reshape(-1, output.shape[-1]).sum(0).cpu()
        return hook

    for i, block in enumerate(blocks):
        attention, feed_forward = _attention(block, i), _mlp(block, i)
        handles.append(attention.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(feed_forward.down_proj.register_forward_pre_hook(mlp_hook(i)))
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, norm_name, None)
            if norm is not None:
                handles.append(norm.register_forward_hook(channel_hook(i)))
    final_norm = getattr(decoder, "norm", None)
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(channel_hook(len(blocks))))
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    try:
        for batch in _as_batches(calibration):
            decoder(input_ids=batch.to(device), use_cache=False)
            counts["tokens"] += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    n = max(1, counts["tokens"])
    return WidthImportance(heads=heads / n, mlp=torch.stack(mlp) / n, channels=channels / n)


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


def _build_student(teacher: nn.Module, kept: list[int], plan: "_WidthPlan | None" = None) -> nn.Module:
    prefix, _ = decoder_layers(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) > max(kept):
        config.layer_types = [layer_types[i] for i in kept]
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # weights in memory are already dequantised
    config.kd_kept_layers = list(kept)
    if plan is not None:
        config.kd_width_pruned = True  # every block is an approximation (repair treats them all)
        config.head_dim = plan.head_dim  # explicit: heads and hidden width change, the head width must not
        config.num_attention_heads = plan.num_heads
        config.num_key_value_heads = plan.num_kv_heads
        config.intermediate_size = plan.intermediate_size
        if plan.channels is not None:
            config.hidden_size = len(plan.channels)
            config.kd_kept_channels = list(plan.channels)
        _validate(config)
    config.dtype = torch.float32
    student = type(teacher)(config).to(torch.float32)

    position = {teacher_index: k for k, teacher_index in enumerate(kept)}
    head = prefix + "."
    state = {}
    for key, value in teacher.state_dict().items():
        block, rest = None, None
        if key.startswith(head):
            index, rest = key[len(head):].split(".", 1)
            if int(index) not in position:
                continue
            block = position[int(index)]
            key = f"{head}{block}.{rest}"
        state[key] = value if plan is None else plan.slice(value, block, rest, key)
    expected = student.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError("width pruning supports Llama-style blocks (self_attn.{q,k,v,o}_proj, "
                         f"mlp.{{gate,up,down}}_proj, RMSNorms); these tensors do not fit the narrower student: {wrong}")
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


@dataclass
class _WidthPlan:
    """Which teacher heads / channels each student block keeps (teacher indices, increasing)."""

    head_dim: int
    hidden: int  # the teacher's residual width
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    heads: list[list[int]]  # per student block, group-major (HF's repeat_kv: query head i reads kv head i // rep)
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    channels: list[int] | None  # kept residual channels, or None (full width)

    def slice(self, value: Tensor, block: int | None, rest: str | None, key: str) -> Tensor:
        """The part of one teacher tensor the student keeps (``block``/``rest``: its block and in-block name)."""
        ch = None if self.channels is None else torch.tensor(self.channels)
        if block is None:  # embeddings, final norm, LM head: only the residual channels can change
            if ch is None:
                return value
            if value.dim() == 1 and value.shape[0] == self.hidden:
                return value[ch]
            if value.dim() == 2 and value.shape[1] == self.hidden:
                return value[:, ch]
            return value
        name = rest.rsplit(".", 1)
        module, kind = (name[0], name[1]) if len(name) == 2 else (rest, "")
        leaf = module.rsplit(".", 1)[-1]
        rows = {"q_proj": self._head_rows(self.heads[block]), "k_proj": self._head_rows(self.kv_heads[block]),
                "v_proj": self._head_rows(self.kv_heads[block]), "gate_proj": torch.tensor(self.mlp[block]),
                "up_proj": torch.tensor(self.mlp[block])}
        columns = {"o_proj": self._head_rows(self.heads[block]), "down_proj": torch.tensor(self.mlp[block])}
        if leaf in rows:
            value = value[rows[leaf]]
            return value[:, ch] if (ch is not None and kind == "weight") else value
        if leaf in columns:
            if kind == "weight":
                value = value[:, columns[leaf]]
            return value if ch is None else value[ch]
        if leaf in ("input_layernorm", "post_attention_layernorm") and ch is not None:
            return value[ch]
        return value

    def _head_rows(self, heads: list[int]) -> Tensor:
        return torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads])


def _width_plan(teacher: nn.Module, kept: list[int], importance: WidthImportance, *, num_heads: int | None,
                num_kv_heads: int | None, intermediate_size: int | None, hidden_size: int | None) -> _WidthPlan:
    """Check the width sizes against the teacher and pick, per kept block, the most important heads and channels."""
    config = teacher.config
    t_heads, t_kv = _num_heads(config), int(getattr(config, "num_key_value_heads", None) or _num_heads(config))
    t_mlp, t_hidden = int(config.intermediate_size), int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or t_hidden // t_heads)
    rep = t_heads // t_kv
    if num_heads is None and num_kv_heads is not None:
        num_heads = _check_size("num_kv_heads", num_kv_heads, t_kv) * rep
    num_heads = t_heads if num_heads is None else _check_size("num_heads", num_heads, t_heads)
    if num_kv_heads is None:
        if num_heads % t_kv:
            raise ValueError(f"num_heads={num_heads} is not a multiple of the teacher's {t_kv} key/value heads; pass "
                             f"num_kv_heads (a divisor of num_heads, at most {t_kv}) to remove whole GQA groups")
        num_kv_heads = t_kv
    num_kv_heads = _check_size("num_kv_heads", num_kv_heads, t_kv)
    per_group = num_heads // num_kv_heads
    if num_heads % num_kv_heads or per_group > rep:
        raise ValueError(f"num_heads={num_heads} with num_kv_heads={num_kv_heads} needs {num_heads / num_kv_heads:g} "
                         f"query heads per key/value group; each of the teacher's groups has {rep} "
                         "(num_heads must be a multiple of num_kv_heads, at most num_kv_heads * "
                         f"{rep})")
    intermediate = t_mlp if intermediate_size is None else _check_size("intermediate_size", intermediate_size, t_mlp)
    heads, kv_heads, mlp = [], [], []
    for t in kept:
        score = importance.heads[t]
        groups = []
        for g in range(t_kv):
            members = list(range(g * rep, (g + 1) * rep))
            best = sorted(sorted(members, key=lambda h: -float(score[h]))[:per_group])
            groups.append((float(sum(score[h] for h in best)), g, best))
        chosen = sorted(sorted(groups, key=lambda item: -item[0])[:num_kv_heads], key=lambda item: item[1])
        kv_heads.append([g for _, g, _ in chosen])
        heads.append([h for _, _, best in chosen for h in best])
        mlp.append(sorted(importance.mlp[t].topk(intermediate).indices.tolist()))
    channels = None
    if hidden_size is not None and _check_size("hidden_size", hidden_size, t_hidden) < t_hidden:
        score = importance.channels[kept].sum(0) + importance.channels[-1]
        channels = sorted(score.topk(hidden_size).indices.tolist())
    return _WidthPlan(head_dim=head_dim, hidden=t_hidden, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      intermediate_size=intermediate, heads=heads, kv_heads=kv_heads, mlp=mlp, channels=channels)


def _validate(config) -> None:
    """Refuse sizes the architecture's own config validation would reject when the saved student is loaded."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as exc:  # huggingface_hub's strict-dataclass errors wrap a ValueError
        cause = exc.__cause__ or exc
        raise ValueError(f"these width sizes make a {type(config).__name__} that cannot be saved and loaded again: "
                         f"{cause}; choose num_heads / hidden_size that satisfy it (e.g. hidden_size a multiple of "
                         "num_heads)") from exc


def _check_size(name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer in 1..{limit} (the teacher's)")
    return value


def _num_heads(config) -> int:
    return int(getattr(config, "num_attention_heads", 1) or 1)


def _attention(block: nn.Module, index: int) -> nn.Module:
    attention = getattr(block, "self_attn", None)
    if attention is None or not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise ValueError(f"block {index} ({type(block).__name__}) has no self_attn with q/k/v/o_proj; width pruning "
                         "supports Llama-style blocks")
    return attention


def _mlp(block: nn.Module, index: int) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"block {index} ({type(block).__name__}) has no gated mlp with gate/up/down_proj; width "
                         "pruning supports Llama-style blocks")
    return mlp


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
