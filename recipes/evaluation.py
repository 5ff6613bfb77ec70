"""Held-out evaluation of a causal LM against its teacher, and a fair side-by-side generation-speed test.

Metrics (every next-token position of every block counts; block ``b`` position ``t`` predicts ``b[t+1]``):

- ``nll``: mean negative log-likelihood in nats; ``perplexity = exp(nll)``.
- ``accuracy``: next-token top-1 accuracy.
- with a teacher: ``agreement`` (fraction of positions where student and teacher argmax agree) and
  ``kl_teacher_student`` = mean over positions of ``KL(p_teacher || p_student)`` in nats.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "compare_generation_speed",
    "evaluate_lm",
    "generation_speed",
    "markdown_table",
    "retention",
    "speedup",
]


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    blocks: Sequence[Sequence[int]] | Tensor,
    teacher: nn.Module | None = None,
    batch_size: int = 8,
    progress: bool | str = False,
) -> dict[str, float]:
    """Evaluate ``model`` on equal-length token blocks.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(B, T, V)``.
        blocks: ``(N, T)`` token ids (a LongTensor or a list of equal-length lists).
        teacher: optional reference model with the same vocabulary.
        batch_size: blocks per forward pass.
        progress: show a progress bar over the batches (a string is its label).

    Returns:
        ``{"nll", "perplexity", "accuracy", "tokens"}``; when ``teacher`` is given also ``"agreement"``,
        ``"kl_teacher_student"`` and the teacher's own ``"teacher_nll"``, ``"teacher_perplexity"``,
        ``"teacher_accuracy"`` from the same forward passes (no second teacher pass needed). Both models are put in eval mode for the call and restored afterwards.
    """
    data = blocks if isinstance(blocks, Tensor) else torch.as_tensor([list(b) for b in blocks], dtype=torch.long)
    if data.dim() != 2 or data.shape[1] < 2 or data.shape[0] == 0:
        raise ValueError(f"blocks must be (N >= 1, T >= 2) token ids, got shape {tuple(data.shape)}")
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    nll_sum = correct = agree = 0.0
    kl_sum = teacher_nll = teacher_correct = 0.0
    count = 0
    try:
        batches = data.split(batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=progress if isinstance(progress, str) else "evaluating", leave=False)
        for batch in batches:
            batch = batch.to(device)
            targets = batch[:, 1:]
            logp = _log_probs(model, batch)
            nll_sum += float(-logp.gather(-1, targets.unsqueeze(-1)).sum())
            prediction = logp.argmax(-1)
            correct += float((prediction == targets).sum())
            count += targets.numel()
            if teacher is not None:
                teacher_logp = _log_probs(teacher, batch.to(next(teacher.parameters()).device)).to(device)
                teacher_prediction = teacher_logp.argmax(-1)
                agree += float((prediction == teacher_prediction).sum())
                teacher_correct += float((teacher_prediction == targets).sum())
                teacher_nll += float(-teacher_logp.gather(-1, targets.unsqueeze(-1)).sum())
                kl_sum += float((teacher_logp.exp() * (teacher_logp - logp)).sum())
                del teacher_logp
            del logp
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    nll = nll_sum / count
    out = {"nll": nll, "perplexity": math.exp(nll), "accuracy": correct / count, "tokens": count}
    if teacher is not None:
        out["agreement"] = agree / count
        out["kl_teacher_student"] = kl_sum / count
        out["teacher_nll"] = teacher_nll / count
        out["teacher_perplexity"] = math.exp(teacher_nll / count)
        out["teacher_accuracy"] = teacher_correct / count
    return out


def retention(student_metrics: Mapping[str, float], teacher_metrics: Mapping[str, float]) -> dict[str, float]:
    """How much of the teacher's quality the student keeps (1.0 = teacher level).

    ``accuracy``: student / teacher top-1 accuracy. ``perplexity``: teacher / student perplexity.
    ``nll``: teacher / student NLL. Keys missing from either side are skipped.
    """
    out: dict[str, float] = {}
    if "accuracy" in student_metrics and "accuracy" in teacher_metrics:
        out["accuracy"] = _ratio(student_metrics["accuracy"], teacher_metrics["accuracy"])
    if "perplexity" in student_metrics and "perplexity" in teacher_metrics:
        out["perplexity"] = _ratio(teacher_metrics["perplexity"], student_metrics["perplexity"])
    if "nll" in student_metrics and "nll" in teacher_metrics:
        out["nll"] = _ratio(teacher_metrics["nll"], student_metrics["nll"])
    return out


def generation_speed(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                     repeats: int = 1) -> dict[str, float]:
    """Greedy-generation speed of one model (see :func:`compare_generation_speed`)."""
    return compare_generation_speed({"model": model}, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    repeats=repeats)["model"]


@torch.no_grad()
def compare_generation_speed(
    models: Mapping[str, nn.Module],
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 1,
) -> dict[str, dict[str, float]]:
    """Measure greedy generation of several models, interleaved prompt by prompt so they share conditions.

    Every model generates exactly ``max_new_tokens`` per prompt (EOS cannot stop it early), with the KV cache,
    batch size 1, after ``warmup`` untimed generations each. One *repeat* is a pass over every prompt, the models
    taking turns on each prompt; the turn order is reversed every other repeat, so a drift in machine load hits
    both models alike. Per repeat and model: wall-clock tokens per second (``time.perf_counter``) and tokens per
    CPU-second (``time.process_time`` of this process: all its threads; it moves far less than wall time when
    other processes share the cores). :func:`speedup` turns the per-repeat values into paired ratios.

    Returns:
        ``{name: {"tokens_per_s" (median over repeats), "tokens_per_s_min", "tokens_per_s_max",
        "tokens_per_cpu_s" (median), "latency_s" (mean per prompt), "ms_per_token", "new_tokens" (all repeats),
        "repeats", "per_repeat": {"tokens_per_s": [...], "tokens_per_cpu_s": [...]}}}``.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; expected >= 1")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid; expected an integer >= 1")
    encoded = [tokenizer(p, return_tensors="pt") for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        use_cache=True,
    )
    modes = {name: m.training for name, m in models.items()}
    wall = {name: [0.0] * repeats for name in models}
    cpu = {name: [0.0] * repeats for name in models}
    produced = {name: [0] * repeats for name in models}
    order = list(models.items())
    try:
        for m in models.values():
            m.eval()
        for _ in range(warmup):
            for m in models.values():
                _generate(m, encoded[0], settings)
        for r in range(repeats):
            turn = order if r % 2 == 0 else order[::-1]
            for enc in encoded:
                for name, m in turn:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    new = _generate(m, enc, settings)
                    wall[name][r] += time.perf_counter() - start
                    cpu[name][r] += time.process_time() - start_cpu
                    produced[name][r] += new
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out = {}
    for name in models:
        per_wall = [n / t for n, t in zip(produced[name], wall[name])]
        per_cpu = [n / max(t, 1e-9) for n, t in zip(produced[name], cpu[name])]
        total, seconds = sum(produced[name]), sum(wall[name])
        out[name] = {
            "tokens_per_s": statistics.median(per_wall), "tokens_per_s_min": min(per_wall),
            "tokens_per_s_max": max(per_wall), "tokens_per_cpu_s": statistics.median(per_cpu),
            "latency_s": seconds / (len(encoded) * repeats), "ms_per_token": 1000.0 * seconds / total,
            "new_tokens": total, "repeats": repeats,
            "per_repeat": {"tokens_per_s": per_wall, "tokens_per_cpu_s": per_cpu},
        }
    return out


