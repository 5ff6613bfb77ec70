"""The ``transformers.Trainer`` under FSDP and DeepSpeed: what the distilling trainers do differently there.

**Written, not run on GPUs here.** The Trainer takes these paths only on GPUs (with ``fsdp`` and ``use_cpu=True`` it
silently runs plain data parallel), so they are unit-tested with fakes of the accelerator state; the same
mechanics in a plain PyTorch loop (FSDP2 on CPU, 2 processes) are tested for real in ``tests/integrations/test_fsdp.py``.

* :func:`prepare_teacher` -- a live teacher is sharded like the student: FSDP (v1 or v2, the accelerator's plugin
  settings) or, under DeepSpeed ZeRO-3, its own inference engine (no optimizer); below ZeRO-3 it stays replicated
  (stage 0). TRL's ``prepare_fsdp`` / ``prepare_deepspeed`` do the wrapping, as for TRL's own reference models.
* :func:`check_sharded_setup` -- refuses, before training, what cannot work: logit terms under ZeRO-3 (the LM heads
  are empty placeholders outside their forward, and kd_plugins does not gather them).
* :func:`clip_jointly` -- ``max_grad_norm`` over the sharded student and the replicated Distiller with one norm.
* Under FSDP the gradient-aware schedulers' ``shared_params`` are resolved again after the student's forward, on
  the steps that probe gradients (FSDP replaces the parameters the trainer resolved before wrapping), through
  :func:`~kd_plugins.distributed.probe_parameters`, which refuses parameters FSDP resharded after the forward.

Checkpoints: the KD state is written once (``args.should_save``: rank 0) and read by every rank; under DeepSpeed the
Trainer loads checkpoints without ``_load_from_checkpoint``, so the trainer mixin restores the KD state from
``_load_optimizer_and_scheduler`` instead.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor, nn

from kd_plugins.distributed import clip_grad_norm_jointly
from kd_plugins.errors import ConfigError
from kd_plugins.types import Requirements

__all__ = ["check_sharded_setup", "clip_jointly", "prepare_teacher", "sharded_kind", "zero_stage"]


def sharded_kind(accelerator: Any) -> str | None:
    """``"fsdp"``, ``"deepspeed"`` or None (one process, DDP, XLA, ...) from ``accelerator.distributed_type``."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(kind)


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the accelerator's plugin (None without DeepSpeed)."""
    if sharded_kind(accelerator) != "deepspeed":
        return None
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is None:
        config = getattr(plugin, "deepspeed_config", None) or {}
        stage = config.get("zero_optimization", {}).get("stage")
    return None if stage is None else int(stage)


def prepare_teacher(model: nn.Module, accelerator: Any) -> nn.Module:
    """The teacher model as the accelerator's setup needs it: FSDP-wrapped with the plugin's settings, a DeepSpeed
    inference engine (ZeRO-3 shards it; lower stages keep it whole, stage 0), or unchanged (one process, DDP: the
    teacher is replicated and never wrapped). Eval mode; no optimizer."""
    kind = sharded_kind(accelerator)
    if kind == "fsdp":
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model, accelerator)
    if kind == "deepspeed":
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model


def check_sharded_setup(accelerator: Any, requirements: Requirements) -> None:
    """Refuse a configuration the accelerator's sharding cannot serve, before the first step.

    Raises:
        ConfigError: logit terms (they read both LM heads) under DeepSpeed ZeRO-3.
    """
    stage = zero_stage(accelerator)
    if stage == 3 and requirements.final_hidden:
        raise ConfigError(
            "logit terms need the student's and the teacher's LM-head weights, which DeepSpeed ZeRO-3 partitions into "
            "empty placeholders outside their forward (kd_plugins does not gather them); use FSDP (fsdp: full_shard, "
            "FSDP2), ZeRO stage 1 or 2, or only hidden-state / attention terms under ZeRO-3"
        )


def clip_jointly(model: nn.Module, distiller_params: Iterable[Tensor], max_norm: float, accelerator: Any) -> Tensor:
    """Clip the student (sharded by FSDP) and the Distiller with one joint norm; return the pre-clip norm.

    FSDP2: :func:`~kd_plugins.distributed.clip_grad_norm_jointly` over the student's ``DTensor`` gradients and the
    Distiller's. FSDP1: the student's global norm from ``model.clip_grad_norm_(inf)`` (its gradients are flat
    shards; ``inf`` only measures), then both are scaled by the same factor. The Distiller's gradients must already
    be averaged across ranks."""
    version = int(getattr(getattr(getattr(accelerator, "state", None), "fsdp_plugin", None), "fsdp_version", 2) or 2)
    params = list(distiller_params)
    if version == 1 and hasattr(model, "clip_grad_norm_"):
        student_norm = model.clip_grad_norm_(float("inf"))
        return clip_grad_norm_jointly(model.parameters(), params, max_norm, sharded_norm=student_norm)
    return clip_grad_norm_jointly(model.parameters(), params, max_norm)
