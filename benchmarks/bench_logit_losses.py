"""Logit-loss forward+backward: time and peak memory of ours (fused, chunked) vs naive full logits vs TRL 1.16's
``ChunkedDivergenceFunction``, against the matmul floor, at SmolLM2 scale (H=576, V=49152), fp32 on CPU.

Times are the process CPU time of the timed call (``getrusage``; wall-clock ratios are reported beside them):
on a shared 2-core machine wall time varies by 2x between identical runs, CPU time far less. Every case runs
in a fresh subprocess: inputs are built, ``ru_maxrss`` is read (the baseline: inputs + imports),
then one forward+backward is timed and ``ru_maxrss`` read again; the peak memory above the baseline is the
difference. Repeats are interleaved (round r runs every case once, in a rotated order) and medians taken, so
every ratio compares cases measured side by side under the same machine load.

* floor: the four matmuls any fused loss needs (teacher logits, student logits, ``dL/dh = G W``,
  ``dL/dW = G^T h``), in chunks of 1024 tokens into reused buffers -- no softmax, no loss.
* ours: :func:`kd_plugins.functional.fused_linear_kd` (analytic in-place gradients, chunk 1024).
* naive: full ``(N, V)`` logits of both models and :mod:`kd_plugins.functional.logit` under plain autograd.
* trl: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (beta 0 = forward KL, 0.5 = JSD; it has
  no DKD).

Rounds: ``--repeats`` at N <= 1024, one fewer at N <= 4096, two fewer above (at least 1). Naive and TRL are
not run above N = 4096 (naive would hold ~4 x 3.2 GB of logits at N = 16k on a shared 24 GB machine).

Usage: ``python benchmarks/bench_logit_losses.py [--sizes 1024,4096] [--repeats 3]``
(``benchmarks/run_all.py`` runs it with the defaults of the recorded run).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

H, V = 576, 49152
LOSSES = {"kl": ("forward_kl", {}), "jsd": ("generalized_jsd", {"beta": 0.5}), "dkd": ("dkd", {"alpha": 1.0, "beta": 2.0})}
METHODS = ("floor", "ours", "naive", "trl")


def run_case(method: str, loss: str, n: int, threads: int) -> dict:
    """Measure one case in this process (the worker side)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hs = (torch.randn(n, H, generator=g)).requires_grad_(True)
    ws = (torch.randn(V, H, generator=g) * 0.04).requires_grad_(True)
    ht = torch.randn(n, H, generator=g)
    wt = torch.randn(V, H, generator=g) * 0.04
    labels = torch.randint(0, V, (n,), generator=g)
    name, kwargs = LOSSES[loss]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    base, cpu0 = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if method == "floor":
        chunk = 1024
        buf_t, buf_s = torch.empty(min(chunk, n), V), torch.empty(min(chunk, n), V)
        grad_h, grad_w = torch.empty(n, H), torch.zeros(V, H)
        with torch.no_grad():
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                torch.mm(ht[lo:hi], wt.t(), out=buf_t[: hi - lo])
                torch.mm(hs[lo:hi], ws.t(), out=buf_s[: hi - lo])
                torch.mm(buf_s[: hi - lo], ws, out=grad_h[lo:hi])
                grad_w.addmm_(buf_s[: hi - lo].t(), hs[lo:hi])
    elif method == "ours":
        from kd_plugins.functional import fused_linear_kd

        fused_linear_kd(hs, ws, ht, wt, labels, loss=name, loss_kwargs=kwargs, chunk_size=1024).backward()
    elif method == "naive":
        from kd_plugins.functional import dkd, forward_kl, generalized_jsd

        fn = {"forward_kl": forward_kl, "generalized_jsd": generalized_jsd, "dkd": dkd}[name]
        student = hs @ ws.t()
        with torch.no_grad():
            teacher = ht @ wt.t()
        fn(student, teacher, labels, **kwargs).backward()
    elif method == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        beta = {"kl": 0.0, "jsd": 0.5}[loss]
        divergence, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, 1.0, 1.0, None, 1.0, None)
        divergence.mean().backward()
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss in KiB on Linux
    return {"cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0, "seconds": seconds,
            "peak_above_baseline_mib": (usage.ru_maxrss - base) / 1024.0}


