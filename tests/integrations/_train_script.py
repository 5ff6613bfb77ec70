"""A tiny, deterministic distillation run used by the subprocess tests (crash/resume, distributed).

    python tests/integrations/_train_script.py --out DIR [--max-steps 8] [--save-steps 2] [--resume] ...
    accelerate launch --num_processes 2 --cpu tests/integrations/_train_script.py --out DIR ...

Student: random Llama (hidden 32, 2 layers, vocab 128); teacher: random Llama (hidden 48, 3 layers), built on
every rank (replicated, never wrapped). KD: ``dkd`` + ``mse`` (a projector) + ``contrastive`` (two projectors)
with a stateful scheduler (``gradnorm`` when the dynamic schedulers exist, else ``linear``). Samples are read in
order (sequential sampler) so runs with the same global batch see the same data.

Writes, per rank ``r``:
    ``log_rank{r}.jsonl``: one JSON line per training log (flushed at once, so a killed run keeps its lines);
    ``steps_rank{r}.jsonl``: one JSON line ``{"pid", "step"}`` per optimizer step run, appended by every launch;
    ``final_rank{r}.safetensors``: ``kd.*`` (the Distiller's kd_state_dict) and ``student.*`` (student weights),
        after training finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import Dataset, SequentialSampler  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback, TrainingArguments  # noqa: E402

from kd_plugins.integrations.trl import KDTrainer  # noqa: E402
from kd_plugins.plugins import available_components  # noqa: E402

VOCAB, SEQ = 128, 16


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


class TokenRows(Dataset):
    """Right-padded rows of an arithmetic-progression "language"; ``fixed_length`` makes every row full."""

    def __init__(self, n: int, fixed_length: bool):
        g = torch.Generator().manual_seed(123)
        self.rows = []
        for _ in range(n):
            length = SEQ if fixed_length else int(torch.randint(5, SEQ + 1, (1,), generator=g))
            start, step = (int(x) for x in torch.randint(1, VOCAB, (2,), generator=g))
            ids = torch.tensor([1 + (start + k * (step % 5 + 1)) % (VOCAB - 1) for k in range(SEQ)])
            mask = torch.arange(SEQ) < length
            self.rows.append({"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(),
                              "labels": ids.masked_fill(~mask, -100)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class InOrderKDTrainer(KDTrainer):
    count_matmuls = False
    matmuls: list[int] = []

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, *args, **kwargs):
        if not self.count_matmuls:
            return super().training_step(*args, **kwargs)
        from _counting import VocabMatmuls  # a sibling file: this script's folder is on sys.path

        with VocabMatmuls(VOCAB) as count:  # forward and backward of one micro-batch
            loss = super().training_step(*args, **kwargs)
        self.matmuls = [*self.matmuls, count.total]
        return loss


class Recorder(TrainerCallback):
    def __init__(self, path: str, sleep: float, steps_path: str):
        self.path, self.sleep, self.steps_path = path, sleep, steps_path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def on_step_end(self, args, state, control, **kwargs):
        # every optimizer step this process ran, tagged with the process: tells a resume from a restart
        with open(self.steps_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": state.global_step}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.sleep:
            time.sleep(self.sleep)


def kd_config(scheduler: str, contrastive: bool = True, fuse: bool = False) -> dict:
    if scheduler == "auto":
        scheduler = "gradnorm" if "gradnorm" in available_components()["scheduler"] else "linear"
    options = {} if scheduler == "constant" else {"warmup_steps": 2}
    return {
        "ce_weight": 1.0,
        "terms": [
            {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0},
            {"name": "mse", "weight": 0.5, "layers": "uniform"},
            {"name": "contrastive", "weight": 0.3, "proj_dim": 8, "temperature": 0.2, "max_tokens": 4096},
        ][: 3 if contrastive else 2],
        "scheduler": {"name": scheduler, **options},
        "shared_params": "last_layer",
        # the host's compute_loss unless --fuse: then the student runs its backbone only (through the DDP wrapper) and
        # the CE comes from the dkd term's pass over the LM head
        "fuse_task_loss": fuse,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch")
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--fixed-length", action="store_true")
    parser.add_argument("--scheduler", default="auto")
    parser.add_argument("--no-contrastive", action="store_true",
                        help="drop the contrastive term (its in-batch negatives depend on how a batch is split)")
    parser.add_argument("--no-distiller-sync", action="store_true",
                        help="negative control: disable the integration's cross-rank averaging of Distiller grads")
    parser.add_argument("--nan-teacher-rank", type=int, default=-1,
                        help="make the teacher non-finite on this rank only (with on_nonfinite_teacher: skip)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--ddp-timeout", type=int, default=1800)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--fuse", action="store_true", help="fuse_task_loss: true (default here: false)")
    parser.add_argument("--count-matmuls", action="store_true",
                        help="write the LM-head-sized matmuls of every micro-batch to matmuls_rank{r}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.no_distiller_sync:
        from kd_plugins.integrations.transformers import DistillationCallback

        DistillationCallback.average_gradients = lambda self: None
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48, layers=3)
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.ga, learning_rate=5e-3, lr_scheduler_type="constant", optim="adamw_torch",
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        disable_tqdm=True, max_grad_norm=args.max_grad_norm, ddp_timeout=args.ddp_timeout, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    config = kd_config(args.scheduler, not args.no_contrastive, args.fuse)
    if args.nan_teacher_rank == training_args.process_index:
        with torch.no_grad():
            teacher.model.embed_tokens.weight.fill_(float("nan"))
    if args.nan_teacher_rank >= 0:
        config["on_nonfinite_teacher"] = "skip"
    trainer = InOrderKDTrainer(model=student, args=training_args,
                               train_dataset=TokenRows(args.rows, args.fixed_length), teacher=teacher,
                               kd_config=config)
    rank = training_args.process_index
    trainer.add_callback(Recorder(os.path.join(args.out, f"log_rank{rank}.jsonl"), args.sleep,
                                  os.path.join(args.out, f"steps_rank{rank}.jsonl")))
    trainer.count_matmuls = args.count_matmuls
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if args.count_matmuls:
        with open(os.path.join(args.out, f"matmuls_rank{rank}.json"), "w") as f:
            json.dump(trainer.matmuls, f)

    state = {f"kd.{k}": v for k, v in trainer.distiller.kd_state_dict().items()}
    state.update({f"student.{k}": v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()})
    save_file(state, os.path.join(args.out, f"final_rank{rank}.safetensors"))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # tear gloo down before interpreter exit: left to the atexit order, its threads can abort the process
        # ("terminate called without an active exception", SIGABRT) after the run has finished
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
