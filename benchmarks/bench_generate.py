"""Throughput of ``kd-plugins generate``'s batched sampler against batch-1 ``generate`` on the SmolLM2 teacher.

The prompts are the generator's own (``mixed``: hand-written instructions through the chat template and
training-corpus openings), bucketed by length exactly as ``kd-plugins generate`` does. For each bucket, side by
side in one process: the bucket sampled batched by :func:`kd_plugins.recipes.generate.sample_teacher` (KV cache,
finished rows leave the batch), then ``--baseline-prompts`` of its prompts sampled one at a time with Hugging Face
``generate`` (batch 1, KV cache), then the bucket once more with batched Hugging Face ``generate`` (left padding,
finished rows stay until the longest ends). Same temperature / top-p, stopping at EOS. Tokens are completion tokens
through the first EOS. Ratios are per bucket (batched tokens/s over batch-1 tokens/s of the same bucket); the
table gives the median and the range over buckets, for wall-clock and process CPU time.

Usage::

    python benchmarks/bench_generate.py                     # JSON + Markdown in benchmarks/results/
    python benchmarks/bench_generate.py --buckets 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buckets", type=int, default=4, help="length buckets to time (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-prompts", type=int, default=8, help="batch-1 prompts per bucket")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_generate.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kd_plugins.recipes.generate import SamplingConfig, compare_throughput
    from kd_plugins.recipes.prompts import build_prompts
    from kd_plugins.recipes.smollm2 import load_smollm2

    teacher, tokenizer = load_smollm2(torch.float32)
    prompts = build_prompts(tokenizer, "mixed", args.buckets * args.batch_size, seed=0)
    config = SamplingConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p)
    result = compare_throughput(teacher, [p.ids for p in prompts], config, stop_ids=[tokenizer.eos_token_id],
                                pad_id=tokenizer.pad_token_id, groups=args.buckets,
                                baseline_prompts=args.baseline_prompts, hf_batched=True)
    lines = ["| bucket | prompt tokens | batched tok/s | HF batched tok/s | batch-1 tok/s | batched / batch-1 | "
             "HF batched / batch-1 | batched / batch-1 (CPU time) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lengths = sorted(len(p.ids) for p in prompts)
    for i, row in enumerate(result["groups"]):
        span = lengths[i * args.batch_size: (i + 1) * args.batch_size]
        cpu_ratio = row["batched"]["tokens_per_cpu_s"] / row["batch1"]["tokens_per_cpu_s"]
        lines.append(f"| {i} | {span[0]}-{span[-1]} | {row['batched']['tokens_per_s']:.1f} | "
                     f"{row['hf_batched']['tokens_per_s']:.1f} | {row['batch1']['tokens_per_s']:.1f} | "
                     f"{row['ratio']:.2f}x | {row['ratio_hf_batched']:.2f}x | {cpu_ratio:.2f}x |")
        row["ratio_cpu"] = cpu_ratio
    cpu = [row["ratio_cpu"] for row in result["groups"]]
    r, h = result["ratio"], result["ratio_hf_batched"]
    summary = (f"batched sampler (batch {args.batch_size}) vs batch-1 generate: median {r['median']:.2f}x tokens/s "
               f"(range {r['min']:.2f}-{r['max']:.2f} over {r['n']} buckets; CPU-time ratio median "
               f"{sorted(cpu)[len(cpu) // 2]:.2f}x); batched HF generate: median {h['median']:.2f}x "
               f"({h['min']:.2f}-{h['max']:.2f})")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    result.update(settings=vars(args), machine=platform.platform(), threads=torch.get_num_threads())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(
        "# Teacher sampling throughput (SmolLM2-135M-Instruct, CPU)\n\n" + table + "\n\n" + summary +
        f"\n\n{args.max_new_tokens} new tokens at most, temperature {args.temperature}, top-p {args.top_p}, "
        f"{args.threads} threads. Command: `python benchmarks/bench_generate.py`.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
