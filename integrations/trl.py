"""One line adds distillation to a TRL / transformers training pipeline.

* :class:`KDSFTTrainer` / :class:`KDTrainer` / :class:`KDDistillationTrainer`: drop-in trainers with two extra
  keyword arguments, ``teacher=`` and ``kd_config=``.
* :func:`enable_distillation`: upgrade an already-built trainer instance.

How a step works: the host trainer's own ``compute_loss`` runs unchanged (its CE, metrics and normalisation are
kept) while a :class:`~kd_plugins.capture.FeatureCapture` records what the transfer terms need from the student;
the teacher backbone runs on the same inputs under ``no_grad``; the :class:`~kd_plugins.Distiller` combines
``ce_weight * host_loss + sum_i w_i * term_i``.

Normalisation follows the host. When the host's loss is already scaled for gradient accumulation (the Trainer's
``loss_is_scaled_for_ga`` rule: the loss was divided by ``num_items_in_batch``), logit terms get the same
``num_items_in_batch`` (and the same ``average_tokens_across_devices`` world factor); token-mean alignment terms
(``mse``, ``cosine``, ``attention_relation``) get ``num_tokens_in_batch``, the valid tokens of the whole
accumulation window counted when the Trainer pre-fetches it (and over all ranks, with the world factor, when
``average_tokens_across_devices``); other terms (``contrastive``) and the scheduler's regulariser are divided by the
number of accumulation steps. Otherwise every term is a per-micro-batch mean and the Trainer divides the total by
the accumulation steps, as it does for its own loss.

Under DDP the Distiller gets a cross-rank mean as ``reduce`` (schedulers see rank-mean losses and probe gradients,
also on a rank that skips the transfer terms), its gradients are averaged across ranks before clipping, and
``max_grad_norm`` clips the student and the Distiller together.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from kd_plugins.capture import FeatureCapture, all_finite, find_decoder, run_backbone, unwrap_model
from kd_plugins.config import KDConfig
from kd_plugins.distiller import Distiller
from kd_plugins.errors import ConfigError, KDError
from kd_plugins.types import BatchContext, Requirements
from kd_plugins.integrations.teachers import Teacher, check_compatible, model_info, resolve_teacher
from kd_plugins.integrations.teacher_cache import TeacherCache
from kd_plugins.integrations.transformers import DistillationCallback

logger = logging.getLogger(__name__)

__all__ = [
    "KDDistillationTrainer",
    "KDSFTTrainer",
    "KDTrainer",
    "KDTrainerMixin",
    "NonFiniteTeacherError",
    "enable_distillation",
    "load_kd_config",
]


class NonFiniteTeacherError(KDError, FloatingPointError):
    """The teacher produced NaN/inf and ``on_nonfinite_teacher`` is ``raise``."""


def load_kd_config(config: KDConfig | Mapping[str, Any] | str | Path | None) -> KDConfig:
    """Accept a :class:`KDConfig`, a dict, or a YAML path / string."""
    if isinstance(config, KDConfig):
        return config
    if config is None:
        raise ConfigError("kd_config is required: pass a KDConfig, a dict or a YAML path")
    if isinstance(config, Mapping):
        return KDConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return KDConfig.from_yaml(config)
    raise ConfigError(f"kd_config={config!r} is invalid; expected a KDConfig, a dict or a YAML path")


class KDTrainerMixin:
    """Adds distillation to a ``transformers.Trainer`` subclass (put it first in the bases).

    Extra keyword arguments:
        teacher: teacher model object, model path / hub id, ``"self"`` (PEFT student, adapters disabled), or a
            :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` (offline teacher: no teacher forward).
        kd_config: :class:`KDConfig`, dict, or YAML path.

    Attributes after construction: ``distiller`` (the :class:`Distiller`, on the student's device),
    ``kd_teacher`` (:class:`~kd_plugins.integrations.teachers.Teacher`), ``kd_callback``
    (:class:`DistillationCallback`).
    """

    def __init__(self, *args: Any, teacher: Any = None, kd_config: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kd_setup(teacher, kd_config)

    # --- setup --------------------------------------------------------------------------------------------

    def _kd_setup(self, teacher: Any, kd_config: Any) -> None:
        if teacher is None:
            teacher = getattr(self, "teacher_model", None)  # TRL's DistillationTrainer keeps its own teacher
        if teacher is None:
            raise ConfigError("distillation needs a teacher: pass teacher=<model, path or 'self'>")
        self.kd_config = load_kd_config(kd_config)
        student = self.model
        load_kwargs = {}
        attn = getattr(getattr(unwrap_model(student), "config", None), "_attn_implementation", None)
        if isinstance(teacher, str) and teacher != "self" and attn:
            load_kwargs["attn_implementation"] = attn  # a teacher path follows the student (sdpa, flash, ...)
        # an offline TeacherCache replaces the teacher model: its rows become the teacher capture
        self._kd_cache: TeacherCache | None = teacher if isinstance(teacher, TeacherCache) else None
        if self._kd_cache is None:
            self.kd_teacher: Teacher | None = resolve_teacher(
                teacher, student, dtype=self.kd_config.teacher_dtype, **load_kwargs
            )
            teacher_info = model_info(self.kd_teacher.model, "teacher")
        else:
            self.kd_teacher, teacher_info = None, self._kd_cache.model_info
        student_info = model_info(student, "student")
        # vocabulary first (when a logit term is configured), then the resolved layers once the terms exist
        check_compatible(student_info, teacher_info, None if self._kd_has_logit_terms() else Requirements())
        self.distiller = Distiller(self.kd_config, student=student_info, teacher=teacher_info)
        self.distiller.to(next(student.parameters()).device)
        req = self.distiller.requirements()
        check_compatible(student_info, teacher_info, req)
        self._kd_student_capture = FeatureCapture(
            student, info=student_info, layers=req.student_layers, qkv_layers=req.student_qkv_layers,
            final_hidden=req.final_hidden,
        )
        if self._kd_cache is None:
            self._kd_teacher_capture = FeatureCapture(
                self.kd_teacher.model, info=teacher_info, layers=req.teacher_layers,
                qkv_layers=req.teacher_qkv_layers, final_hidden=req.final_hidden,
            )
        else:
            self._kd_cache.check_requirements(req)
            self._kd_cache_layers = req.teacher_layers
        self._kd_shared_params = _shared_params(student, self.kd_config.shared_params)
        self._kd_term_scale: dict[str, float] = {}
        self._kd_num_tokens: tuple[Tensor | None, float] = (None, 1.0)  # set per optimizer step
        for label, term in self.distiller.terms.items():
            term.register_forward_hook(self._kd_scale_hook(label))
        self._kd_logs: dict[str, float] = defaultdict(float)
        self._kd_log_counts: dict[str, int] = defaultdict(int)
        self._kd_window_start = self.state.global_step
        self.kd_callback = DistillationCallback(self.distiller)
        self.add_callback(self.kd_callback)
        if getattr(self, "optimizer", None) is not None:  # enable_distillation after the optimizer exists
            self._kd_add_param_group(self.optimizer)

    def _kd_has_logit_terms(self) -> bool:
        from kd_plugins.plugins import family_of

        return any(family_of(t.name) == "logit" for t in self.kd_config.terms)

    # --- optimizer ----------------------------------------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._kd_add_param_group(self.optimizer)
        return optimizer

    def _kd_add_param_group(self, optimizer) -> None:
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params or getattr(optimizer, "_kd_group_added", False):
            return
        lr = self.kd_config.projector_lr if self.kd_config.projector_lr is not None else self.args.learning_rate
        optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
        optimizer._kd_group_added = True

    def _clip_grad_norm(self, model):
        """Clip the joint gradient of the student and the Distiller (projectors, learned temperatures, scheduler
        parameters) to ``max_grad_norm``: the Distiller is outside the wrapped model, so the Trainer's own clip
        would leave it out. Returns the joint pre-clip norm (logged as ``grad_norm``). The Distiller's gradients
        are averaged across ranks first, so every rank clips with the same norm. FSDP, DeepSpeed, XLA and
        mixed-mesh models keep the Trainer's clip (the Distiller is not clipped there)."""
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params or not self._kd_can_clip_jointly(model):
            return super()._clip_grad_norm(model)
        self.kd_callback.average_gradients()
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def _kd_can_clip_jointly(self, model) -> bool:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
            return False
        if getattr(self, "optimizer", None) is not None and hasattr(self.optimizer, "clip_master_grads"):
            return False  # SageMaker model parallel clips its master gradients itself
        has_mixed_mesh = getattr(self, "_has_mixed_mesh_grads", None)
        return not (has_mixed_mesh is not None and has_mixed_mesh(model))

    # --- checkpoints --------------------------------------------------------------------------------------

    kd_resume_requires_state = True  # refuse to resume from a checkpoint without kd_state.safetensors

    def _save_checkpoint(self, model, trial) -> None:
        # kd_state first: the Trainer writes trainer_state.json and rotates old checkpoints inside
        # _save_checkpoint, before callbacks' on_save; a crash in between must not leave a resumable checkpoint
        # without the distillation state.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.kd_callback.save(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.kd_callback.load(resume_from_checkpoint, strict=self.kd_resume_requires_state)  # fail before loading
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # --- the loss -----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the host's own loss, comparable to a run without KD
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        kd_inputs = self._kd_model_inputs(inputs)  # before the host mutates inputs
        num_items = self._kd_num_items(inputs, num_items_in_batch)
        scaled_for_ga = self._kd_loss_is_scaled_for_ga(num_items)
        tokens, tokens_world = self._kd_num_tokens if scaled_for_ga else (None, 1.0)
        batch = BatchContext.from_inputs(
            labels=kd_inputs.get("labels"),
            input_ids=kd_inputs.get("input_ids"),
            attention_mask=kd_inputs.get("attention_mask"),
            position_ids=kd_inputs.get("position_ids"),
            num_items_in_batch=num_items if scaled_for_ga else None,
            step=self.state.global_step,
            num_tokens_in_batch=tokens,
        )
        mode = self._kd_student_mode(model, kd_inputs, batch, return_outputs, num_items_in_batch, scaled_for_ga)
        with self._kd_student_capture.recording():
            if mode == "host":
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
            else:  # the backbone only: the LM head runs once, inside the logit term (or not at all)
                run_backbone(model, kd_inputs)
                self._kd_count_host_tokens(kd_inputs)
                result = None
        student_capture = self._kd_student_capture.result()
        self._kd_check_student_graph(student_capture)
        host_loss, outputs = result if return_outputs else (result, None)

        if self._kd_cache is not None:
            teacher_capture = self._kd_cache.capture(kd_inputs, layers=self._kd_cache_layers)
        else:
            with self.kd_teacher.forward_context(), self._kd_teacher_capture.recording():
                run_backbone(self.kd_teacher.model, kd_inputs)
                teacher_capture = self._kd_teacher_capture.result()  # inside: a 'self' teacher's head has no adapters
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps))
        world = self._kd_world_factor(num_items) if scaled_for_ga else 1
        if not all_finite(teacher_capture):
            if self.kd_config.on_nonfinite_teacher == "raise":
                raise NonFiniteTeacherError(
                    f"teacher outputs contain NaN/inf at step {self.state.global_step}; set "
                    "on_nonfinite_teacher: skip to train on the task loss alone for such steps"
                )
            logger.warning("kd_plugins: non-finite teacher outputs at step %d; skipping transfer terms",
                           self.state.global_step)
            if result is None:  # the host loss was not computed: compute it now (a second student forward)
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
                host_loss = result
            # other ranks may run the terms: take part in the scheduler's collectives with no weight
            self.distiller.skip_transfer(batch, task_loss=host_loss, shared_params=self._kd_shared_params,
                                         reduce=self._kd_cross_rank_mean(contributes=False))
            self._kd_accumulate({"kd/skipped_steps": 1.0}, {})
            return result

        self._kd_term_scale = {
            label: (world if _normalised_by_num_items(term)
                    else tokens_world if tokens is not None and _normalised_by_num_tokens(term)
                    else 1.0 / ga) if scaled_for_ga else 1.0
            for label, term in self.distiller.terms.items()
        }
        try:
            out = self.distiller(
                student_capture, teacher_capture, batch, shared_params=self._kd_shared_params,
                task_loss="fused" if mode == "fused" else host_loss,
                task_loss_scale=world,  # a fused CE scales like the host's: x world when it averages tokens
                reduce=self._kd_cross_rank_mean(contributes=True),
                # once per optimizer step: the Trainer does not divide a GA-scaled loss by the accumulation steps
                regularizer_scale=1.0 / ga if scaled_for_ga else 1.0,
            )
        finally:
            self._kd_term_scale = {}
        # logged like the Trainer's own loss: contributions summed over micro-batches, averaged over steps
        contribution = 1.0 if scaled_for_ga else 1.0 / ga
        logs = out.log_dict()
        summed = {k: v * contribution for k, v in logs.items() if k.startswith("kd/loss/") or k == "kd/transfer"}
        averaged = {k: v for k, v in logs.items() if k not in summed}
        self._kd_accumulate(summed, averaged)
        return (out.loss, outputs) if return_outputs else out.loss

    # Which host trainers compute_loss is the plain causal-LM cross-entropy that a logit term can reproduce
    # (KDDistillationTrainer's host loss is a JSD on generated completions: never replaced).
    kd_host_loss_is_causal_lm_ce = True

    def _kd_student_mode(self, model, kd_inputs, batch, return_outputs, num_items_in_batch, scaled_for_ga) -> str:
        """How the student runs this training step (``KDConfig.fuse_task_loss``):

        * ``"host"``: the host's own ``compute_loss`` (full LM head + its CE, metrics and normalisation);
        * ``"backbone"``: backbone only, no task loss -- ``ce_weight == 0`` and the scheduler does not read the
          task loss's gradient;
        * ``"fused"``: backbone only, the CE comes from the logit term's chunked pass over the student's head.

        Anything the fused CE would not reproduce exactly keeps ``"host"``.
        """
        config = self.kd_config
        if not config.fuse_task_loss or return_outputs or not self.kd_host_loss_is_causal_lm_ce:
            return "host"
        if not self._kd_host_is_plain_ce(model):
            return "host"
        needs_task = config.ce_weight > 0 or _scheduler_uses_task_loss(self.distiller.scheduler)
        if not needs_task:
            return "backbone"
        if config.ce_weight == 0 or self.distiller.task_loss_carrier() is None:
            return "host"  # only the scheduler reads the task loss: keep the host's
        # the CE's normaliser must be the logit terms' (num_items_in_batch only when the host scales for GA)
        if num_items_in_batch is not None and not scaled_for_ga:
            return "host"
        labels = kd_inputs.get("labels")
        if not isinstance(labels, Tensor):
            return "host"
        # the host's targets: labels shifted left by one (HF causal-LM convention), -100 at the end; the logit terms
        # see BatchContext.labels, which also cut packed-sequence boundaries -- fuse only when they agree
        from kd_plugins.functional import shift_labels

        host_targets = shift_labels(labels)
        if not torch.equal(batch.labels, host_targets):
            return "host"
        valid = int((host_targets != -100).sum())
        if valid == 0 and (num_items_in_batch is None or float(num_items_in_batch) == 0):
            return "host"  # the host's own 0/0 convention (NaN for the Trainer, 0 for TRL) stays the host's
        return "fused"

    def _kd_host_is_plain_ce(self, model) -> bool:
        """True when the host's training loss is the model's plain causal-LM CE, single process, no wrapper."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.NO or unwrap_model(model) is not model:
            return False  # DDP/FSDP/DeepSpeed and PEFT wrappers: their forward must run as the host runs it
        if getattr(self, "compute_loss_func", None) is not None or getattr(self, "label_smoother", None) is not None:
            return False
        args = self.args
        if getattr(args, "loss_type", "nll") not in (None, "nll") or getattr(args, "use_liger_kernel", False):
            return False
        if getattr(self, "aux_loss_enabled", False):
            return False
        if isinstance(self, SFTTrainer):
            return True  # TRL's fused LM head: -log p(target) summed / num_items (or valid tokens)
        from transformers.loss.loss_utils import ForCausalLMLoss

        loss_function = getattr(model, "loss_function", None)
        return getattr(loss_function, "__func__", loss_function) is ForCausalLMLoss

    def _kd_count_host_tokens(self, inputs: Mapping[str, Any]) -> None:
        """Keep TRL SFTTrainer's ``num_tokens`` log counting when its compute_loss is not run (its ``entropy``
        and ``mean_token_accuracy`` need the full logits and are not logged for such steps)."""
        if not isinstance(self, SFTTrainer) or not hasattr(self, "_total_train_tokens"):
            return
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor):
            count = int(mask.sum())
        elif isinstance(inputs.get("position_ids"), Tensor):
            count = int(inputs["position_ids"].size(1))
        else:
            return
        self._total_train_tokens += count // getattr(self, "_tp_size", 1)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _kd_check_student_graph(self, capture) -> None:
        if getattr(self, "_kd_graph_warned", False) or not torch.is_grad_enabled():
            return
        tensors = [capture.final_hidden, *capture.hidden_states.values()]
        tensors += [t for qkv in capture.qkv.values() for t in qkv]
        if any(t is not None and not t.requires_grad for t in tensors):
            self._kd_graph_warned = True
            logger.warning(
                "kd_plugins: some captured student features carry no gradient, so transfer terms on them cannot "
                "train the student. Frozen layers (e.g. LoRA on later layers only) are expected; with gradient "
                "checkpointing use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )

    def _kd_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The causal-LM batch both models see (overridden for trainers with another batch layout)."""
        return dict(inputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The Trainer pre-fetches the micro-batches of one optimizer step to count num_items_in_batch; count the
        # valid tokens too, the normaliser of token-mean alignment terms (BatchContext.num_tokens_in_batch).
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._kd_num_tokens = self._kd_count_tokens(batch_samples, device)
        return batch_samples, num_items_in_batch

    def _kd_count_tokens(self, batch_samples: list, device) -> tuple[Tensor | None, float]:
        """``(valid tokens over the accumulation window, world factor)``: attention-mask tokens (every token
        without a mask) of all micro-batches, summed over ranks when ``average_tokens_across_devices`` -- then the
        world factor undoes DDP's gradient averaging, as for logit terms. ``(None, 1.0)`` when not countable."""
        counts = []
        for batch in batch_samples:
            if not isinstance(batch, Mapping):
                return None, 1.0
            mask = batch.get("attention_mask")
            reference = mask if mask is not None else batch.get("input_ids")
            if not isinstance(reference, Tensor):
                return None, 1.0
            counts.append(mask.sum() if mask is not None else torch.tensor(reference.numel()))
        if not counts:
            return None, 1.0
        count = torch.stack([c.to(device) for c in counts]).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            return self.accelerator.gather(count).sum() / tp, float(self.accelerator.num_processes // tp)
        return count, 1.0

    def _kd_num_items(self, inputs: Mapping[str, Any], num_items_in_batch):
        return num_items_in_batch

    def _kd_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # transformers.Trainer.training_step's rule for the loss compute_loss returns
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _kd_world_factor(self, num_items_in_batch) -> float:
        if not (self.args.average_tokens_across_devices and num_items_in_batch is not None):
            return 1.0
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return float(self.accelerator.num_processes // tp)

    def _kd_cross_rank_mean(self, *, contributes: bool):
        """The Distiller's ``reduce`` under DDP: a mean over the ranks that ``contribute`` (a rank that skipped
        the transfer terms still joins the collective, with no weight). None in a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        return functools.partial(_mean_over_contributing_ranks, contributes=contributes)

    def _kd_scale_hook(self, label: str):
        def hook(module, args, output):
            scale = self._kd_term_scale.get(label, 1.0)
            return output if scale == 1.0 else output * scale

        return hook

    # --- logging ------------------------------------------------------------------------------------------

    def _kd_accumulate(self, summed: Mapping[str, float], averaged: Mapping[str, float]) -> None:
        if not self._kd_logs:  # a new logging window starts before this optimizer step completes
            self._kd_window_start = self.state.global_step
        for key, value in summed.items():
            self._kd_logs[key] += value
            self._kd_log_counts[key] = -1  # marks "sum, divide by optimizer steps"
        for key, value in averaged.items():
            self._kd_logs[key] += value
            self._kd_log_counts[key] += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._kd_logs:  # a training log
            steps = max(1, self.state.global_step - self._kd_window_start)
            for key, value in self._kd_logs.items():
                count = self._kd_log_counts[key]
                logs[key] = round(value / (steps if count < 0 else max(count, 1)), 6)
            self._kd_logs.clear()
            self._kd_log_counts.clear()
        super().log(logs, *args, **kwargs)


class KDSFTTrainer(KDTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with distillation: ``KDSFTTrainer(model, args, ..., teacher=..., kd_config=...)``."""


class KDTrainer(KDTrainerMixin, Trainer):
    """``transformers.Trainer`` with distillation: ``KDTrainer(model, args, ..., teacher=..., kd_config=...)``."""


try:
    from trl import DistillationTrainer as _TRLDistillationTrainer
except ImportError:  # pragma: no cover - older TRL
    _TRLDistillationTrainer = None

if _TRLDistillationTrainer is not None:

    class KDDistillationTrainer(KDTrainerMixin, _TRLDistillationTrainer):
        """TRL's on-policy ``DistillationTrainer`` plus kd_plugins transfer terms.

        The host's generalized-JSD loss on self-generated completions stays the task loss (scaled by
        ``ce_weight``); the transfer terms run on the same prompt+completion sequences, with the completion
        tokens as targets. Without ``teacher=`` the trainer's own ``teacher_model`` is the teacher.
        """

        kd_host_loss_is_causal_lm_ce = False

        def _kd_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, : inputs["prompt_ids"].size(1)] = -100
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        def _kd_num_items(self, inputs: Mapping[str, Any], num_items_in_batch):
            if inputs.get("num_items_in_batch") is not None:  # the host's own count over generated completions
                return inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            return num_items_in_batch

        def _kd_world_factor(self, num_items_in_batch) -> float:
            return 1.0  # the host already divides its count by the process count

        def _kd_count_tokens(self, batch_samples: list, device) -> tuple[Tensor | None, float]:
            return None, 1.0  # completions are generated after pre-fetching: alignment terms stay micro-batch means

else:  # pragma: no cover
    KDDistillationTrainer = None  # type: ignore[assignment,misc]


def enable_distillation(trainer: Trainer, *, teacher: Any, config: Any) -> Trainer:
    """Upgrade an already-built trainer in place (and return it): its class becomes a subclass with
    :class:`KDTrainerMixin`, then distillation is set up as if it had been constructed with
    ``teacher=`` and ``kd_config=``."""
    if not isinstance(trainer, KDTrainerMixin):
        cls = type(trainer)
        trainer.__class__ = type(f"KD{cls.__name__}", (KDTrainerMixin, cls), {"__module__": __name__})
    trainer._kd_setup(teacher, config)
    return trainer


# --- helpers ----------------------------------------------------------------------------------------------


def _mean_over_contributing_ranks(tensor: Tensor, *, contributes: bool) -> Tensor:
    """All-reduce ``tensor`` (any shape) to its mean over the contributing ranks, in float64: one collective that
    also carries the count. NaN where no rank contributed (schedulers ignore non-finite values)."""
    import torch.distributed as dist

    flat = torch.cat([tensor.detach().reshape(-1).to(torch.float64),
                      torch.ones(1, dtype=torch.float64, device=tensor.device)])
    if not contributes:
        flat.zero_()
    dist.all_reduce(flat)
    return (flat[:-1] / flat[-1]).to(tensor.dtype).view_as(tensor)


def _scheduler_uses_task_loss(scheduler: nn.Module) -> bool:
    """Whether the scheduler reads the task loss (its probe gradient): ``conflict`` does; the other built-ins do
    not. A custom scheduler says so with a ``uses_task_loss`` attribute; without one it is assumed to."""
    explicit = getattr(scheduler, "uses_task_loss", None)
    if explicit is not None:
        return bool(explicit)
    from kd_plugins.components import dynamic_schedulers, schedulers

    known = (schedulers.ConstantScheduler, dynamic_schedulers.GradNormScheduler,
             dynamic_schedulers.DynamicWeightAverageScheduler, dynamic_schedulers.UncertaintyScheduler)
    return not isinstance(scheduler, known)


def _normalised_by_num_items(term: nn.Module) -> bool:
    """Logit terms divide token sums by ``num_items_in_batch``; other terms are per-micro-batch means.
    A term can say otherwise with a ``normalized_by_num_items`` attribute."""
    return bool(getattr(term, "normalized_by_num_items", getattr(term, "family", "") == "logit"))


def _normalised_by_num_tokens(term: nn.Module) -> bool:
    """Token-mean alignment terms (``normalized_by_num_tokens = True``) can divide by the accumulation window's
    token count (``BatchContext.num_tokens_in_batch``); other non-logit terms stay per-micro-batch means."""
    return bool(getattr(term, "normalized_by_num_tokens", False))


def _shared_params(student: nn.Module, spec: str) -> list[Tensor]:
    """Resolve ``KDConfig.shared_params`` to student parameters for gradient-aware schedulers."""
    base = unwrap_model(student)
    decoder, _ = find_decoder(base)
    if spec == "final_norm":
        params = list(decoder.norm.parameters()) if hasattr(decoder, "norm") else []
    elif spec == "last_layer":
        params = list(decoder.layers[-1].parameters())
    else:
        params = [p for name, p in base.named_parameters() if spec in name]
    params = [p for p in params if p.requires_grad]
    if not params:
        # frozen (e.g. LoRA) bases: fall back to whatever is trainable in the last block
        params = [p for p in decoder.layers[-1].parameters() if p.requires_grad]
    return params