def cases_for(sizes: list[int], big_naive_limit: int) -> list[tuple[str, str, int]]:
    cases = []
    for n in sizes:
        cases.append(("floor", "-", n))
        for loss in LOSSES:
            cases.append(("ours", loss, n))
            if n <= big_naive_limit:  # naive at 16k holds ~4 x 3.2 GB of logits: too much for a shared 24 GB box
                cases.append(("naive", loss, n))
                if loss != "dkd":
                    cases.append(("trl", loss, n))
    return cases


def repeats_for(n: int, repeats: int) -> int:
    """Fewer interleaved rounds for the larger sizes (time budget on a shared 2-core machine)."""
    return max(1, repeats - (0 if n <= 1024 else 1 if n <= 4096 else 2))


def bench(sizes: list[int], repeats: int, threads: int, big_naive_limit: int = 4096) -> dict:
    cases = cases_for(sizes, big_naive_limit)
    samples: dict[tuple, list[dict]] = {c: [] for c in cases}
    for r in range(repeats):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for case in order:
            if r >= repeats_for(case[2], repeats):
                continue
            method, loss, n = case
            out = subprocess.run(
                [sys.executable, __file__, "--worker", method, loss if loss != "-" else "kl", str(n), str(threads)],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            samples[case].append(result)
            print(f"  round {r + 1}: {method:<5} {loss:<3} N={n:<6} cpu {result['cpu_seconds']:7.2f} s  "
                  f"wall {result['seconds']:7.2f} s  "
                  f"{result['peak_above_baseline_mib']:8.0f} MiB", flush=True)
    rows = []
    for n in sizes:
        floor = statistics.median(s["cpu_seconds"] for s in samples[("floor", "-", n)])
        floor_wall = statistics.median(s["seconds"] for s in samples[("floor", "-", n)])
        for loss in LOSSES:
            naive_mem = None
            if ("naive", loss, n) in samples:
                naive_mem = statistics.median(s["peak_above_baseline_mib"] for s in samples[("naive", loss, n)])
            for method in ("ours", "naive", "trl"):
                key = (method, loss, n)
                if key not in samples or not samples[key]:
                    continue
                secs = statistics.median(s["cpu_seconds"] for s in samples[key])
                wall = statistics.median(s["seconds"] for s in samples[key])
                mem = statistics.median(s["peak_above_baseline_mib"] for s in samples[key])
                rows.append(dict(n=n, loss=loss, method=method, cpu_seconds=secs, floor_cpu_seconds=floor,
                                 time_vs_floor=secs / floor, wall_seconds=wall, wall_vs_floor=wall / floor_wall,
                                 peak_mib=mem,
                                 mem_vs_naive=None if naive_mem is None else mem / naive_mem,
                                 repeats=len(samples[key])))
    return {"H": H, "V": V, "threads": threads, "rows": rows,
            "samples": {"|".join(map(str, k)): v for k, v in samples.items()}}


def print_table(result: dict) -> None:
    print(f"\nlogit loss fwd+bwd, H={result['H']}, V={result['V']}, fp32, {result['threads']} threads "
          "(medians of interleaved repeats; ratios side by side)")
    print(f"{'N':>6} {'loss':<4} {'method':<6} {'cpu s':>8} {'x floor':>8} {'wall x floor':>12} {'peak MiB':>9} "
          f"{'x naive mem':>11} {'reps':>4}")
    for row in result["rows"]:
        mem = "-" if row["mem_vs_naive"] is None else f"{row['mem_vs_naive']:.3f}"
        print(f"{row['n']:>6} {row['loss']:<4} {row['method']:<6} {row['cpu_seconds']:>8.2f} {row['time_vs_floor']:>8.3f} "
              f"{row['wall_vs_floor']:>12.3f} {row['peak_mib']:>9.0f} {mem:>11} {row['repeats']:>4}")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "LOSS", "N", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        method, loss, n, threads = args.worker
        print(json.dumps(run_case(method, loss, int(n), int(threads))))
        return None
    result = bench([int(s) for s in args.sizes.split(",")], args.repeats, args.threads)
    print_table(result)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