def speedup(stats: Mapping[str, Mapping], fast: str = "student", slow: str = "teacher") -> dict[str, object]:
    """Paired speed-up of ``fast`` over ``slow`` from :func:`compare_generation_speed` output: the ratio of their
    tokens per second *within each repeat* (same conditions), summarised as median, min and max, and the same
    for tokens per CPU-second."""
    a, b = stats[fast]["per_repeat"], stats[slow]["per_repeat"]
    wall = [x / y for x, y in zip(a["tokens_per_s"], b["tokens_per_s"])]
    cpu = [x / y for x, y in zip(a["tokens_per_cpu_s"], b["tokens_per_cpu_s"])]
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall), "values": wall,
            "cpu_median": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu), "cpu_values": cpu,
            "repeats": len(wall)}


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table: one row per ``rows`` entry, ``columns`` as ``(key, header, format)`` triples.

    Missing values print as an empty cell.
    """
    header = "| model | " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [header, rule]
    for name, row in rows.items():
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- helpers ------------------------------------------------------------------------------------------------


def _log_probs(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _generate(model: nn.Module, encoded, settings) -> int:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoded.items()}
    output = model.generate(**inputs, **settings)
    return int(output.shape[1] - inputs["input_ids"].shape[1])


def _ratio(numerator: float, denominator: float) -> float:
    return float("nan") if denominator == 0 else float(numerator) / float(denominator)
