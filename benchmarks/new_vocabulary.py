"""A SmolLM2 student with its own smaller vocabulary, distilled across tokenizers, beside the same-vocabulary student,
scored in bits per character in-domain and out of domain over several seeds. One command, resumable::

    python benchmarks/new_vocabulary.py                       # 60 steps, seeds 0 1 2, three domains
    python benchmarks/new_vocabulary.py --steps 150 --seeds 0 --out /tmp/nv

Both students keep the same teacher blocks (``block_influence`` on teacher-token calibration blocks) and train the
same number of steps of ``--batch-size`` x ``--block-size`` tokens of their own tokenizer on the pydoc training
documents with ``ce_weight: 1``:

* the same-vocabulary student (the main job's setup: the teacher's embedding, frozen, ``forward_kl``);
* the new-vocabulary student: a BPE tokenizer of ``--vocab-size`` tokens trained on the training documents with the
  teacher's pipeline, embeddings initialised from the teacher's rows of each token's string (trained), distilled with
  ``cross_tokenizer: true`` and ``cross_vocab_kd`` (forward KL on the shared sub-vocabulary + ULD on the rest).

**Scores.** Bits per character (:func:`kd_plugins.recipes.new_vocabulary.bits_per_character`) is a score two
tokenizers share, so it is the retention measure here: on each domain of the retention suite -- the held-out pydoc
documents (in-domain) and the evaluation-only Wikipedia and dialog corpora (out of domain) -- the first
``--eval-chars`` characters in 1,000-character pieces. **bits/char retention** = teacher bits/char / student
bits/char (1 = as good as the teacher). The teacher and both students before KD are scored once; each distilled
student once per seed; cells are mean ± sample standard deviation over seeds. Characters of training text seen
are reported too: at equal steps the two tokenizers cover different amounts of text.

Outputs in ``--out``: ``results.json`` (settings, the one-off rows and one record per finished run, rewritten after
each run; a rerun with the same settings skips finished runs) and ``results.md`` (the table).
Tests inject a tiny teacher and corpus through :func:`run`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
KD_SAME = {"ce_weight": 1.0, "terms": [{"name": "forward_kl", "weight": 1.0}]}
KD_NEW = {"ce_weight": 1.0, "cross_tokenizer": True,
          "terms": [{"name": "cross_vocab_kd", "weight": 1.0, "loss": "forward_kl", "uld_weight": 0.5}]}
DOMAINS = ("pydoc_heldout", "wikipedia", "dialog")
STUDENTS = ("same vocabulary", "new vocabulary")

__all__ = ["DOMAINS", "KD_NEW", "KD_SAME", "build_parser", "main", "run", "summarize"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/new_vocabulary.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    p.add_argument("--eval-chars", type=int, default=10000, help="characters scored per domain (bits per char)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall cap per training run (0: none)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "new-vocabulary")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    summary = run(build_parser().parse_args(argv))
    print(_table(summary))
    return 0


def run(args: argparse.Namespace, *, load_models: Callable[[], tuple[Any, Any]] | None = None,
        load_corpus: Callable[[], tuple[list[str], list[str]]] | None = None,
        load_domain: Callable[[str], list[str]] | None = None) -> dict:
    """Run (or resume) the comparison for parsed ``args``; returns the summary also written to ``results.json``.

    ``load_models() -> (teacher, tokenizer)``, ``load_corpus() -> (train_docs, heldout_docs)`` and
    ``load_domain(name) -> docs`` (the out-of-domain corpora) replace SmolLM2 and the packaged text in tests.
    """
    if not args.seeds or args.steps < 1:
        raise ValueError(f"--seeds {args.seeds} --steps {args.steps}: need at least one seed and one step")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, load_models, load_corpus, load_domain)
    finally:
        torch.set_num_threads(threads)


def _run(args, load_models, load_corpus, load_domain) -> dict:
    from kd_plugins.recipes.data import load_corpus as corpus, load_eval_corpus, split_corpus, token_blocks
    from kd_plugins.recipes.new_vocabulary import derive_new_vocabulary_student, train_student_tokenizer
    from kd_plugins.recipes.student import count_parameters, derive_student
    from kd_plugins.recipes.training import Clock

    clock = Clock("new vocabulary", minutes=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if load_models is None:
        from kd_plugins.recipes.smollm2 import load_smollm2

        teacher, teacher_tok = load_smollm2(torch.float32)
    else:
        teacher, teacher_tok = load_models()
    teacher.requires_grad_(False).eval()
    train_docs, heldout_docs = (load_corpus or (lambda: split_corpus(corpus(), heldout_fraction=0.1, seed=0)))()
    texts = {name: _pieces(heldout_docs if name == "pydoc_heldout" else (load_domain or load_eval_corpus)(name),
                           args.eval_chars) for name in args.domains}
    clock.say(f"{len(train_docs)} training docs; scoring " + ", ".join(
        f"{name} {sum(map(len, pieces))} chars" for name, pieces in texts.items()))

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("seeds", "out", "max_minutes", "threads")}
    signature = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    results = saved if saved.get("signature") == signature else {"signature": signature, "settings": settings,
                                                                 "static": {}, "runs": []}

    clock.say(f"training a {args.vocab_size}-token BPE tokenizer on the training documents")
    student_tok = train_student_tokenizer(teacher_tok, train_docs, args.vocab_size)
    calibration = torch.tensor(token_blocks(train_docs, teacher_tok, block_size=args.block_size)[:8])
    same, kept = derive_student(teacher, num_layers=args.student_layers, strategy="block_influence",
                                calibration=calibration)
    new, kept_new = derive_new_vocabulary_student(teacher, teacher_tok, student_tok, keep_layers=kept)
    if kept_new != kept:
        raise RuntimeError(f"the new-vocabulary student kept blocks {kept_new}, the same-vocabulary one {kept}")
    base = {"same vocabulary": (same, teacher_tok, KD_SAME), "new vocabulary": (new, student_tok, KD_NEW)}
    results["kept_layers"] = kept
    teacher_counts = count_parameters(teacher)

    def describe(model, tokenizer) -> dict:
        counts = count_parameters(model)
        return {"vocab": len(tokenizer), "params_total_m": round(counts["total"] / 1e6, 2),
                "params_non_embedding_m": round(counts["non_embedding"] / 1e6, 2),
                "total_reduction": round(1 - counts["total"] / teacher_counts["total"], 4),
                "non_embedding_reduction": round(1 - counts["non_embedding"] / teacher_counts["non_embedding"], 4)}

    for name, model, tokenizer in (("teacher", teacher, teacher_tok), ("same vocabulary, before KD", same, teacher_tok),
                                   ("new vocabulary, before KD", new, student_tok)):
        if name not in results["static"]:
            results["static"][name] = {**describe(model, tokenizer), "bits_per_char": _score(model, tokenizer, texts)}
            clock.say(f"{name}: " + _bpc_line(results["static"][name]["bits_per_char"]))
            _write(path, results)

    blocks: dict[str, tuple[list, float]] = {}  # per student: its training blocks, mean characters per block

    def training_blocks(student: str, tokenizer) -> tuple[list, float]:
        if student not in blocks:
            rows = token_blocks(train_docs, tokenizer, block_size=args.block_size)
            blocks[student] = rows, sum(len(tokenizer.decode(b)) for b in rows) / max(len(rows), 1)
        return blocks[student]

    for seed in args.seeds:
        for student in STUDENTS:
            if any(r["student"] == student and r["seed"] == seed for r in results["runs"]):
                continue
            model, tokenizer, kd = base[student]
            model = copy.deepcopy(model)
            clock.say(f"=== {student}, seed {seed}: {args.steps} steps x {args.batch_size} x {args.block_size} "
                      f"tokens ===")
            record = {"student": student, "seed": seed, **describe(model, tokenizer),
                      **_train(model, tokenizer, kd, teacher, teacher_tok, *training_blocks(student, tokenizer), args,
                                 seed, out, clock, freeze_embedding=student == "same vocabulary")}
            record["bits_per_char"] = _score(model, tokenizer, texts)
            record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            clock.say(f"{student}, seed {seed}: {record['steps']} steps in {record['train_cpu_seconds']:.0f} CPU-s; "
                      + _bpc_line(record["bits_per_char"]))
            results["runs"].append(record)
            _write(path, results)
            del model

    results["summary"] = summarize(results)
    _write(path, results)
    (out / "results.md").write_text(_table(results))
    clock.say(f"wrote {out / 'results.md'}")
    return results


def summarize(results: dict) -> dict:
    """Per student: mean and sample standard deviation over seeds of bits/char and bits/char retention (teacher
    bits/char / student bits/char) per domain, of training CPU-seconds and of training characters seen."""
    teacher = results["static"]["teacher"]["bits_per_char"]
    summary = {}
    for student in STUDENTS:
        runs = [r for r in results["runs"] if r["student"] == student]
        if not runs:
            continue
        row: dict[str, Any] = {"seeds": sorted(r["seed"] for r in runs)}
        for domain in teacher:
            row[f"bpc/{domain}"] = _stats([r["bits_per_char"][domain] for r in runs])
            row[f"retention/{domain}"] = _stats([teacher[domain] / r["bits_per_char"][domain] for r in runs])
        for key in ("train_cpu_seconds", "train_chars", "steps"):
            row[key] = _stats([r[key] for r in runs])
        summary[student] = row
    return summary


# --- one run ----------------------------------------------------------------------------------------------------


def _train(model, tokenizer, kd: dict, teacher, teacher_tok, blocks: list, chars_per_block: float, args, seed: int,
           out: Path, clock, *, freeze_embedding: bool) -> dict:
    from transformers import set_seed

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import lm_dataset
    from kd_plugins.recipes.training import sft_config, time_limit_callback

    set_seed(seed)
    if freeze_embedding:
        model.get_input_embeddings().weight.requires_grad_(False)  # as the main job: tied embedding / head frozen
    sft = sft_config(str(out / "trainer"), steps=args.steps, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, block_size=args.block_size, seed=seed)
    trainer = KDSFTTrainer(model=model, args=sft, train_dataset=lm_dataset(blocks), processing_class=tokenizer,
                           teacher=teacher, teacher_tokenizer=teacher_tok, kd_config=load_kd_config(kd),
                           callbacks=[time_limit_callback(args.max_minutes, say=clock.say)])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    logs = [log for log in trainer.state.log_history if "kd/transfer" in log]
    steps = trainer.state.global_step
    # characters covered by the blocks the run consumed (the sampler shuffles; the mean block length is used)
    return {"steps": steps, "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
            "train_chars": round(steps * args.batch_size * chars_per_block),
            "transfer_first": logs[0]["kd/transfer"] if logs else None,
            "transfer_last": logs[-1]["kd/transfer"] if logs else None}


def _score(model, tokenizer, texts: dict[str, list[str]]) -> dict[str, float]:
    from kd_plugins.recipes.new_vocabulary import bits_per_character

    return {name: round(bits_per_character(model, tokenizer, pieces)["bits_per_char"], 5)
            for name, pieces in texts.items()}


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


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _bpc_line(bpc: dict) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in bpc.items()) + " bits/char"


def _cell(stats: dict, fmt: str) -> str:
    text = format(stats["mean"], fmt)
    return text if stats["sd"] is None else f"{text} ± {format(stats['sd'], fmt)}"


def _table(results: dict) -> str:
    domains = list(results["static"]["teacher"]["bits_per_char"])
    summary = results.get("summary") or summarize(results)
    head = ("| model | vocab | params (M) | non-emb. (M) | total red. | non-emb. red. | "
            + " | ".join(f"{d} bits/char (ret.)" for d in domains) + " | steps | train CPU-s | train chars |")
    lines = [head, "|" + "---|" * (9 + len(domains))]
    teacher = results["static"]["teacher"]["bits_per_char"]
    for name, row in results["static"].items():
        cells = [f"{row['bits_per_char'][d]:.3f} ({teacher[d] / row['bits_per_char'][d]:.1%})" for d in domains]
        lines.append(f"| {name} | {row['vocab']} | {row['params_total_m']:.1f} | {row['params_non_embedding_m']:.1f} | "
                     f"{row['total_reduction']:.1%} | {row['non_embedding_reduction']:.1%} | " + " | ".join(cells)
                     + " | | | |")
    for student, row in summary.items():
        one = next(r for r in results["runs"] if r["student"] == student)
        cells = [f"{_cell(row[f'bpc/{d}'], '.3f')} ({_cell(row[f'retention/{d}'], '.1%')})" for d in domains]
        lines.append(f"| {student}, distilled (seeds {', '.join(map(str, row['seeds']))}) | {one['vocab']} | "
                     f"{one['params_total_m']:.1f} | {one['params_non_embedding_m']:.1f} | {one['total_reduction']:.1%} | "
                     f"{one['non_embedding_reduction']:.1%} | " + " | ".join(cells) + f" | {row['steps']['mean']:.0f} | "
                     f"{_cell(row['train_cpu_seconds'], '.0f')} | {row['train_chars']['mean']:,.0f} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
