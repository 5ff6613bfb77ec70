"""A SmolLM2 student with its own smaller vocabulary, distilled across tokenizers, beside the same-vocabulary student.

One command (CPU, a few minutes per student at the defaults)::

    python benchmarks/new_vocabulary.py --steps 60 --vocab-size 16384 --out benchmarks/results/new-vocabulary

Both students keep the same teacher blocks (``block_influence`` on teacher-token calibration blocks) and train the
same number of steps on the pydoc training documents with ``ce_weight: 1``:

* the same-vocabulary student (the main job's setup: the teacher's embedding, frozen, ``forward_kl``);
* the new-vocabulary student: a BPE tokenizer of ``--vocab-size`` tokens trained on the training documents with the
  teacher's pipeline, embeddings initialised from the teacher's rows of each token's string (trained), distilled with
  ``cross_tokenizer: true`` and ``cross_vocab_kd`` (forward KL on the shared sub-vocabulary + ULD on the rest).

Both are scored in bits per character on the held-out documents (a score two tokenizers share), before and after
distillation, beside the teacher; total and non-embedding parameters are counted. Results go to ``results.json`` and
``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

KD_SAME = {"ce_weight": 1.0, "terms": [{"name": "forward_kl", "weight": 1.0}]}
KD_NEW = {"ce_weight": 1.0, "cross_tokenizer": True,
          "terms": [{"name": "cross_vocab_kd", "weight": 1.0, "loss": "forward_kl", "uld_weight": 0.5}]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--eval-chars", type=int, default=20000, help="held-out characters scored (bits per char)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="per student (0: no limit)")
    p.add_argument("--out", default="benchmarks/results/new-vocabulary")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from transformers import set_seed

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks
    from kd_plugins.recipes.new_vocabulary import (
        bits_per_character,
        derive_new_vocabulary_student,
        train_student_tokenizer,
    )
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import count_parameters, derive_student
    from kd_plugins.recipes.training import Clock, sft_config, time_limit_callback

    clock = Clock("new vocabulary")
    set_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, teacher_tok = load_smollm2(torch.float32)
    teacher.requires_grad_(False)
    train_docs, heldout_docs = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    heldout = _pieces(heldout_docs, args.eval_chars)
    clock.say(f"{len(train_docs)} training docs; scoring {sum(map(len, heldout))} held-out characters")

    clock.say(f"training a {args.vocab_size}-token BPE tokenizer on the training documents")
    student_tok = train_student_tokenizer(teacher_tok, train_docs, args.vocab_size)
    calibration = torch.tensor(token_blocks(train_docs, teacher_tok, block_size=args.block_size)[:8])
    results: dict = {"settings": vars(args), "rows": {}}

    def score(name, model, tokenizer, params, **extra):
        row = {**bits_per_character(model, tokenizer, heldout), **params, **extra}
        results["rows"][name] = row
        clock.note(f"{name}: {row['bits_per_char']:.3f} bits/char ({row['tokens']} tokens)")

    score("teacher", teacher, teacher_tok, _params(count_parameters(teacher)), vocab=len(teacher_tok))

    same, kept = derive_student(teacher, num_layers=args.student_layers, strategy="block_influence",
                                calibration=calibration)
    same.get_input_embeddings().weight.requires_grad_(False)
    new, kept_new = derive_new_vocabulary_student(teacher, teacher_tok, student_tok, keep_layers=kept)
    assert kept_new == kept
    results["kept_layers"] = kept
    score("same vocabulary, before KD", same, teacher_tok, _params(count_parameters(same)), vocab=len(teacher_tok))
    score("new vocabulary, before KD", new, student_tok, _params(count_parameters(new)), vocab=len(student_tok))

    for name, model, tokenizer, kd in (("same vocabulary", same, teacher_tok, KD_SAME),
                                       ("new vocabulary", new, student_tok, KD_NEW)):
        blocks = token_blocks(train_docs, tokenizer, block_size=args.block_size)
        clock.say(f"distilling the {name} student: {args.steps} steps x {args.batch_size} x {args.block_size} tokens")
        sft = sft_config(str(out / "trainer"), steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, block_size=args.block_size, seed=0)
        trainer = KDSFTTrainer(model=model, args=sft, train_dataset=lm_dataset(blocks), processing_class=tokenizer,
                               teacher=teacher, teacher_tokenizer=teacher_tok, kd_config=load_kd_config(kd),
                               callbacks=[time_limit_callback(args.max_minutes, say=clock.say)])
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        logs = [log for log in trainer.state.log_history if "kd/transfer" in log]
        score(f"{name}, distilled", trainer.model, tokenizer, _params(count_parameters(trainer.model)),
              vocab=len(tokenizer), steps=trainer.state.global_step, train_seconds=round(seconds, 1),
              train_cpu_seconds=round(cpu_seconds, 1),
              transfer_first=logs[0]["kd/transfer"] if logs else None,
              transfer_last=logs[-1]["kd/transfer"] if logs else None)

    teacher_params = results["rows"]["teacher"]
    for row in results["rows"].values():
        row["total_reduction"] = round(1 - row["params_total_m"] / teacher_params["params_total_m"], 4)
        row["non_embedding_reduction"] = round(
            1 - row["params_non_embedding_m"] / teacher_params["params_non_embedding_m"], 4)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(_table(results))
    print(_table(results))
    return 0


def _pieces(docs, limit: int, size: int = 1000) -> list[str]:
    pieces, total = [], 0
    for doc in docs:
        for i in range(0, len(doc), size):
            if total >= limit:
                return pieces
            piece = doc[i:i + size]
            pieces.append(piece)
            total += len(piece)
    return pieces


def _params(counts: dict) -> dict:
    return {"params_total_m": round(counts["total"] / 1e6, 2), "params_non_embedding_m":
            round(counts["non_embedding"] / 1e6, 2)}


def _table(results: dict) -> str:
    lines = ["| model | vocab | bits/char | params (M) | non-embedding (M) | total reduction | "
             "non-embedding reduction | steps | train CPU-s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {r['vocab']} | {r['bits_per_char']:.3f} | {r['params_total_m']:.1f} | "
                     f"{r['params_non_embedding_m']:.1f} | {r['total_reduction']:.1%} | "
                     f"{r['non_embedding_reduction']:.1%} | {r.get('steps', '')} | {r.get('train_cpu_seconds', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
