"""Cross-depth repair: train each student block, alone, to do the work of the teacher blocks it stands for.

A student derived from the teacher (:func:`kd_plugins.recipes.student.derive_student`) keeps teacher block
``kept[k]`` as its block ``k``. In the teacher, the residual stream enters block ``kept[k]`` as the output of teacher
block ``kept[k] - 1`` (the embeddings when ``kept[k] == 0``) and reaches the student's next block as the output of
teacher block ``kept[k+1] - 1`` (the last teacher block for the last student block) -- the pairs
:func:`~kd_plugins.recipes.student.kept_layer_pairs` gives. Repair trains student block ``k`` to map the first to
the second, both read from an offline teacher cache
(:func:`~kd_plugins.integrations.teacher_cache.cache_teacher` with ``layers=repair_layers(kept, L)``). The blocks
are independent given the teacher's states, so a step costs one block's forward and backward: no other block, no
LM head, no teacher forward. This is the layer-replacement idea of LLM-Streamline (Chen et al. 2024, arXiv
2403.19135) and the paper's "cross-depth semantic consistency", applied to every student block that stands for
more than one teacher block (or to every block of a width-pruned student, whose blocks are all approximations).

The alignment loss is selectable: ``mse`` and ``cosine`` (per token, :func:`kd_plugins.functional.hidden_mse` /
:func:`~kd_plugins.functional.hidden_cosine`) or ``contrastive`` (token InfoNCE,
:func:`~kd_plugins.functional.contrastive`, no projectors: the widths already agree). A student pruned in its
residual width (``config.kd_kept_channels``) is compared on its kept channels of the teacher's stream.

After repair, the logit stage is ordinary distillation; :func:`handover_kd_config` writes a KD config in which the
``curriculum`` scheduler hands the weight over from the same alignment pairs to a logit term.

The stage is resumable (``checkpoint_dir``: each finished block is saved; a rerun loads them and continues) and can
be bounded in process CPU-seconds.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kd_plugins.errors import ConfigError

LOSSES = ("mse", "cosine", "contrastive")
BLOCKS = ("inexact", "all")
PARAMETERS = ("all", "attention", "mlp")

__all__ = [
    "BLOCKS",
    "BlockReport",
    "LOSSES",
    "PARAMETERS",
    "RepairConfig",
    "alignment_loss",
    "block_targets",
    "handover_kd_config",
    "repair_layers",
    "repair_student",
]


@dataclass
class RepairConfig:
    """How the repair stage trains.

    Attributes:
        loss: ``mse``, ``cosine`` or ``contrastive``.
        steps: optimizer steps per block.
        batch_size: cached examples per step (examples of one length; see :func:`repair_student`).
        learning_rate: AdamW peak learning rate (linear warm-up over ``warmup_steps``, cosine decay to 0).
        warmup_steps: warm-up steps per block.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping per block (0: off).
        blocks: ``inexact`` (the blocks that stand for more than one teacher block; every block of a width-pruned
            student), ``all``, or a list of student block indices.
        parameters: which parameters of a block move: ``all``, ``attention`` (the attention and its input norm) or
            ``mlp`` (the MLP and its input norm).
        temperature: InfoNCE temperature (``contrastive``).
        max_tokens: tokens sampled per step for ``contrastive`` (bounds its ``O(N^2)`` cost).
        eval_examples: cached examples held out of training to measure every block's loss before and after.
        max_cpu_seconds: process CPU-time budget for the whole stage (shared equally by the blocks left); None: no
            budget.
        seed: batch order (and contrastive sampling).
    """

    loss: str = "mse"
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    blocks: str | list[int] = "inexact"
    parameters: str = "all"
    temperature: float = 0.07
    max_tokens: int = 512
    eval_examples: int = 8
    max_cpu_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"RepairConfig: loss={self.loss!r} is invalid; expected one of {LOSSES}")
        if self.parameters not in PARAMETERS:
            raise ConfigError(f"RepairConfig: parameters={self.parameters!r} is invalid; expected one of {PARAMETERS}")
        if isinstance(self.blocks, str):
            if self.blocks not in BLOCKS:
                raise ConfigError(f"RepairConfig: blocks={self.blocks!r} is invalid; expected one of {BLOCKS} or a "
                                  "list of student block indices")
        elif not (isinstance(self.blocks, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool)
                                                                   for b in self.blocks)):
            raise ConfigError(f"RepairConfig: blocks={self.blocks!r} is invalid; expected {BLOCKS} or a list of ints")
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("eval_examples", 0),
                          ("max_tokens", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"RepairConfig: {name}={value!r} is invalid; expected an integer >= {low}")
        for name, strict in (("learning_rate", True), ("temperature", True), ("weight_decay", False),
                             ("max_grad_norm", False)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if strict else value >= 0)):
                raise ConfigError(f"RepairConfig: {name}={value!r} is invalid; expected a finite number "
                                  f"{'> 0' if strict else '>= 0'}")
        if self.max_cpu_seconds is not None and not self.max_cpu_seconds >= 0:
            raise ConfigError(f"RepairConfig: max_cpu_seconds={self.max_cpu_seconds!r} is invalid; expected >= 0")


@dataclass
class BlockReport:
    """What repair did to one student block (losses on the held-out cached examples)."""

    block: int
    input_layer: int  # teacher block whose output is the input (-1: the embeddings)
    target_layer: int
    steps: int = 0
    loss_before: float = math.nan
    loss_after: float = math.nan
    relative_error_before: float = math.nan  # ||out - target||^2 / ||target||^2 over held-out tokens
    relative_error_after: float = math.nan
    cpu_s: float = 0.0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # training loss every step


def repair_layers(kept: Sequence[int], teacher_layers: int) -> list[int]:
    """The teacher block outputs the repair stage reads (inputs and targets of every student block); pass them to
    ``cache_teacher(..., layers=...)`` or ``kd-plugins generate --layers``."""
    return sorted({layer for _, inp, target in block_targets(kept, teacher_layers) for layer in (inp, target)
                   if layer >= 0})


def block_targets(kept: Sequence[int], teacher_layers: int) -> list[tuple[int, int, int]]:
    """``(student_block, input_layer, target_layer)`` per student block: the teacher block whose output enters the
    block (``-1``: the embeddings) and the one whose output the block must produce."""
    from kd_plugins.recipes.student import kept_layer_pairs

    kept = sorted(kept)
    return [(k, kept[k] - 1, target) for k, target in kept_layer_pairs(kept, teacher_layers)]


def alignment_loss(output: Tensor, target: Tensor, mask: Tensor, config: RepairConfig,
                   generator: torch.Generator | None = None) -> Tensor:
    """The repair loss of a block's ``(B, T, H)`` output against the teacher's ``(B, T, H)`` state (``mask``:
    ``(B, T)`` bool), through :mod:`kd_plugins.functional`."""
    from kd_plugins import functional as F

    if config.loss == "mse":
        return F.hidden_mse(output, target, mask)
    if config.loss == "cosine":
        return F.hidden_cosine(output, target, mask)
    return F.contrastive(output, target, mask, temperature=config.temperature, max_tokens=config.max_tokens,
                         generator=generator)


def repair_student(
    student: nn.Module,
    cache,
    config: RepairConfig | None = None,
    *,
    kept: Sequence[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> list[BlockReport]:
    """Repair the student's blocks in place from a teacher cache (see the module docstring).

    Args:
        student: a student from :func:`~kd_plugins.recipes.student.derive_student` (Llama-style blocks). Only the
            repaired blocks' parameters change (their ``requires_grad`` is restored afterwards).
        cache: a :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` holding :func:`repair_layers`.
        config: the :class:`RepairConfig`.
        kept: the kept teacher blocks (default: ``student.config.kd_kept_layers``).
        checkpoint_dir: where finished blocks are saved (``block-<k>.safetensors`` + ``repair.json``); a rerun with
            the same settings loads them and continues with the next block. Other settings are refused.
        progress: a progress bar per block.

    Returns:
        One :class:`BlockReport` per repaired block (in block order; loaded blocks report what was recorded).

    Raises:
        ConfigError: the cache lacks a layer, the student has no kept-layer record, a block index is out of range,
            or ``checkpoint_dir`` holds another run.
    """
    from kd_plugins.recipes.student import decoder_layers

    config = config or RepairConfig()
    kept = list(kept if kept is not None else getattr(student.config, "kd_kept_layers", []) or [])
    if not kept:
        raise ConfigError("repair needs the kept teacher blocks: pass kept=... or a student from derive_student "
                          "(config.kd_kept_layers)")
    teacher_layers = cache.model_info.num_layers
    targets = block_targets(kept, teacher_layers)
    missing = sorted(set(repair_layers(kept, teacher_layers)) - set(cache.layers))
    if missing:
        raise ConfigError(f"teacher cache {cache.path} holds layers {cache.layers}; repair needs {missing} too "
                          f"(build it with layers=repair_layers({kept}, {teacher_layers}))")
    _, blocks = decoder_layers(student)
    chosen = _chosen_blocks(config.blocks, targets, kept, student, len(blocks))
    channels = getattr(student.config, "kd_kept_channels", None)
    examples = list(range(len(cache)))
    held_out = examples[-config.eval_examples:] if config.eval_examples else []
    train = examples[: len(examples) - len(held_out)] or examples
    runner = _BlockRunner(student)
    checkpoint = _Checkpoint(checkpoint_dir, config, kept) if checkpoint_dir is not None else None
    reports: list[BlockReport] = []
    cpu_start = time.process_time()
    for position, (k, inp, target) in enumerate(t for t in targets if t[0] in chosen):
        if checkpoint is not None and checkpoint.has(k):
            reports.append(checkpoint.load(k, blocks[k]))
            continue
        left = len(chosen) - position
        budget = None
        if config.max_cpu_seconds is not None:
            budget = max(0.0, (config.max_cpu_seconds - (time.process_time() - cpu_start)) / left)
        report = _repair_block(runner, blocks[k], k, inp, target, cache, train, held_out, channels, config, budget,
                               progress)
        reports.append(report)
        if checkpoint is not None:
            checkpoint.save(k, blocks[k], report)
    return reports


def handover_kd_config(
    *,
    alignment: str = "mse",
    alignment_weight: float = 1.0,
    logit: str = "forward_kl",
    logit_weight: float = 1.0,
    ce_weight: float = 1.0,
    hold_steps: int = 0,
    handover_steps: int = 50,
    mode: str = "fixed",
    **curriculum: Any,
) -> dict[str, Any]:
    """A KD config dict for the logit stage after repair: ``logit`` plus ``alignment`` at the kept-layer pairs
    (``layers: kept``, resolved by :func:`kd_plugins.recipes.training.resolve_kd_config`), handed over by the
    ``curriculum`` scheduler (extra keyword arguments are its options)."""
    return {
        "ce_weight": ce_weight,
        "terms": [{"name": logit, "weight": logit_weight},
                  {"name": alignment, "weight": alignment_weight, "layers": "kept"}],
        "scheduler": {"name": "curriculum", "alignment": [alignment], "hold_steps": hold_steps,
                      "handover_steps": handover_steps, "mode": mode, **curriculum},
    }


# --- helpers ------------------------------------------------------------------------------------------------------


class _BlockRunner:
    """Runs one decoder block of a Llama-style model on given hidden states, as the model's own forward would:
    the model's rotary embedding, its causal mask for its attention implementation, the block's call signature."""

    def __init__(self, model: nn.Module):
        from kd_plugins.capture import find_decoder

        self.model = model
        self.decoder, _ = find_decoder(model)
        self.rotary = getattr(self.decoder, "rotary_emb", None)

    def embeddings(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(input_ids).float()

    def __call__(self, block: nn.Module, hidden: Tensor) -> Tensor:
        from transformers.masking_utils import create_causal_mask

        batch, length = hidden.shape[:2]
        positions = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        kwargs = {"attention_mask": mask, "position_ids": positions}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _repair_block(runner, block, k, inp, target, cache, train, held_out, channels, config, budget, progress):
    report = BlockReport(block=k, input_layer=inp, target_layer=target)
    params = _trainable(block, config.parameters)
    saved = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    states = _States(cache, runner, inp, target, channels)
    generator = torch.Generator().manual_seed(config.seed + k)
    was_training = block.training
    block.train()
    try:
        report.loss_before, report.relative_error_before = _evaluate(runner, block, states, held_out, config)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
        buckets = _length_buckets(cache, train)
        rng = random.Random(config.seed + k)
        bar = _progress(config.steps, progress, f"repair block {k}")
        cpu, wall = time.process_time(), time.perf_counter()
        for step in range(config.steps):
            if budget is not None and time.process_time() - cpu >= budget:
                break
            hidden, goal = states.batch(_sample(buckets, config.batch_size, rng))
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
            loss = alignment_loss(runner(block, hidden), goal, mask, config, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            report.losses.append(float(loss.detach()))
            report.steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{report.losses[-1]:.4g}")
        if bar is not None:
            bar.close()
        report.cpu_s, report.wall_s = time.process_time() - cpu, time.perf_counter() - wall
        report.loss_after, report.relative_error_after = _evaluate(runner, block, states, held_out, config)
    finally:
        block.train(was_training)
        for p in block.parameters():
            p.requires_grad_(saved[id(p)])
    return report


class _States:
    """The teacher's input and target states of one block for cached examples (fp32, the student's channels)."""

    def __init__(self, cache, runner, inp: int, target: int, channels):
        self.cache, self.runner, self.inp, self.target = cache, runner, inp, target
        self.channels = None if channels is None else torch.tensor(channels)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = [self.cache.example(i) for i in indices]
        goal = torch.stack([r[f"hidden.{self.target}"] for r in rows]).float()
        if self.inp < 0:
            hidden = self.runner.embeddings(torch.stack([r["input_ids"] for r in rows]).long())
        else:
            hidden = torch.stack([r[f"hidden.{self.inp}"] for r in rows]).float()
            if self.channels is not None:
                hidden = hidden[..., self.channels]
        if self.channels is not None:
            goal = goal[..., self.channels]
        return hidden, goal


@torch.no_grad()
def _evaluate(runner, block, states: _States, held_out: Sequence[int], config: RepairConfig) -> tuple[float, float]:
    """Mean loss (over batches of ``batch_size`` held-out examples of one length, so a contrastive loss sees as many
    negatives as in training) and relative squared error of the block on the held-out examples."""
    if not held_out:
        return math.nan, math.nan
    losses, error, norm = [], 0.0, 0.0
    generator = torch.Generator().manual_seed(config.seed)
    for bucket in _length_buckets(states.cache, held_out):
        for start in range(0, len(bucket), config.batch_size):
            hidden, goal = states.batch(bucket[start : start + config.batch_size])
            out = runner(block, hidden)
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
            losses.append(float(alignment_loss(out, goal, mask, config, generator)))
            error += float((out.double() - goal.double()).pow(2).sum())
            norm += float(goal.double().pow(2).sum())
    return sum(losses) / len(losses), error / max(norm, 1e-30)


def _chosen_blocks(blocks, targets, kept, student, count) -> set[int]:
    if not isinstance(blocks, str):
        bad = [b for b in blocks if not 0 <= b < count]
        if bad:
            raise ConfigError(f"RepairConfig.blocks={list(blocks)}: {bad} out of range for a {count}-block student")
        return set(blocks)
    if blocks == "all" or getattr(student.config, "kd_width_pruned", False):
        return set(range(count))
    # a block is exact when it stands for its teacher block alone: its target is that block's own output
    return {k for k, _, target in targets if target != kept[k]}


def _trainable(block: nn.Module, which: str) -> list[nn.Parameter]:
    if which == "all":
        return list(block.parameters())
    parts = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}[which]
    params = [p for name, p in block.named_parameters() if name.split(".")[0] in parts]
    if not params:
        raise ConfigError(f"RepairConfig.parameters={which!r}: the block has no parameters under {parts}")
    return params


def _lr_factor(step: int, config: RepairConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))


def _length_buckets(cache, indices: Sequence[int]) -> list[list[int]]:
    by_length: dict[int, list[int]] = {}
    for i in indices:
        by_length.setdefault(int(cache.example(i)["input_ids"].shape[0]), []).append(i)
    return list(by_length.values())


def _sample(buckets: list[list[int]], size: int, rng: random.Random) -> list[int]:
    """``size`` examples of one length: a bucket drawn in proportion to its size, then examples from it."""
    bucket = rng.choices(buckets, weights=[len(b) for b in buckets])[0]
    return [rng.choice(bucket) for _ in range(size)] if len(bucket) < size else rng.sample(bucket, size)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


class _Checkpoint:
    """Finished blocks on disk: ``block-<k>.safetensors`` and their reports in ``repair.json``."""

    def __init__(self, path: str | Path, config: RepairConfig, kept: list[int]):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.settings = {"config": {k: v for k, v in asdict(config).items() if k != "max_cpu_seconds"}, "kept": kept}
        self.state_file = self.path / "repair.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        if self.state and self.state.get("settings") != self.settings:
            raise ConfigError(f"{self.path} holds a repair run with other settings; use a new checkpoint_dir")
        self.state.setdefault("settings", self.settings)
        self.state.setdefault("blocks", {})

    def has(self, k: int) -> bool:
        return str(k) in self.state["blocks"] and (self.path / f"block-{k}.safetensors").is_file()

    def load(self, k: int, block: nn.Module) -> BlockReport:
        from safetensors.torch import load_file

        state = load_file(str(self.path / f"block-{k}.safetensors"))
        with torch.no_grad():
            for name, tensor in block.state_dict().items():
                tensor.copy_(state[name])
        return BlockReport(**self.state["blocks"][str(k)])

    def save(self, k: int, block: nn.Module, report: BlockReport) -> None:
        from safetensors.torch import save_file

        tmp = self.path / f"block-{k}.safetensors.tmp"
        save_file({n: t.detach().contiguous().cpu() for n, t in block.state_dict().items()}, str(tmp))
        tmp.replace(self.path / f"block-{k}.safetensors")
        self.state["blocks"][str(k)] = asdict(report)
        self.state_file.write_text(json.dumps(self.state, indent=2))
