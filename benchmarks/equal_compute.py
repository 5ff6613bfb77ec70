"""The equal-compute ablation: every recipe gets the same training CPU-seconds, not the same steps. One command,
resumable.

    .venv/bin/python benchmarks/equal_compute.py                                  # every row, 3 seeds, 2 LRs
    .venv/bin/python benchmarks/equal_compute.py --budget-cpu-s 120 --max-minutes 60
    .venv/bin/python benchmarks/equal_compute.py --report-only                     # re-render from the JSON

Protocol (identical for every row; the rows differ in student, data, stage 1 and KD config):

* teacher SmolLM2-135M-Instruct (fp32, live: it runs in every training step, as in the main job); the pydoc
  training split, minus ``--validation-blocks`` evenly spaced blocks that no run trains on (the **validation
  split**); the held-out documents are the suite's in-domain **test** domain and are never used for a choice;
* **budget**: each training run gets ``--budget-cpu-s`` process CPU-seconds (all threads), stage 1 included. A
  row's step count is planned once from a probe (``--probe-steps`` steps on a throwaway copy, logging as often as
  the runs do, the first two steps untimed): ``(budget - stage 1 share) / CPU-s per step``; the LR schedule
  (linear warm-up over ``--warmup-ratio``, cosine decay) is laid over those steps, and a run that reaches the budget
  earlier stops there
  (``capped`` in the record). Evaluation is outside the budget. One-off artefacts shared by every seed and LR of a
  row (the teacher-generated data, the repair stage's teacher cache) are built once; their CPU-seconds are
  reported beside the table, not charged to the row;
* **learning rate**: each row trains seed 0 at every ``--lrs`` value; the LR with the best validation top-1
  accuracy is kept (ties: higher top-1 agreement with the teacher) and the other ``--seeds`` train at that LR only;
* **scores**: the whole retention suite (:mod:`kd_plugins.recipes.retention`: in-domain held-out, out-of-domain
  Wikipedia and dialog, the lm-evaluation-harness tasks) for every seed at the chosen LR; mean and sample standard
  deviation over seeds;
* **ranking** (fixed before any run, :func:`suite_score`): the mean of in-domain top-1 retention, out-of-domain
  top-1 retention and task accuracy retention above chance; the report names the best row, its lead over the
  runner-up and whether that lead exceeds the seeds' spread.

Rows (``ROW_ORDER``; KD configs are read from benchmarks/ablation.py's ``ROWS_YAML`` and recipes/main_job.py's
``DEFAULT_KD_CONFIG``, never copied): ``untrained`` and ``width_untrained`` (the derived students as they are),
``ce``, ``fkl_ce`` (the main job's default), ``gen_fkl_ce`` (the same on teacher-generated data mixed with the
corpus, ``kd-plugins generate``'s pipeline), ``repair_fkl_ce`` (the cross-depth repair stage, then the default),
``fkl_ce_align`` (the default + contrastive + attention relation at the kept pairs), ``full`` (the ablation's full
method: DKD + contrastive + attention relation under GradNorm anchored on DKD), ``width_fkl_ce`` (the default on the
width-pruned student of benchmarks/bench_students.py: 30 blocks, 3/1 heads, 256 MLP channels).

Outputs (``--out-dir``, default ``docs/results/equal-compute``): ``equal_compute_runs.json`` (one record per
finished run, rewritten atomically; a rerun skips runs with the same setup signature and row config), the
``equal_compute_state.json`` (planned steps per row, one-off costs), ``equal_compute.json`` / ``.md`` (the table) and
``equal_compute.png``. ``--max-minutes`` starts no run whose projected end passes the cap; a rerun resumes.

Tests inject a tiny teacher and corpus through :func:`run` (``load_models``, ``load_corpus``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
ROW_ORDER = ("untrained", "ce", "fkl_ce", "gen_fkl_ce", "repair_fkl_ce", "fkl_ce_align", "full", "width_untrained",
             "width_fkl_ce")
DEFAULTS = dict(budget_cpu_s=600.0, lrs=[2e-3, 5e-4], seeds=[0, 1, 2], student_layers=6, strategy="block_influence",
                block_size=128, batch_size=4, warmup_ratio=0.1, validation_blocks=24, eval_blocks=48,
                calibration_blocks=8, probe_steps=12, threads=2, width_heads=3, width_kv_heads=1,
                width_intermediate=256, repair_share=0.3, repair_cache_blocks=64, repair_steps=300, repair_lr=1e-3,
                gen_prompts=64, gen_tokens=96, gen_teacher_share=0.5, gen_max_cpu_s=900.0)

LOGGING_STEPS = 5  # the same in the probe and the runs, so the probe's cost per step includes the logging share
PROBE_WARMUP = 2  # probe steps not timed

__all__ = ["ROW_ORDER", "build_parser", "choose_lr", "load_rows", "main", "rank_rows", "run", "split_validation",
           "suite_score"]


# --- rows -----------------------------------------------------------------------------------------------------


def load_rows() -> dict[str, dict]:
    """``{row: {"description", "kd", "student", "data", "repair"}}`` in table order."""
    import yaml

    from kd_plugins.recipes.main_job import DEFAULT_KD_CONFIG

    ablation = _module("ablation").load_rows()
    fkl_ce = yaml.safe_load(DEFAULT_KD_CONFIG)
    align_terms = [t for t in ablation["dkd_contrastive_attn"]["kd"]["terms"] if t["name"] != "dkd"]
    row = lambda description, kd, student="depth", data="corpus", repair=False: dict(  # noqa: E731
        description=description, kd=copy.deepcopy(kd), student=student, data=data, repair=repair)
    rows = {
        "untrained": row("the 6-block student as derived (block influence), no training", None),
        "ce": row("CE only: plain SFT on the corpus, no teacher", ablation["ce"]["kd"]),
        "fkl_ce": row("forward KL + CE at equal weight: the main job's default", fkl_ce),
        "gen_fkl_ce": row("forward KL + CE on teacher-generated text (instruction prompts, prompt tokens masked) "
                          "mixed half and half with corpus blocks", fkl_ce, data="generated"),
        "repair_fkl_ce": row("stage 1: cross-depth repair (mse, block-local, from a teacher cache), then forward KL "
                             "+ CE", fkl_ce, repair=True),
        "fkl_ce_align": row("forward KL + CE + contrastive + attention relation at the kept pairs",
                            {**fkl_ce, "terms": fkl_ce["terms"] + align_terms}),
        "full": row("the ablation's full method: DKD + contrastive + attention relation under GradNorm anchored on "
                    "DKD", ablation["full"]["kd"]),
        "width_untrained": row("the width-pruned student (30 blocks, fewer heads and MLP channels), no training",
                               None, student="width"),
        "width_fkl_ce": row("forward KL + CE on the width-pruned student", fkl_ce, student="width"),
    }
    return {name: rows[name] for name in ROW_ORDER}


def split_validation(blocks: Sequence[Sequence[int]], count: int) -> tuple[list, list]:
    """``(training, validation)``: ``count`` evenly spaced blocks of the training split taken out of it (no run
    trains on them; other blocks of their documents may be trained on)."""
    if not 0 < count < len(blocks):
        raise ValueError(f"validation blocks: {count} of {len(blocks)} training blocks; expected 0 < count < "
                         f"{len(blocks)}")
    stride = len(blocks) / count
    picked = {int((i + 0.5) * stride) for i in range(count)}
    return [b for i, b in enumerate(blocks) if i not in picked], [blocks[i] for i in sorted(picked)]


def choose_lr(candidates: dict[float, dict]) -> float:
    """The learning rate whose validation metrics are best: top-1 accuracy, then top-1 agreement."""
    if not candidates:
        raise ValueError("choose_lr: no candidate learning rates")
    return max(candidates, key=lambda lr: (candidates[lr]["accuracy"], candidates[lr].get("agreement", 0.0), -lr))


# --- CLI ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="benchmarks/equal_compute.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROW_ORDER), choices=list(ROW_ORDER))
    p.add_argument("--budget-cpu-s", type=float, default=d["budget_cpu_s"],
                   help="process CPU-seconds of training per run, stage 1 included (default %(default)s)")
    p.add_argument("--lrs", nargs="+", type=float, default=d["lrs"], help="learning rates chosen among on validation")
    p.add_argument("--seeds", nargs="+", type=int, default=d["seeds"], help="the first one also chooses the LR")
    for name in ("student_layers", "block_size", "batch_size", "validation_blocks", "eval_blocks",
                 "calibration_blocks", "probe_steps", "threads", "width_heads", "width_kv_heads", "width_intermediate",
                 "repair_cache_blocks", "repair_steps", "gen_prompts", "gen_tokens"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    for name in ("warmup_ratio", "repair_share", "repair_lr", "gen_teacher_share", "gen_max_cpu_s"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=d[name])
    p.add_argument("--strategy", choices=("uniform", "block_influence", "angular"), default=d["strategy"])
    p.add_argument("--tasks", nargs="+", default=None, help="suite tasks (default: all; 'none': none)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher cache of the suite (default: the suite's)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results" / "equal-compute")
    p.add_argument("--work-dir", type=Path, default=Path("kd_output/equal-compute"),
                   help="one-off artefacts, probe and trainer scratch (default %(default)s; git-ignored)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="cap on the whole invocation, wall (0: none)")
    p.add_argument("--report-only", action="store_true", help="only re-render the table and plot from the JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace, *, load_models: Callable[[], tuple[Any, Any]] | None = None,
        load_corpus: Callable[[], tuple[list[str], list[str]]] | None = None,
        suite_blocks: dict[str, list[list[int]]] | None = None) -> dict:
    """Run the ablation for parsed ``args``; returns the summary also written to ``equal_compute.json``.

    ``load_models() -> (teacher, tokenizer)`` and ``load_corpus() -> (train_docs, heldout_docs)`` replace SmolLM2
    and the pydoc split, ``suite_blocks`` the suite's out-of-domain blocks (tests pass tiny ones).
    """
    out_dir = Path(args.out_dir)
    if args.report_only:
        summary = json.loads((out_dir / "equal_compute.json").read_text())
        return _report(out_dir, _load(out_dir / "equal_compute_runs.json"), summary["setup"], summary["state"],
                       summary["signature"])
    _check_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, load_models, load_corpus, suite_blocks)
    finally:
        torch.set_num_threads(threads)


# --- the harness ----------------------------------------------------------------------------------------------


def _run(args, load_models, load_corpus, suite_blocks) -> dict:
    from kd_plugins.recipes.data import load_corpus as corpus, split_corpus, token_blocks
    from kd_plugins.recipes.evaluation import evaluate_lm
    from kd_plugins.recipes.retention import TASKS, SuiteConfig, TeacherReference, default_cache_dir
    from kd_plugins.recipes.student import count_parameters, derive_student
    from kd_plugins.recipes.training import Clock, resolve_kd_config

    clock = Clock("equal compute", minutes=True)
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows()
    clock.say("loading the teacher")
    teacher, tokenizer, teacher_desc = _module("retention_rows").load_teacher(load_models)
    teacher_layers = teacher.config.num_hidden_layers
    train_docs, heldout_docs = (load_corpus or (lambda: split_corpus(corpus("pydoc_topics"), 0.1, seed=0)))()
    all_train = token_blocks(train_docs, tokenizer, block_size=args.block_size)
    train_blocks, validation_blocks = split_validation(all_train, args.validation_blocks)
    heldout_blocks = token_blocks(heldout_docs, tokenizer, block_size=args.block_size, max_blocks=args.eval_blocks)
    calibration = torch.tensor(train_blocks[: args.calibration_blocks])
    clock.say(f"data: {len(train_blocks)} training blocks, {len(validation_blocks)} validation blocks (taken out of "
              f"the training split), {len(heldout_blocks)} held-out test blocks")

    students: dict[str, tuple[Any, list[int]]] = {}  # both, whichever rows run: they are part of the setup
    students["depth"] = derive_student(teacher, num_layers=args.student_layers, strategy=args.strategy,
                                       calibration=calibration)
    students["width"] = derive_student(teacher, strategy="width", calibration=calibration,
                                       num_heads=args.width_heads, num_kv_heads=args.width_kv_heads,
                                       intermediate_size=args.width_intermediate)
    base_states = {k: {n: v.detach().clone() for n, v in s.state_dict().items()} for k, (s, _) in students.items()}
    params = {"teacher": count_parameters(teacher), **{k: count_parameters(s) for k, (s, _) in students.items()}}
    clock.say("students: " + "; ".join(f"{k} keeps teacher blocks {kept} ({params[k]['non_embedding'] / 1e6:.2f} M "
                                       f"non-embedding parameters)" for k, (_, kept) in students.items()))

    tasks = [] if args.tasks in (["none"], ["None"]) else (args.tasks or list(TASKS))
    suite = SuiteConfig(tasks=tuple(tasks), block_size=args.block_size, max_blocks=args.eval_blocks,
                        task_limit=args.task_limit)
    reference = TeacherReference(teacher, tokenizer, suite, cache_dir=args.cache_dir or default_cache_dir(),
                                 blocks={**(suite_blocks or {}), "pydoc_heldout": heldout_blocks})
    clock.say("teacher's side of the suite (computed once, or read from its cache)")
    reference.prepare()
    validation_teacher = _module("ablation").HeldoutTeacher(teacher, validation_blocks)

    setup = {"teacher": teacher_desc, "teacher_fingerprint": reference.fingerprint,
             "kept": {k: kept for k, (_, kept) in students.items()}, "parameters": params,
             "data": _digest([train_blocks, validation_blocks, heldout_blocks]), "suite": {**vars(suite)},
             **{k: getattr(args, k) for k in DEFAULTS if k not in ("seeds", "lrs", "eval_blocks")}}
    signature = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]
    setup.update(seeds=list(args.seeds), lrs=list(args.lrs))
    state_path, runs_path = out_dir / "equal_compute_state.json", out_dir / "equal_compute_runs.json"
    state = _load(state_path, {}) if _load(state_path, {}).get("signature") == signature else {"signature": signature}
    state.setdefault("plans", {})
    state.setdefault("oneoff", {})

    configs = {}
    for name in args.rows:
        kind = rows[name]["student"]
        configs[name] = {"row": rows[name], "budget_cpu_s": args.budget_cpu_s, "kd": None if rows[name]["kd"] is None
                         else resolve_kd_config(rows[name]["kd"], students[kind][1], teacher_layers, steps=1000)}
    ctx = dict(args=args, teacher=teacher, tokenizer=tokenizer, students=students, base_states=base_states,
               train_blocks=train_blocks, work_dir=work_dir, state=state, state_path=state_path, clock=clock,
               teacher_layers=teacher_layers)

    wall_per_run: list[float] = []
    jobs = _jobs(args, rows)
    for phase, name, lr, seed in jobs:
        records = _load(runs_path, [])
        mine = [r for r in records if r["row"] == name and r.get("signature") == signature
                and _same(r.get("row_config"), configs[name])]
        if phase == "untrained":
            if mine:
                continue
        elif phase == "choose":
            candidates = {r["lr"]: r["validation"] for r in mine if r["seed"] == args.seeds[0]}
            if any(r.get("suite") for r in mine if r["seed"] == args.seeds[0]) or len(candidates) < len(args.lrs):
                continue
        else:
            if phase == "seed":
                lr = _chosen(mine, args)
                if lr is None:
                    continue  # its LR choice did not finish (capped invocation); a rerun does it first
            if any(r["lr"] == lr and r["seed"] == seed for r in mine):
                continue
        if args.max_minutes:
            left = 60 * args.max_minutes - clock.elapsed()
            need = max(wall_per_run) if wall_per_run and phase not in ("choose", "untrained") else 0.0
            if left <= 0 or need > left:
                clock.say(f"--max-minutes {args.max_minutes:g}: not starting {phase} {name} (projected past the cap)")
                break
        started = time.perf_counter()
        if phase == "untrained":
            kind = rows[name]["student"]
            student = _fresh(ctx, kind)
            record = {"row": name, "lr": None, "seed": None, "train": {"steps": 0, "cpu_s": 0.0},
                      "suite": _suite(student, reference, clock, name)}
        elif phase == "choose":
            lr = choose_lr({r["lr"]: r["validation"] for r in mine if r["seed"] == args.seeds[0]})
            picked_record = next(r for r in mine if r["lr"] == lr and r["seed"] == args.seeds[0])
            student = _fresh(ctx, rows[name]["student"])
            student.load_state_dict(torch.load(_state_file(work_dir, signature, name, lr, args.seeds[0])),
                                    strict=False)
            picked_record["suite"] = _suite(student, reference, clock, f"{name} (chosen LR {lr:g})")
            picked_record["chosen"] = True
            records = [r for r in records if r is not picked_record and not (
                r["row"] == name and r["lr"] == lr and r["seed"] == args.seeds[0] and r.get("signature") == signature)]
            records.append(picked_record)
            _write_json(runs_path, records)
            for other in args.lrs:
                _state_file(work_dir, signature, name, other, args.seeds[0]).unlink(missing_ok=True)
            _report(out_dir, records, setup, state, signature, quiet=True)
            continue
        else:
            clock.say(f"=== {name}, LR {lr:g}, seed {seed} ({phase}) ===")
            student, train = _train_row(ctx, name, rows[name], configs[name]["kd"], lr, seed)
            record = {"row": name, "lr": lr, "seed": seed, "train": train,
                      "validation": _validation(student, validation_blocks, validation_teacher, evaluate_lm)}
            clock.say(f"{name} LR {lr:g} seed {seed}: {train['steps']} steps in {train['cpu_s']:.0f} CPU-s"
                      f"{' (capped)' if train['capped'] else ''}; validation top-1 "
                      f"{record['validation']['accuracy']:.2%}")
            if phase == "select":
                torch.save({n: p.detach() for n, p in student.named_parameters() if p.requires_grad},
                           _state_file(work_dir, signature, name, lr, seed))
            else:
                record["suite"] = _suite(student, reference, clock, f"{name} seed {seed}")
                record["chosen"] = True
        record.update(signature=signature, row_config=configs[name], phase=phase,
                      wall_s=time.perf_counter() - started, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        records = [r for r in _load(runs_path, []) if not (
            r["row"] == name and r.get("lr") == record["lr"] and r.get("seed") == record["seed"]
            and r.get("signature") == signature)]
        records.append(record)
        _write_json(runs_path, records)
        if phase != "untrained":
            wall_per_run.append(record["wall_s"])
        del student
        _report(out_dir, _load(runs_path, []), setup, state, signature, quiet=True)  # an interrupted run leaves a table

    summary = _report(out_dir, _load(runs_path, []), setup, state, signature)
    clock.say(f"wrote {out_dir / 'equal_compute.md'}; total {clock.elapsed() / 60:.1f} min")
    return summary


def _jobs(args, rows) -> list[tuple[str, str, float | None, int | None]]:
    """The order of work: every row's LR choice (seed 0 at each LR, then its suite) first, so a capped invocation
    leaves whole rows; then the other seeds, one seed of every row at a time."""
    jobs: list[tuple[str, str, float | None, int | None]] = []
    for name in args.rows:
        if rows[name]["kd"] is None:
            jobs.append(("untrained", name, None, None))
            continue
        jobs += [("select", name, lr, args.seeds[0]) for lr in args.lrs]
        jobs.append(("choose", name, None, None))
    for seed in args.seeds[1:]:
        jobs += [("seed", name, None, seed) for name in args.rows if rows[name]["kd"] is not None]
    return jobs


def _chosen(mine: list[dict], args) -> float | None:
    return next((r["lr"] for r in mine if r["seed"] == args.seeds[0] and r.get("chosen")), None)


# --- one training run -----------------------------------------------------------------------------------------


def _train_row(ctx, name: str, row: dict, kd: dict, lr: float, seed: int):
    """Train one (row, LR, seed) within the budget; returns ``(student, record)``."""
    from kd_plugins.recipes.training import resolve_kd_config

    args, state = ctx["args"], ctx["state"]
    student = _fresh(ctx, row["student"])
    kept = ctx["students"][row["student"]][1]
    dataset = _dataset(ctx, row)
    cache = _repair_cache(ctx, kept) if row["repair"] else None
    stage1_budget = args.repair_share * args.budget_cpu_s if row["repair"] else 0.0
    plan = state["plans"].get(name)
    if plan is None:  # probe once per row: the same step count for every LR and seed
        probe = _fresh(ctx, row["student"])
        probe_kd = resolve_kd_config(row["kd"], kept, ctx["teacher_layers"], steps=args.probe_steps)
        info = _logit_stage(ctx, probe, probe_kd, dataset, lr, seed, steps=args.probe_steps, cap=None,
                            run_dir=ctx["work_dir"] / "probe" / name)
        per_step = info["cpu_per_step"]
        overhead = max(0.0, info["cpu_s"] - per_step * args.probe_steps)  # trainer set-up, first-step warm-up
        steps = max(1, int((args.budget_cpu_s - stage1_budget - overhead) / per_step))
        plan = state["plans"][name] = {"probe_cpu_per_step": per_step, "probe_overhead_cpu_s": overhead,
                                       "steps": steps, "probe_cpu_s": info["cpu_s"]}
        _write_json(ctx["state_path"], state)
        ctx["clock"].say(f"{name}: probe {per_step:.2f} CPU-s/step -> {steps} steps in the budget")
        del probe
    record: dict[str, Any] = {"planned_steps": plan["steps"], "budget_cpu_s": args.budget_cpu_s}
    cpu0 = time.process_time()
    if row["repair"]:
        from kd_plugins.recipes.repair import RepairConfig, repair_student

        reports = repair_student(student, cache, RepairConfig(
            loss="mse", steps=args.repair_steps, learning_rate=args.repair_lr, max_cpu_seconds=stage1_budget,
            seed=seed), kept=kept, progress=False)
        record["stage1"] = {"cpu_s": time.process_time() - cpu0, "blocks": [
            {k: v for k, v in vars(r).items() if k != "losses"} for r in reports]}
    used = time.process_time() - cpu0
    resolved = resolve_kd_config(row["kd"], kept, ctx["teacher_layers"], steps=plan["steps"],
                                 warmup_ratio=args.warmup_ratio)
    info = _logit_stage(ctx, student, resolved, dataset, lr, seed, steps=plan["steps"],
                        cap=args.budget_cpu_s - used, run_dir=ctx["work_dir"] / "trainer")
    record.update(steps=info["steps"], capped=info["capped"], cpu_s=time.process_time() - cpu0,
                  logit_stage_cpu_s=info["cpu_s"], final_loss=info["final_loss"], kd_config=resolved)
    return student, record


def _logit_stage(ctx, student, kd: dict, dataset, lr: float, seed: int, *, steps: int, cap: float | None,
                 run_dir: Path) -> dict:
    from transformers import TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.training import sft_config

    args = ctx["args"]
    cpu0 = time.process_time()
    marks: list[float] = []

    class CPUBudget(TrainerCallback):
        """Stops training once the run's process CPU time reaches the cap (a backstop: the steps are planned to
        fit); records per-step CPU marks."""

        capped = False

        def on_step_end(self, targs, tstate, control, **kwargs):
            marks.append(time.process_time())
            if cap is not None and marks[-1] - cpu0 >= cap and tstate.global_step < tstate.max_steps:
                CPUBudget.capped = True
                control.should_training_stop = True

    set_seed(seed)
    student.get_input_embeddings().weight.requires_grad_(False)  # as the main job: tied embedding / head frozen
    sft_args = sft_config(str(run_dir), steps=steps, batch_size=args.batch_size, learning_rate=lr,
                          block_size=args.block_size, warmup_ratio=args.warmup_ratio, seed=seed,
                          logging_steps=LOGGING_STEPS)
    common = dict(model=student, args=sft_args, train_dataset=dataset, processing_class=ctx["tokenizer"],
                  callbacks=[CPUBudget()])
    if kd.get("terms"):
        trainer = KDSFTTrainer(teacher=ctx["teacher"], teacher_tokenizer=ctx["tokenizer"],
                               kd_config=load_kd_config(kd), **common)
    else:  # CE only: the plain host trainer, no teacher
        trainer = SFTTrainer(**common)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    student.eval()
    # CPU-seconds per step in the steady state: the first PROBE_WARMUP steps (allocations, first-call costs) untimed
    skip = min(PROBE_WARMUP, len(marks) - 2)
    per_step = ((marks[-1] - marks[skip]) / (len(marks) - 1 - skip) if len(marks) >= 2
                else (marks[-1] - cpu0 if marks else None))
    return {"steps": trainer.state.global_step, "capped": CPUBudget.capped, "cpu_s": time.process_time() - cpu0,
            "cpu_per_step": per_step,
            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


def _fresh(ctx, kind: str):
    student = copy.deepcopy(ctx["students"][kind][0])
    student.load_state_dict(ctx["base_states"][kind])
    return student


def _dataset(ctx, row: dict):
    from kd_plugins.recipes.data import lm_dataset

    if row["data"] == "corpus":
        return lm_dataset(ctx["train_blocks"])
    return _generated(ctx)


def _generated(ctx):
    """The teacher-generated dataset (built once: ``kd-plugins generate``'s pipeline, instruction prompts only so
    no prompt comes from a validation block), mixed with training blocks."""
    from datasets import load_from_disk

    from kd_plugins.recipes.generate import SamplingConfig, generate_distillation_data

    args, state = ctx["args"], ctx["state"]
    out = ctx["work_dir"] / f"generated-{state['signature']}"
    if "generated" not in state["oneoff"]:
        cpu0 = time.process_time()
        info = generate_distillation_data(
            ctx["teacher"], ctx["tokenizer"], out, source="instructions", num_prompts=args.gen_prompts,
            sampling=SamplingConfig(batch_size=16, max_new_tokens=args.gen_tokens), real_blocks=ctx["train_blocks"],
            teacher_share=args.gen_teacher_share, mask_prompt=True, block_size=args.block_size, cache=False,
            max_cpu_seconds=args.gen_max_cpu_s, progress=True)
        state["oneoff"]["generated"] = {"cpu_s": time.process_time() - cpu0,
                                        "dataset": info.get("dataset"), "counts": info.get("counts")}
        _write_json(ctx["state_path"], state)
    return load_from_disk(str(out / "dataset"))


def _repair_cache(ctx, kept):
    from kd_plugins.integrations.teacher_cache import TeacherCache, cache_teacher
    from kd_plugins.recipes.repair import repair_layers

    args, state = ctx["args"], ctx["state"]
    layers = repair_layers(kept, ctx["teacher_layers"])
    path = ctx["work_dir"] / f"repair-cache-{state['signature']}"
    if (path / "manifest.json").is_file() and "repair_cache" in state["oneoff"]:
        return TeacherCache(path, tokenizer=ctx["tokenizer"], layers=layers)
    cpu0 = time.process_time()
    cache = cache_teacher(ctx["teacher"], ctx["tokenizer"], ctx["train_blocks"][: args.repair_cache_blocks], path,
                          k=8, layers=layers, progress=True)
    state["oneoff"]["repair_cache"] = {"cpu_s": time.process_time() - cpu0, "blocks": args.repair_cache_blocks,
                                       "layers": layers}
    _write_json(ctx["state_path"], state)
    return cache


def _validation(student, blocks, teacher, evaluate_lm) -> dict:
    metrics = evaluate_lm(student, blocks, teacher=teacher)
    return {k: v for k, v in metrics.items() if not k.startswith("teacher_")}


def _suite(student, reference, clock, label: str) -> dict:
    from kd_plugins.recipes.retention import run_suite

    clock.say(f"{label}: retention suite")
    report = run_suite(student, reference, progress=False)
    s = report["summary"]
    clock.say(f"{label}: in-domain top-1 retention {_pct(s['in_domain_top1'])}, out-of-domain "
              f"{_pct(s['out_of_domain_top1'])}, tasks above chance {_pct(s['tasks_acc_above_chance'])}")
    return report


# --- results --------------------------------------------------------------------------------------------------


def _report(out_dir: Path, records: list[dict], setup: dict, state: dict, signature: str, quiet: bool = False) -> dict:
    columns = _module("retention_rows")._COLUMNS
    rows_info = load_rows()
    current = [r for r in records if r.get("signature") == signature and r.get("suite")]
    table: dict[str, dict] = {}
    for name in ROW_ORDER:
        scored = [r for r in current if r["row"] == name]
        if not scored:
            continue
        lr = scored[0]["lr"]
        validation = {str(r["lr"]): r["validation"]["accuracy"] for r in records
                      if r.get("signature") == signature and r["row"] == name and r.get("validation")
                      and r.get("phase") == "select"}
        table[name] = {
            "description": rows_info[name]["description"], "lr": lr, "seeds": [r["seed"] for r in scored],
            "validation_top1_by_lr": validation,
            "steps": _stats([r["train"]["steps"] for r in scored]),
            "train_cpu_s": _stats([r["train"]["cpu_s"] for r in scored]),
            "capped": sum(bool(r["train"].get("capped")) for r in scored),
            "metrics": {header: _stats([fn(r["suite"]) for r in scored]) for header, fn in columns},
            "score": _stats([suite_score(r["suite"]) for r in scored]),
        }
    lines = ["| row | LR (validation) | seeds | steps | train CPU-s | suite score | " + " | ".join(h for h, _ in columns)
             + " |", "|---|---|---:|---:|---:|---:|" + "|".join("---:" for _ in columns) + "|"]
    for name, t in table.items():
        lr = "–" if t["lr"] is None else f"{t['lr']:g} (" + ", ".join(
            f"{float(k):g}: {v:.1%}" for k, v in sorted(t["validation_top1_by_lr"].items(), key=lambda kv: -float(kv[0]))) + ")"
        cells = [_cell(t["metrics"][h]) for h, _ in columns]
        lines.append(f"| {name} | {lr} | {len(t['seeds']) if t['seeds'] != [None] else '–'} | "
                     f"{_num(t['steps']['mean'])} | {_num(t['train_cpu_s']['mean'])} | {_cell(t['score'])} | "
                     + " | ".join(cells) + " |")
    oneoff = state.get("oneoff", {})
    notes = [f"Budget {setup.get('budget_cpu_s'):g} training CPU-seconds per run (stage 1 included), "
             f"{setup.get('threads')} threads; LRs {setup.get('lrs')} chosen on {setup.get('validation_blocks')} "
             f"validation blocks of the training split (seed {setup.get('seeds', [None])[0]}); seeds "
             f"{setup.get('seeds')}; cells are mean ± sample standard deviation over seeds.",
             "One-off artefacts, not charged to a row: " + (", ".join(
                 f"{k} {v['cpu_s']:.0f} CPU-s" for k, v in oneoff.items()) or "none") + "; probe per row: " + (", ".join(
                 f"{k} {v['probe_cpu_per_step']:.2f} CPU-s/step" for k, v in state.get("plans", {}).items()) or "none")
             + "."]
    ranking = rank_rows(table)
    if ranking:
        notes.append(ranking["sentence"])
    summary = {"rows": table, "ranking": ranking, "setup": setup, "state": state, "signature": signature,
               "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    plot = _plot(table, out_dir) if table else None
    text = ["# Equal-compute ablation", "", *notes, "", "\n".join(lines), ""]
    for name, t in table.items():
        text.append(f"- **{name}**: {t['description']}" + (f"; {t['capped']} run(s) stopped by the budget before "
                                                          "their planned steps" if t["capped"] else ""))
    if plot:
        text += ["", f"![retention per row]({plot})", ""]
    _write_json(out_dir / "equal_compute.json", summary)
    (out_dir / "equal_compute.md").write_text("\n".join(text) + "\n")
    if not quiet:
        print("\n" + "\n".join(lines), flush=True)
    return summary


def suite_score(report: dict) -> float | None:
    """The rule that ranks the rows, fixed before any run: the mean of the suite's three retention figures --
    in-domain top-1, out-of-domain top-1 (Wikipedia and dialog) and task accuracy above chance -- so two thirds of
    the score is text and tasks no run trains on. None when one of them is missing (e.g. ``--tasks none``)."""
    s = report["summary"]
    parts = [s.get("in_domain_top1"), s.get("out_of_domain_top1"), s.get("tasks_acc_above_chance")]
    if any(p is None or not math.isfinite(p) for p in parts):
        return None
    return statistics.fmean(parts)


def rank_rows(table: dict) -> dict | None:
    """The trained rows ordered by mean suite score; the best row, the runner-up and whether the gap exceeds the
    seeds' spread (the larger of the two rows' sample standard deviations)."""
    scored = [(name, t["score"]) for name, t in table.items() if t["lr"] is not None and t["score"]["mean"] is not None]
    if not scored:
        return None
    scored.sort(key=lambda item: -item[1]["mean"])
    order = [name for name, _ in scored]
    best, stats = scored[0]
    out = {"order": order, "best": best, "best_score": stats["mean"], "runner_up": None, "gap": None,
           "spread": None, "separated": None}
    sentence = f"Best row by the suite score (mean of in-domain, out-of-domain and task retention): **{best}** " \
               f"({_cell(stats)})"
    if len(scored) > 1:
        second, other = scored[1]
        spreads = [x["std"] for x in (stats, other) if x["std"] is not None]
        spread = max(spreads) if spreads else None
        gap = stats["mean"] - other["mean"]
        out.update(runner_up=second, gap=gap, spread=spread, separated=None if spread is None else gap > spread)
        sentence += f", ahead of {second} ({_cell(other)}) by {gap:.1%}"
        if spread is not None:
            sentence += (" -- more than" if gap > spread else " -- within") + f" the seeds' spread ({spread:.1%})"
    out["sentence"] = sentence + ". Order: " + " > ".join(order) + "."
    return out


def _plot(table: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = ["in-domain top-1 ret.", "Wikipedia top-1 ret.", "dialog top-1 ret.", "tasks ret. above chance"]
    names = list(table)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names) + 3), 4.5), dpi=100)
    for i, label in enumerate(series):
        means = [table[n]["metrics"][label]["mean"] for n in names]
        stds = [table[n]["metrics"][label]["std"] for n in names]
        ax.bar([k + (i - (len(series) - 1) / 2) * width for k in range(len(names))],
               [100 * m if m is not None else 0.0 for m in means], width, label=label,
               yerr=[100 * s if s is not None else 0.0 for s in stds], capsize=2)
    ax.axhline(92.3, color="tab:red", linestyle="--", label="target 92.3 %")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("retention, % of teacher")
    ax.set_title("retention suite per recipe at equal training CPU-seconds (mean ± std over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "equal_compute.png")
    plt.close(fig)
    return "equal_compute.png"


# --- helpers --------------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    problems = []
    if not args.budget_cpu_s > 0:
        problems.append(f"--budget-cpu-s={args.budget_cpu_s!r}: expected > 0")
    if not args.lrs or any(not lr > 0 for lr in args.lrs) or len(set(args.lrs)) != len(args.lrs):
        problems.append(f"--lrs={args.lrs!r}: expected distinct learning rates > 0")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds={args.seeds!r}: expected distinct seeds")
    if not 0 <= args.repair_share < 1:
        problems.append(f"--repair-share={args.repair_share!r}: expected 0 <= share < 1")
    if args.probe_steps < PROBE_WARMUP + 2:
        problems.append(f"--probe-steps={args.probe_steps!r}: expected >= {PROBE_WARMUP + 2} (the first "
                        f"{PROBE_WARMUP} steps are not timed)")
    if problems:
        raise SystemExit("benchmarks/equal_compute.py: " + "; ".join(problems))


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_equal_compute_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state_file(work_dir: Path, signature: str, name: str, lr: float, seed: int) -> Path:
    path = work_dir / "states" / f"{name}-{lr:g}-seed{seed}-{signature}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _stats(values) -> dict:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None, "n": len(finite)}


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.1%}" + (f" ± {stats['std']:.1%}" if stats["std"] is not None else "")


def _num(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def _pct(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _load(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
