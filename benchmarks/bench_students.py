"""Depth-only, width-only and mixed students of SmolLM2-135M-Instruct at the same >= 78 % non-embedding reduction.

Every student is derived from the offline teacher (``kd_plugins.recipes.student.derive_student``) with the same
calibration blocks (the first training blocks of the main job's corpus, pydoc topics), and scored before any
training on the held-out documents with :func:`kd_plugins.recipes.evaluation.evaluate_lm` (next-token top-1,
perplexity, top-1 agreement with the teacher). The teacher has 106.2 M non-embedding parameters; a 78 %
reduction leaves at most 23.4 M.

Usage::

    python benchmarks/bench_students.py                      # JSON + Markdown in benchmarks/results/
    python benchmarks/bench_students.py --students depth6 mixed12 --eval-blocks 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# name -> derive_student keyword arguments (num_layers / strategy / width sizes)
STUDENTS = {
    "depth6": dict(num_layers=6, strategy="block_influence"),
    "width_h3_mlp256": dict(strategy="width", num_heads=3, num_kv_heads=1, intermediate_size=256),
    "width_emb384_mlp320": dict(strategy="width", hidden_size=384, num_heads=6, num_kv_heads=2, intermediate_size=320),
    "mixed10_mlp768": dict(num_layers=10, strategy="mixed", intermediate_size=768),
    "mixed12_h6_mlp768": dict(num_layers=12, strategy="mixed", num_heads=6, num_kv_heads=2, intermediate_size=768),
    "mixed15_h6_mlp512": dict(num_layers=15, strategy="mixed", num_heads=6, num_kv_heads=2, intermediate_size=512),
    "mixed20_h3_mlp480": dict(num_layers=20, strategy="mixed", num_heads=3, num_kv_heads=1, intermediate_size=480),
}
TARGET_REDUCTION = 0.78


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="*", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--calibration-blocks", type=int, default=16, help="training blocks for importance")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks of 128 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_students.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks
    from kd_plugins.recipes.evaluation import evaluate_lm, markdown_table
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import count_parameters, derive_student

    teacher, tokenizer = load_smollm2(torch.float32)
    teacher.requires_grad_(False)
    train_docs, heldout_docs = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    calibration = torch.tensor(token_blocks(train_docs, tokenizer, 128, max_blocks=args.calibration_blocks))
    heldout = token_blocks(heldout_docs, tokenizer, 128, max_blocks=args.eval_blocks)
    t_params = count_parameters(teacher)
    rows, results = {}, {}
    teacher_metrics = None
    for name in args.students:
        start = time.process_time()
        student, kept = derive_student(teacher, calibration=calibration, **STUDENTS[name])
        derive_cpu = time.process_time() - start
        params = count_parameters(student)
        reduction = 1 - params["non_embedding"] / t_params["non_embedding"]
        metrics = evaluate_lm(student, heldout, teacher=teacher)
        if teacher_metrics is None:
            teacher_metrics = {k[len("teacher_"):]: v for k, v in metrics.items() if k.startswith("teacher_")}
        c = student.config
        results[name] = {
            "derive_args": STUDENTS[name], "kept_layers": kept, "parameters": params, "reduction": reduction,
            "shape": dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                          kv_heads=c.num_key_value_heads, intermediate=c.intermediate_size),
            "derive_cpu_s": derive_cpu,
            **{k: v for k, v in metrics.items() if not k.startswith("teacher_")},
        }
        rows[name] = {"layers": c.num_hidden_layers, "hidden": c.hidden_size,
                      "heads": f"{c.num_attention_heads}/{c.num_key_value_heads}", "mlp": c.intermediate_size,
                      "non_emb_m": params["non_embedding"] / 1e6, "reduction": reduction, **metrics}
        print(f"{name}: {params['non_embedding'] / 1e6:.2f}M non-embedding ({reduction:.1%} fewer), top-1 "
              f"{metrics['accuracy']:.1%}, ppl {metrics['perplexity']:.1f}, agreement {metrics['agreement']:.1%}",
              flush=True)
        del student
    rows = {"teacher": {"layers": 30, "hidden": 576, "heads": "9/3", "mlp": 1536,
                        "non_emb_m": t_params["non_embedding"] / 1e6, "reduction": 0.0, **teacher_metrics,
                        "agreement": 1.0},
            **rows}
    columns = [("layers", "blocks", "d"), ("hidden", "width", "d"), ("heads", "heads q/kv", "s"),
               ("mlp", "MLP", "d"), ("non_emb_m", "non-emb params (M)", ".2f"), ("reduction", "reduction", ".1%"),
               ("accuracy", "top-1", ".2%"), ("perplexity", "ppl", ".1f"), ("agreement", "agree w/ teacher", ".1%")]
    table = markdown_table(rows, columns)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"teacher": {**teacher_metrics, "parameters": t_params}, "students": results,
                               "heldout_tokens": teacher_metrics and results[args.students[0]]["tokens"],
                               "calibration_blocks": args.calibration_blocks}, indent=2))
    out.with_suffix(".md").write_text(
        "# Students of SmolLM2-135M-Instruct before any training\n\n" + table +
        f"\n\nHeld-out pydoc blocks: {args.eval_blocks} x 128 tokens; importance and block choice from "
        f"{args.calibration_blocks} training blocks. Command: `python benchmarks/bench_students.py`.\n")
    short = [n for n, r in results.items() if r["reduction"] < TARGET_REDUCTION]
    if short:
        print(f"note: {short} are below the {TARGET_REDUCTION:.0%} reduction target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
