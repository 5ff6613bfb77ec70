"""Step-time overhead of the adaptive weight schedulers against ``constant``.

Every scheduler trains the same student (random weights, no downloads) with the same terms (``forward_kl`` plus
``contrastive``), side by side in one process: each repeat runs one step of every variant in a rotating order, and
the median over repeats is reported. A step is the whole training step: student forward with capture and CE,
teacher backbone under ``no_grad``, the Distiller, backward, AdamW on student and Distiller.

Gradient-aware schedulers (``gradnorm``, ``conflict``) pay for gradients only on update steps, so both kinds of
step are timed (an update step at ``step = every * k``, an ordinary step at ``every * k + 1``) and the amortised
cost of a step is ``(update + (every - 1) * ordinary) / every``.

Ratios are of process CPU time (``time.process_time``), with one thread by default: on a small shared machine
wall-clock time varies by 2x between identical steps with other work, and more threads than free cores make
every step many times slower. Wall-clock ratios are reported beside them. Whole-step ratios still carry a few
percent of noise there, so the table also gives the *added-work ratio*: ``1 + (CPU time of this scheduler's
Distiller call - that of constant's) / constant's step``. All the scheduler's extra work (probe gradients,
bookkeeping) happens inside the Distiller call, so this isolates it from the noise of the rest of the step. The teacher has the student's shape; a real,
larger teacher makes every step slower and the ratios smaller.

Usage::

    python benchmarks/bench_schedulers.py              # tiny + smollm2-shaped; JSON in benchmarks/results/
    python benchmarks/bench_schedulers.py --models tiny --repeats 9 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_plugins import BatchContext, Distiller, KDConfig, ModelInfo
from kd_plugins.capture import FeatureCapture, run_backbone

EVERY = 10
MODELS = {
    "tiny": dict(
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512),
        batch=4, seq=64, proj_dim=32,
    ),
    # SmolLM2-135M's shape with 6 of its 30 layers
    "smollm2": dict(
        config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
        batch=4, seq=128, proj_dim=256,
    ),
}
SCHEDULERS = {
    "constant": {"name": "constant"},
    "gradnorm": {"name": "gradnorm", "every": EVERY},
    "conflict": {"name": "conflict", "every": EVERY},
    "dwa": {"name": "dwa", "every": EVERY},
    "uncertainty": {"name": "uncertainty"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per variant (0: 15 tiny, 3 smollm2)")
    parser.add_argument("--shared-params", default="last_layer", choices=["last_layer", "final_norm"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="wall-clock budget for the timed repeats (10%% tiny, 85%% smollm2); at least 2 repeats run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_schedulers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"every": EVERY, "shared_params": args.shared_params, "threads": args.threads,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "models": {}}
    for name in args.models.split(","):
        repeats = args.repeats or (15 if name == "tiny" else 3)
        budget = args.budget_s * (0.1 if name == "tiny" else 0.85)
        results["models"][name] = bench_model(name, MODELS[name], repeats, args.shared_params, budget)
        print_table(name, results["models"][name])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def bench_model(name: str, spec: dict, repeats: int, shared_spec: str, budget_s: float) -> dict:
    config = LlamaConfig(max_position_embeddings=max(256, spec["seq"]), **spec["config"])
    torch.manual_seed(0)
    student = LlamaForCausalLM(config).float().train()
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(config).float().eval().requires_grad_(False)
    info_s, info_t = ModelInfo.from_config(config, "student"), ModelInfo.from_config(config, "teacher")
    terms = [
        {"name": "forward_kl", "weight": 1.0},
        {"name": "contrastive", "weight": 0.5, "layers": "uniform", "proj_dim": spec["proj_dim"],
         "max_tokens": spec["batch"] * spec["seq"]},
    ]
    distillers = {
        label: Distiller(KDConfig(terms=terms, scheduler=sched, shared_params=shared_spec), student=info_s,
                         teacher=info_t)
        for label, sched in SCHEDULERS.items()
    }
    req = next(iter(distillers.values())).requirements()
    s_capture = FeatureCapture(student, info=info_s, layers=req.student_layers, final_hidden=req.final_hidden)
    t_capture = FeatureCapture(teacher, info=info_t, layers=req.teacher_layers, final_hidden=req.final_hidden)
    decoder = student.model
    shared = list(decoder.layers[-1].parameters()) if shared_spec == "last_layer" else list(decoder.norm.parameters())
    student_opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    kd_opts = {k: torch.optim.AdamW(d.parameters(), lr=1e-4) if any(True for _ in d.parameters()) else None
               for k, d in distillers.items()}
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), generator=g)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def train_step(label: str, step: int) -> tuple[float, float, float]:
        distiller = distillers[label]
        start, start_cpu = time.perf_counter(), time.process_time()
        with s_capture.recording():
            task = student(**inputs).loss
        student_capture = s_capture.result()
        with torch.no_grad(), t_capture.recording():
            run_backbone(teacher, inputs)
        teacher_capture = t_capture.result()
        batch = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs["attention_mask"], step=step)
        distiller_start = time.process_time()
        out = distiller(student_capture, teacher_capture, batch, task_loss=task, shared_params=shared)
        distiller_cpu = time.process_time() - distiller_start
        out.loss.backward()
        student_opt.step()
        student_opt.zero_grad(set_to_none=True)
        if kd_opts[label] is not None:
            kd_opts[label].step()
            kd_opts[label].zero_grad(set_to_none=True)
        return time.process_time() - start_cpu, time.perf_counter() - start, distiller_cpu

    # Ordinary steps of gradnorm and conflict run the same code (the AdaptiveScheduler path without an update),
    # so one measurement, gradnorm's, serves both.
    variants = [
        ("constant", "constant", lambda r: r),
        ("gradnorm/update", "gradnorm", lambda r: EVERY * r),
        ("gradnorm/ordinary", "gradnorm", lambda r: EVERY * r + 1),
        ("conflict/update", "conflict", lambda r: EVERY * r),
        ("dwa", "dwa", lambda r: EVERY * r),
        ("uncertainty", "uncertainty", lambda r: r),
    ]
    train_step("constant", 0)  # warm-up: allocator, first-call costs
    started = time.perf_counter()
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    wall: dict[str, list[float]] = {v[0]: [] for v in variants}
    in_distiller: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(1, repeats + 1):
        spent = time.perf_counter() - started
        if r > 2 and spent / (r - 1) * r > budget_s:  # keep the whole benchmark inside its time budget
            print(f"{name}: stopping after {r - 1} repeats ({spent:.0f}s of a {budget_s:.0f}s budget)")
            break
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        if order.index(variants[1]) > order.index(variants[2]):  # gradnorm's update step before its ordinary one
            order.remove(variants[1])
            order.insert(order.index(variants[2]), variants[1])
        for variant, label, step_of in order:
            cpu, elapsed, distiller_cpu = train_step(label, step_of(r))
            times[variant].append(cpu)
            wall[variant].append(elapsed)
            in_distiller[variant].append(distiller_cpu)
    median = {k: statistics.median(v) for k, v in times.items()}
    median_wall = {k: statistics.median(v) for k, v in wall.items()}
    # The scheduler's own work (probe gradients, bookkeeping) happens inside the Distiller call, so its extra CPU
    # time over constant's Distiller call, divided by constant's whole step, is a low-noise overhead estimate.
    added = {k: statistics.median(v) - statistics.median(in_distiller["constant"]) for k, v in in_distiller.items()}
    base = median["constant"]
    rows = {"constant": dict(step_s=base, ratio=1.0, wall_ratio=1.0, added_ratio=1.0)}
    for label in ("gradnorm", "conflict"):
        update, ordinary = median[f"{label}/update"], median["gradnorm/ordinary"]
        amortised = (update + (EVERY - 1) * ordinary) / EVERY
        amortised_wall = (median_wall[f"{label}/update"] + (EVERY - 1) * median_wall["gradnorm/ordinary"]) / EVERY
        amortised_added = (added[f"{label}/update"] + (EVERY - 1) * added["gradnorm/ordinary"]) / EVERY
        rows[label] = dict(step_s=amortised, ratio=amortised / base, update_step_s=update, update_ratio=update / base,
                           ordinary_ratio=ordinary / base, wall_ratio=amortised_wall / median_wall["constant"],
                           added_ratio=1.0 + amortised_added / base,
                           update_added_ratio=1.0 + added[f"{label}/update"] / base)
    for label in ("dwa", "uncertainty"):
        rows[label] = dict(step_s=median[label], ratio=median[label] / base,
                           wall_ratio=median_wall[label] / median_wall["constant"], added_ratio=1.0 + added[label] / base)
    repeats = len(times["constant"])
    return dict(model=name, batch=spec["batch"], seq=spec["seq"], repeats=repeats, cpu_seconds=times,
                wall_seconds=wall, distiller_cpu_seconds=in_distiller, schedulers=rows)


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: batch {result['batch']} x seq {result['seq']}, median of {result['repeats']} repeats, "
          f"every={EVERY}")
    print(f"{'scheduler':<12} {'cpu s/step':>10} {'step ratio':>10} {'update-step':>11} {'wall ratio':>10} "
          f"{'added-work ratio':>16} {'update-step added':>17}")
    for label, row in result["schedulers"].items():
        update = f"{row['update_ratio']:.3f}" if "update_ratio" in row else "-"
        update_added = f"{row['update_added_ratio']:.3f}" if "update_added_ratio" in row else "-"
        print(f"{label:<12} {row['step_s']:>10.4f} {row['ratio']:>10.3f} {update:>11} {row['wall_ratio']:>10.3f} "
              f"{row['added_ratio']:>16.3f} {update_added:>17}")


if __name__ == "__main__":
    main()
