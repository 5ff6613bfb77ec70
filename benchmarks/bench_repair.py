"""Cross-depth repair on SmolLM2-135M-Instruct, then the logit stage: what survives the hand-over.

1. Derive the main job's student (6 of 30 blocks, ``block_influence``, 8 calibration blocks).
2. Cache the teacher on the first ``--cache-blocks`` training blocks with the layers repair reads
   (:func:`kd_plugins.recipes.repair.repair_layers`), bf16 hidden states.
3. Repair the student block by block (:func:`~kd_plugins.recipes.repair.repair_student`), per ``--repair-loss``;
   report each block's held-out relative error before/after and the student's held-out top-1 / perplexity.
4. Train the logit stage exactly like the main job (``KDSFTTrainer``, live teacher, 150 steps x 4 x 128 tokens,
   AdamW, cosine schedule with linear warm-up, clipping at 1.0, embeddings frozen) for every variant in
   ``VARIANTS``: with or without repair, learning rate, warm-up, KD config (the main job's forward KL + CE, or the
   ``curriculum`` hand-over from the repair's alignment pairs). Every step's gradient norm is logged, so a spike
   shows.

Scores are next-token top-1 and perplexity on the main job's held-out blocks (``evaluate_lm``; retention = student
top-1 / teacher top-1). Results go to ``--out`` (JSON, written after every variant; a rerun skips the variants
already there) and a Markdown table beside it.

Usage::

    python benchmarks/bench_repair.py                                   # all variants
    python benchmarks/bench_repair.py --variants default repair_2e-3 --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_KD = {"ce_weight": 1.0, "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 1.0}],
              "scheduler": {"name": "constant"}}


def _curriculum(mode: str, alignment: str = "mse", weight: float = 1.0, handover: int = 75, **extra) -> dict:
    return {"ce_weight": 1.0,
            "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 1.0},
                      {"name": alignment, "weight": weight, "layers": "kept", "projector": "identity"}],
            "scheduler": {"name": "curriculum", "alignment": [alignment], "handover_steps": handover, "mode": mode,
                          **extra}}


# name -> (repair?, peak learning rate, warm-up ratio, KD config: a dict, or "curriculum_<mode>")
VARIANTS = {
    "default_2e-3": (False, 2e-3, 0.1, DEFAULT_KD),
    "default_5e-4": (False, 5e-4, 0.1, DEFAULT_KD),
    "repair_2e-3": (True, 2e-3, 0.1, DEFAULT_KD),
    "repair_5e-4": (True, 5e-4, 0.1, DEFAULT_KD),
    "repair_2e-3_warmup30": (True, 2e-3, 0.3, DEFAULT_KD),
    "repair_curriculum_fixed_2e-3": (True, 2e-3, 0.1, "curriculum_fixed"),
    "repair_curriculum_gradient_2e-3": (True, 2e-3, 0.1, "curriculum_gradient"),
    "repair_curriculum_fixed_1e-3": (True, 1e-3, 0.1, "curriculum_fixed"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=150, help="logit-stage steps (main job: 150)")
    parser.add_argument("--repair-steps", type=int, default=300, help="repair steps per block")
    parser.add_argument("--repair-lr", type=float, default=1e-3)
    parser.add_argument("--repair-loss", default="mse", choices=("mse", "cosine", "contrastive"))
    parser.add_argument("--repair-batch", type=int, default=8)
    parser.add_argument("--cache-blocks", type=int, default=256)
    parser.add_argument("--alignment", default="mse", choices=("mse", "cosine"),
                        help="alignment term of the curriculum variants (at the kept pairs, identity projector)")
    parser.add_argument("--alignment-weight", type=float, default=None,
                        help="its base weight (default: 1 / the repaired blocks' mean held-out loss, i.e. ~1 at the "
                             "start of the hand-over)")
    parser.add_argument("--handover-steps", type=int, default=75)
    parser.add_argument("--eval-blocks", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_repair.json")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "kd_bench_repair"),
                        help="teacher cache, repair checkpoints and trainer scratch (reused by a rerun)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    from transformers import set_seed

    from kd_plugins.integrations.teacher_cache import TeacherCache, cache_teacher
    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks
    from kd_plugins.recipes.evaluation import evaluate_lm, markdown_table
    from kd_plugins.recipes.repair import RepairConfig, repair_layers, repair_student
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import derive_student
    from kd_plugins.recipes.training import Clock, resolve_kd_config, sft_config

    clock = Clock("bench_repair")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    set_seed(0)
    teacher, tokenizer = load_smollm2(torch.float32)
    teacher.requires_grad_(False)
    train_docs, heldout_docs = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    train_blocks = token_blocks(train_docs, tokenizer, block_size=128)
    heldout = token_blocks(heldout_docs, tokenizer, block_size=128, max_blocks=args.eval_blocks)
    student, kept = derive_student(teacher, num_layers=6, strategy="block_influence",
                                   calibration=torch.tensor(train_blocks[:8]))
    if "teacher" not in results:
        metrics = evaluate_lm(student, heldout, teacher=teacher)
        results["teacher"] = {k[len("teacher_"):]: v for k, v in metrics.items() if k.startswith("teacher_")}
        results["derived"] = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
    teacher_top1 = results["teacher"]["accuracy"]
    clock.say(f"kept {kept}; derived student top-1 {results['derived']['accuracy']:.2%}, "
              f"ppl {results['derived']['perplexity']:.0f}")

    repaired = copy.deepcopy(student)
    work = Path(args.work_dir)
    layers = repair_layers(kept, 30)
    cache_dir = work / f"cache-{args.cache_blocks}"
    cpu = time.process_time()
    if (cache_dir / "manifest.json").is_file():
        cache = TeacherCache(cache_dir, tokenizer=tokenizer, layers=layers)
    else:
        cache = cache_teacher(teacher, tokenizer, train_blocks[: args.cache_blocks], cache_dir, k=8, layers=layers,
                              progress=True)
    cache_cpu = time.process_time() - cpu
    config = RepairConfig(loss=args.repair_loss, steps=args.repair_steps, learning_rate=args.repair_lr,
                          batch_size=args.repair_batch)
    cpu = time.process_time()
    reports = repair_student(repaired, cache, config, checkpoint_dir=work / f"repair-{args.repair_loss}-"
                             f"{args.repair_steps}-{args.repair_lr:g}-{args.cache_blocks}")
    repair_cpu = time.process_time() - cpu
    after = evaluate_lm(repaired, heldout)
    previous = results.get("repair", {})
    if previous.get("blocks") and previous.get("loss") == args.repair_loss:
        cache_cpu, repair_cpu = previous["cache_cpu_s"], previous["repair_cpu_s"]  # measured by the first run
    results["repair"] = {
        "loss": args.repair_loss, "steps": args.repair_steps, "lr": args.repair_lr, "cache_blocks": args.cache_blocks,
        "layers": layers, "cache_cpu_s": cache_cpu, "repair_cpu_s": repair_cpu,
        "blocks": [{k: v for k, v in vars(r).items() if k != "losses"} for r in reports],
        "student": after,
    }
    clock.say(f"repaired blocks {[r.block for r in reports]}: top-1 {after['accuracy']:.2%}, ppl "
              f"{after['perplexity']:.0f} ({repair_cpu:.0f} CPU-s repair, {cache_cpu:.0f} CPU-s cache)")
    mean_loss = sum(r.loss_after for r in reports) / len(reports)
    weight = args.alignment_weight or (1.0 / mean_loss if args.alignment == args.repair_loss else 1.0)
    results["alignment_weight"] = weight
    out.write_text(json.dumps(results, indent=2))

    train_data = lm_dataset(train_blocks)
    for name in args.variants:
        if name in results.get("variants", {}):
            continue
        use_repair, lr, warmup, kd = VARIANTS[name]
        if isinstance(kd, str):
            kd = _curriculum(kd.split("_")[1], alignment=args.alignment, weight=weight, handover=args.handover_steps)
        model = copy.deepcopy(repaired if use_repair else student)
        model.get_input_embeddings().weight.requires_grad_(False)
        set_seed(0)
        kd_config = load_kd_config(resolve_kd_config(kd, kept, 30))
        sft_args = sft_config(str(work / "trainer"), steps=args.steps, batch_size=4, learning_rate=lr,
                              block_size=128, warmup_ratio=warmup, seed=0, logging_steps=1, progress_bar=True)
        trainer = KDSFTTrainer(model=model, args=sft_args, train_dataset=train_data, processing_class=tokenizer,
                               teacher=teacher, kd_config=kd_config)
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.train()
        train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
        metrics = evaluate_lm(trainer.model, heldout)
        logs = [r for r in trainer.state.log_history if "grad_norm" in r]
        norms = [float(r["grad_norm"]) for r in logs]
        peak = max(range(len(norms)), key=lambda i: norms[i])
        results.setdefault("variants", {})[name] = {
            "repair": use_repair, "lr": lr, "warmup_ratio": warmup, "kd": kd, **metrics,
            "retention": metrics["accuracy"] / teacher_top1, "train_cpu_s": train_cpu, "train_wall_s": train_wall,
            "grad_norm_peak": norms[peak], "grad_norm_peak_step": int(logs[peak]["step"]),
            "grad_norms": norms, "losses": [float(r.get("loss", float("nan"))) for r in logs],
            "weights": [{k: v for k, v in r.items() if k.startswith("kd/weight/")} for r in logs][:: 10],
        }
        clock.say(f"{name}: top-1 {metrics['accuracy']:.2%} (retention {metrics['accuracy'] / teacher_top1:.1%}), "
                  f"ppl {metrics['perplexity']:.1f}, peak grad norm {norms[peak]:.0f} at step {logs[peak]['step']}")
        out.write_text(json.dumps(results, indent=2))
        del trainer, model

    rows = {"teacher": {**results["teacher"], "retention": 1.0},
            "derived (no training)": {**results["derived"], "retention": results["derived"]["accuracy"] / teacher_top1},
            f"repaired ({args.repair_loss}, no logit stage)": {
                **results["repair"]["student"], "retention": results["repair"]["student"]["accuracy"] / teacher_top1}}
    for name, row in results.get("variants", {}).items():
        rows[name] = row
    columns = [("accuracy", "top-1", ".2%"), ("retention", "top-1 retention", ".1%"), ("perplexity", "ppl", ".1f"),
               ("lr", "LR", "g"), ("warmup_ratio", "warm-up", "g"), ("grad_norm_peak", "peak grad norm", ".0f"),
               ("grad_norm_peak_step", "at step", "d"), ("train_cpu_s", "train CPU-s", ".0f")]
    blocks = "\n".join(
        f"| {b['block']} | {b['input_layer']} -> {b['target_layer']} | {b['relative_error_before']:.4f} | "
        f"{b['relative_error_after']:.4f} | {b['loss_before']:.4g} | {b['loss_after']:.4g} | {b['cpu_s']:.0f} |"
        for b in results["repair"]["blocks"])
    text = ("# Repair, then the logit stage (SmolLM2-135M-Instruct -> 6 blocks)\n\n" + markdown_table(rows, columns)
            + "\n\n| block | teacher layers | rel. error before | after | loss before | after | CPU-s |\n"
            "|---|---|---:|---:|---:|---:|---:|\n" + blocks
            + f"\n\nCommand: `python benchmarks/bench_repair.py`. Kept blocks {kept}.\n")
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
