"""Run every kd_plugins performance benchmark: one command, a printed table, JSON in benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py           # logit losses at N = 1k, 4k, 16k + training steps (~13 min)
    .venv/bin/python benchmarks/run_all.py --quick   # logit losses at N = 1k only, 1 round each (~5 min)

(a) ``bench_logit_losses.py``: fused logit losses vs naive vs TRL's ChunkedDivergenceFunction vs the matmul
floor (time and peak memory above baseline, each case in a fresh subprocess). (b)+(c) ``bench_training_step.py``:
the complete method vs the bare minimum step with a per-term breakdown, and the teacher cache vs the live teacher.
Every figure is a ratio of cases measured side by side in the same run (interleaved rounds, medians).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_logit_losses  # noqa: E402
import bench_training_step  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="logit losses at N=1k only; 1 round everywhere")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_performance.json"))
    args = parser.parse_args(argv)
    import torch

    started = time.perf_counter()
    sizes = [1024] if args.quick else [1024, 4096, 16384]
    repeats = 1 if args.quick else 3
    print(f"(a) logit losses, N in {sizes}", flush=True)
    logit = bench_logit_losses.bench(sizes, repeats, args.threads)
    print("(b)+(c) training step", flush=True)
    step = bench_training_step.bench(1 if args.quick else 3, args.threads)
    result = {
        "command": "benchmarks/run_all.py" + (" --quick" if args.quick else ""),
        "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
        "total_seconds": time.perf_counter() - started, "logit_losses": logit, "training_step": step,
    }
    bench_logit_losses.print_table(logit)
    bench_training_step.print_table(step)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"\nwrote {out} and {out.with_suffix('.md').name} ({result['total_seconds'] / 60:.1f} min)")


def markdown(result: dict) -> str:
    """The run as markdown tables (what docs/results.md shows)."""
    logit, step = result["logit_losses"], result["training_step"]
    lines = [f"Command: `.venv/bin/python {result['command']}` (torch {result['torch']}, {result['threads']} threads, "
             f"{result['total_seconds'] / 60:.0f} min).", "",
             f"(a) Logit loss forward+backward, H={logit['H']}, V={logit['V']}, fp32. Time = process CPU time of the "
             "call (median of interleaved rounds), as a multiple of the matmul floor measured in the same run; "
             "memory = peak RSS above the process baseline (fresh subprocess per case).", "",
             "| N | loss | method | CPU s | × floor (CPU) | × floor (wall) | peak MiB | × naive memory | rounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in logit["rows"]:
        mem = "-" if row["mem_vs_naive"] is None else f"{row['mem_vs_naive']:.2f}"
        lines.append(f"| {row['n']} | {row['loss']} | {row['method']} | {row['cpu_seconds']:.2f} | "
                     f"{row['time_vs_floor']:.2f} | {row['wall_vs_floor']:.2f} | {row['peak_mib']:.0f} | {mem} | "
                     f"{row['repeats']} |")
    lines += ["", f"(b) Training step, {step['teacher']}, student = derive_student(6 layers: "
              f"{step['student_kept_layers']}), batch {step['batch'][0]}×{step['batch'][1]}, medians of "
              f"{step['repeats']} interleaved rounds; bare step {step['median_s']['bare']:.2f} CPU s.", "",
              "| variant | × bare (CPU) | × bare (wall) |", "|---|---|---|"]
    wall = step["wall_vs_bare"]
    wall_full = (wall["full/update"] + 9 * wall["full/ordinary"]) / 10
    wall_of = {"bare": wall["bare"], "dkd": wall["dkd"], "contrastive": wall["contrastive"],
               "attention_relation": wall["attention_relation"], "full (gradnorm, amortised)": wall_full,
               "full update step": wall["full/update"], "full ordinary step": wall["full/ordinary"],
               "full (gradnorm, amortised), host CE": (wall["full/update (host CE)"]
                                                       + 9 * wall["full/ordinary (host CE)"]) / 10}
    for name, ratio in step["vs_bare"].items():
        lines.append(f"| {name} | {ratio:.2f} | {wall_of[name]:.2f} |")
    lines += ["", f"(c) Teacher cache (k={step['cache_k']}, bf16 hidden states of layers {step['cache_layers']}, "
              f"{step['cache_bytes_per_token']:.0f} bytes/token) vs live teacher, DKD + contrastive: cached / live "
              f"step = {step['cached_vs_live']:.2f} (CPU), {step['cached_vs_live_wall']:.2f} (wall); with "
              f"fuse_task_loss false (host CE) {step['cached_vs_live_host_ce']:.2f} (CPU), "
              f"{step['cached_vs_live_host_ce_wall']:.2f} (wall).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
