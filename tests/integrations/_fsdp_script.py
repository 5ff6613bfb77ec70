"""A plain-PyTorch distillation loop (no Trainer) under FSDP2, used by ``test_fsdp.py``.

    python tests/integrations/_fsdp_script.py --out DIR --case contrastive          # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/integrations/_fsdp_script.py --out DIR --case ...

Student and teacher are the tiny random Llamas of ``_train_script.py``; under ``torchrun`` both are sharded with
``torch.distributed.fsdp.fully_shard`` (every decoder block, then the root; gloo on CPU). Each step takes the next
4 rows; rank ``r`` of 2 trains on rows ``2r, 2r + 1`` of them. The single process runs the same rows:

* ``--case contrastive`` (forward KL + contrastive + CE, constant weights): as two micro-batches of 2 rows, gradients
  accumulated at half weight -- the contrastive term's negatives are the tokens of one micro-batch, so the split
  is the ranks'. The student's LM head is its own FSDP unit that reshards after its forward (``--shard-head``), so
  the logit term gets it through :func:`kd_plugins.distributed.gather_sharded`.
* ``--case gradnorm`` (forward KL + mse + CE, ``gradnorm`` updating every 2 steps): as one micro-batch of 4 rows.
  The LM head stays in the root unit; the last block (``shared_params``) is wrapped with
  ``reshard_after_forward=False`` and read with :func:`kd_plugins.distributed.probe_parameters` after the forward.

``--max-grad-norm`` clips the student and the Distiller together (:func:`kd_plugins.distributed.clip_grad_norm_jointly`
under FSDP2, ``torch.nn.utils.clip_grad_norm_`` over both in one process).

Writes ``log_rank{r}.json`` (per step: loss, rank-mean term losses, weights, pre-clip gradient norm), ``grads_rank{r}.safetensors`` (the
full student and Distiller gradients of every step) and ``final_rank{r}.safetensors`` (student weights, KD state),
and the KD-state checkpoint ``ckpt/kd_state.safetensors`` through :func:`kd_plugins.distributed.save_kd_state`,
counting in ``saves_rank{r}.json`` how many files each rank wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("KD_PLUGINS_DISABLE_AUTOLOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _train_script import TokenRows, tiny_llama  # noqa: E402

from kd_plugins import BatchContext, Distiller, ModelInfo  # noqa: E402
from kd_plugins.capture import FeatureCapture, run_backbone  # noqa: E402
from kd_plugins.distributed import (  # noqa: E402
    average_gradients,
    clip_grad_norm_jointly,
    cross_rank_mean,
    probe_parameters,
    save_kd_state,
)

ROWS_PER_STEP = 4

CONFIGS = {
    "contrastive": {
        "ce_weight": 1.0,
        "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 2.0},
                  {"name": "contrastive", "weight": 0.3, "proj_dim": 8, "temperature": 0.2, "max_tokens": 4096}],
        "scheduler": {"name": "constant"},
    },
    "gradnorm": {
        "ce_weight": 1.0,
        "terms": [{"name": "forward_kl", "weight": 1.0, "temperature": 2.0},
                  {"name": "mse", "weight": 0.5, "layers": "uniform"}],
        "scheduler": {"name": "gradnorm", "every": 2},
    },
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-grad-norm", type=float, default=float("inf"),
                        help="clip student and Distiller jointly (FSDP2: clip_grad_norm_jointly; one process: "
                             "torch.nn.utils.clip_grad_norm_ over both)")
    parser.add_argument("--reshard-probe-block", action="store_true",
                        help="negative control: let the last block reshard after its forward (gradnorm's probe fails)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0

    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48, layers=3)
    teacher.requires_grad_(False).eval()
    student_info, teacher_info = ModelInfo.from_config(student.config), ModelInfo.from_config(teacher.config)
    torch.manual_seed(2)
    distiller = Distiller(CONFIGS[args.case], student=student_info, teacher=teacher_info)
    shard_head = args.case == "contrastive"
    if distributed:
        from torch.distributed.fsdp import fully_shard

        last = len(student.model.layers) - 1
        for i, block in enumerate(student.model.layers):
            # the gradient probe differentiates the last block's parameters after the forward: keep them unsharded
            fully_shard(block, reshard_after_forward=i != last or args.reshard_probe_block)
        if shard_head:
            fully_shard(student.lm_head, reshard_after_forward=True)
        fully_shard(student)
        for block in teacher.model.layers:
            fully_shard(block)
        fully_shard(teacher)
    req = distiller.requirements()
    student_capture = FeatureCapture(student, info=student_info, layers=req.student_layers,
                                     qkv_layers=req.student_qkv_layers, final_hidden=req.final_hidden)
    teacher_capture = FeatureCapture(teacher, info=teacher_info, layers=req.teacher_layers,
                                     qkv_layers=req.teacher_qkv_layers, final_hidden=req.final_hidden)
    optimizer = torch.optim.AdamW([*student.parameters(), *distiller.parameters()], lr=5e-3)
    data = TokenRows(ROWS_PER_STEP * args.steps, fixed_length=True)

    logs, grads = [], {}
    for step in range(args.steps):
        rows = [data[ROWS_PER_STEP * step + i] for i in range(ROWS_PER_STEP)]
        if distributed:
            micro_batches = [rows[rank * 2 : rank * 2 + 2]]
        elif args.case == "contrastive":
            micro_batches = [rows[:2], rows[2:]]
        else:
            micro_batches = [rows]
        entry = {"step": step, "loss": 0.0, "losses": {}, "weights": {}}
        for rows_mb in micro_batches:
            inputs = {key: torch.stack([row[key] for row in rows_mb]) for key in rows_mb[0]}
            with torch.no_grad(), teacher_capture.recording():
                run_backbone(teacher, inputs)
            teacher_out = teacher_capture.result()
            with student_capture.recording():
                task_loss = student(**inputs, use_cache=False).loss
            student_out = student_capture.result()
            batch = BatchContext.from_inputs(labels=inputs["labels"], attention_mask=inputs["attention_mask"],
                                             step=step)
            shared = probe_parameters(student.model.layers[-1]) if args.case == "gradnorm" else None
            out = distiller(student_out, teacher_out, batch, task_loss=task_loss, shared_params=shared,
                            reduce=cross_rank_mean if distributed else None)
            (out.loss / len(micro_batches)).backward()
            share = 1.0 / len(micro_batches)
            entry["loss"] += share * float(out.loss.detach())
            for label, value in out.losses.items():
                entry["losses"][label] = entry["losses"].get(label, 0.0) + share * float(value)
            entry["weights"] = out.weights
            if distributed:
                teacher.reshard()  # the teacher's root unit stays unsharded after a forward: free it now
        if distributed:
            average_gradients(distiller)
            summary = torch.tensor([entry["loss"], *entry["losses"].values()], dtype=torch.float64)
            summary = cross_rank_mean(summary)
            entry["loss"] = float(summary[0])
            entry["losses"] = dict(zip(entry["losses"], map(float, summary[1:])))
        if distributed:
            norm = clip_grad_norm_jointly(student.parameters(), distiller.parameters(), args.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_([*student.parameters(), *distiller.parameters()], args.max_grad_norm)
        entry["grad_norm"] = float(norm)
        for name, param in [*(("student." + n, p) for n, p in student.named_parameters()),
                            *(("kd." + n, p) for n, p in distiller.named_parameters())]:
            if param.grad is not None:
                grads[f"{step}.{name}"] = _full(param.grad)
        logs.append(entry)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    writes = []
    original = safetensors.torch.save_file
    safetensors.torch.save_file = lambda *a, **k: (writes.append(1), original(*a, **k))[1]
    try:
        save_kd_state(distiller, os.path.join(args.out, "ckpt"))
    finally:
        safetensors.torch.save_file = original
    final = {f"kd.{k}": v for k, v in distiller.kd_state_dict().items()}
    final.update({f"student.{k}": _full(v) for k, v in student.state_dict().items()})
    with open(os.path.join(args.out, f"log_rank{rank}.json"), "w") as f:
        json.dump(logs, f)
    with open(os.path.join(args.out, f"saves_rank{rank}.json"), "w") as f:
        json.dump(len(writes), f)
    safetensors.torch.save_file(grads, os.path.join(args.out, f"grads_rank{rank}.safetensors"))
    safetensors.torch.save_file(final, os.path.join(args.out, f"final_rank{rank}.safetensors"))
    if distributed:
        # tear gloo down before interpreter exit (left to atexit, its threads can abort the process)
        dist.barrier()
        dist.destroy_process_group()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous().clone()


if __name__ == "__main__":
    main()
