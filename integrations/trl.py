"""One line adds distillation to a TRL / transformers training pipeline.

* :class:`KDSFTTrainer` / :class:`KDTrainer` / :class:`KDDistillationTrainer`: drop-in trainers with two extra
  keyword arguments, ``teacher=`` and ``kd_config=``.
* :func:`enable_distillation`: upgrade an already-built trainer instance.

One training step (:meth:`KDTrainerMixin.compute_loss`) reads straight down: the batch's targets and masks
(:class:`~kd_plugins.BatchContext`); the teacher's tensors from its :class:`~kd_plugins.TeacherSource` (a live
model, the PEFT base with adapters disabled, or an offline cache); the step plan
(:class:`~kd_plugins.StepPlan`, from the host facts below and the terms' and scheduler's declared traits); the
student, run as the plan says -- the host's own ``compute_loss`` (``HOST``), or its backbone only through the model's
own forward, the LM head running once inside the logit terms (``BACKBONE`` / ``FUSED_CE``), while a
:class:`~kd_plugins.capture.FeatureCapture` records what the terms need; the :class:`~kd_plugins.Distiller`, which
applies the plan; the logs.

Host facts follow the ``transformers.Trainer``: its loss is scaled for gradient accumulation when it was divided by
``num_items_in_batch`` (``loss_is_scaled_for_ga``); with ``average_tokens_across_devices`` that count covers every
rank and the loss is multiplied by the process count (the world factor). The valid tokens of the whole accumulation
window are counted when the Trainer pre-fetches it and travel with each micro-batch (the token-mean terms'
normaliser). How each term is then normalised and scaled is the plan's (see :mod:`kd_plugins.plan`).

Under DDP the Distiller gets a cross-rank mean as ``reduce`` (schedulers see rank-mean losses and probe gradients,
also on a rank that skips the transfer terms), its gradients are averaged across ranks before clipping, and
``max_grad_norm`` clips the student and the Distiller together. The student's backbone-only forward runs through the
DDP wrapper, so the fused path is the same in one process and in many.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from kd_plugins.capture import (
    FeatureCapture,
    all_finite,
    decoder_blocks,
    final_norm,
    find_decoder,
    run_backbone,
    unwrap_model,
)
from kd_plugins.config import KDConfig
from kd_plugins.distiller import Distiller
from kd_plugins.distributed import cross_rank_mean, probe_parameters
from kd_plugins.errors import ConfigError, IncompatibleModelsError, KDError
from kd_plugins.functional import shift_labels
from kd_plugins.integrations.cache_coverage import check_cache_covers, training_sequences
from kd_plugins.integrations.cross_tokenizer import (
    CrossTokenizer,
    check_cross_tokenizer_terms,
    cross_tokenizer_for,
    cross_tokenizer_term_error,
)
from kd_plugins.integrations.sharding import check_sharded_setup, clip_jointly, prepare_teacher, sharded_kind
from kd_plugins.integrations.teachers import LiveTeacher, check_compatible, model_info, resolve_teacher
from kd_plugins.integrations.transformers import DistillationCallback
from kd_plugins.integrations.vocabulary import load_tokenizer, shared_vocabulary, teacher_tokenizer_of, tokenizer_of
from kd_plugins.plan import HostFacts, StepPlan, StudentMode
from kd_plugins.types import BatchContext, ModelInfo, Requirements, TeacherSource

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


# The key under which the accumulation window's token count travels with each micro-batch (popped before the host's
# compute_loss sees the batch).
WINDOW_TOKENS_KEY = "kd_window_tokens"


@dataclass(frozen=True)
class WindowTokens:
    """The valid tokens of one accumulation window (summed over ranks when the host averages tokens across devices)
    and the world factor that undoes data-parallel gradient averaging for them."""

    count: Tensor
    world_factor: float


class NonFiniteTeacherError(KDError, FloatingPointError):
    """The teacher produced NaN/inf and ``on_nonfinite_teacher`` is ``raise``."""


@dataclass
class _DistillationSetup:
    """Everything one ``_kd_setup`` builds, assembled before the trainer is changed (so a refused call leaves a
    previous setup in place)."""

    config: KDConfig
    teacher: TeacherSource
    distiller: Distiller
    requirements: Requirements
    student_capture: FeatureCapture
    shared_params: list[Tensor] = field(default_factory=list)
    full_vocabulary: bool = True  # the logit terms see the student's whole LM head (no shared-vocabulary slice)
    cross_tokenizer: CrossTokenizer | None = None  # the teacher reads its own tokenization (KDConfig.cross_tokenizer)

    def close(self) -> None:
        """Detach the hooks this setup attached."""
        self.student_capture.remove()
        if isinstance(self.teacher, LiveTeacher):
            self.teacher.close()


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
        teacher: teacher model object, model path / hub id, ``"self"`` (PEFT student, adapters disabled), the folder
            of a teacher cache, or a :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` (offline teacher:
            no teacher forward). Optional when ``kd_config`` names a ``teacher_cache``.
        kd_config: :class:`KDConfig`, dict, or YAML path.
        teacher_tokenizer: the teacher's tokenizer (object or path), compared with the student's (the trainer's
            ``processing_class``); a teacher path's own tokenizer is found beside it. See
            :mod:`kd_plugins.integrations.vocabulary`.

    Attributes after construction: ``distiller`` (the :class:`Distiller`, on the student's device),
    ``kd_teacher`` (the :class:`~kd_plugins.TeacherSource`: a
    :class:`~kd_plugins.integrations.teachers.LiveTeacher` or the given cache), ``kd_callback``
    (:class:`DistillationCallback`).

    Everything is checked before the first training step -- tokenizers and vocabularies, layers, the teacher
    cache against the training data, ``shared_params`` -- and a refusal names the problem, the value and the fix.
    Setting distillation up again (:func:`enable_distillation` on a trainer that already distils) replaces the
    previous setup: its callback, forward hooks and optimizer parameter group are removed.
    """

    def __init__(self, *args: Any, teacher: Any = None, kd_config: Any = None, teacher_tokenizer: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kd_setup(teacher, kd_config, teacher_tokenizer=teacher_tokenizer)

    # --- setup --------------------------------------------------------------------------------------------

    # Whether the training batches are rows of train_dataset (a declared trait of the host trainer; TRL's
    # DistillationTrainer trains on completions it generates, which no teacher cache can hold).
    kd_batches_are_dataset_rows = True

    def _kd_setup(self, teacher: Any, kd_config: Any, *, teacher_tokenizer: Any = None) -> None:
        """Build the distillation setup, then install it in place of a previous one (if any)."""
        setup = self._kd_build(teacher, load_kd_config(kd_config), teacher_tokenizer)
        previous = self.__dict__.get("_kd_installed")
        if previous is not None:
            self._kd_uninstall(previous, keep_teacher=previous.teacher is setup.teacher)
        self._kd_install(setup, previous)

    def _kd_build(self, teacher: Any, config: KDConfig, teacher_tokenizer: Any) -> _DistillationSetup:
        teacher = self._kd_teacher_argument(teacher, config)
        student = self.model
        load_kwargs = {}
        attn = getattr(getattr(unwrap_model(student), "config", None), "_attn_implementation", None)
        if isinstance(teacher, str) and teacher != "self" and attn:
            load_kwargs["attn_implementation"] = attn  # a teacher path follows the student (sdpa, flash, ...)
        source: TeacherSource = resolve_teacher(teacher, student, dtype=config.teacher_dtype, **load_kwargs)
        source = self._kd_prepare_teacher(source)
        if not self.kd_batches_are_dataset_rows and _is_teacher_cache(source):
            raise ConfigError(f"{type(self).__name__} trains on completions it generates, which a teacher cache "
                              "cannot hold; use a live teacher (a model or its path)")
        has_logits = self._kd_has_logit_terms(config)
        student_info, teacher_info = model_info(student, "student"), source.info
        # a teacher with its own tokenizer reads its own tokens (cross_tokenizer: true), checked before anything else
        cross = self._kd_cross_tokenizer(source, teacher, teacher_tokenizer, config)
        shared = None
        if cross is None:
            shared = self._kd_shared_vocabulary(source, teacher, teacher_tokenizer, student_info, teacher_info,
                                                needs_logits=has_logits)
            if shared is not None:
                student_info = dataclasses.replace(student_info, vocab_size=shared)
                teacher_info = dataclasses.replace(teacher_info, vocab_size=shared)
                source = LiveTeacher(source.model, is_self=source.is_self, info=teacher_info)
            # vocabulary first (when a logit term is configured), then the resolved layers once the terms exist
            check_compatible(student_info, teacher_info, None if has_logits else Requirements())
        try:
            distiller = Distiller(config, student=student_info, teacher=teacher_info)
        except IncompatibleModelsError as exc:  # a one-vocabulary logit term refuses the two vocabularies
            raise exc if cross is None else cross_tokenizer_term_error(str(exc)) from exc
        distiller.to(next(student.parameters()).device)
        req = distiller.requirements()
        if cross is not None:  # the vocabularies differ by design: check the terms, then the layers only
            check_cross_tokenizer_terms(distiller.terms)
        check_compatible(student_info, teacher_info,
                         req if cross is None else dataclasses.replace(req, final_hidden=False))
        check_sharded_setup(getattr(self, "accelerator", None), req)
        capture = FeatureCapture(student, info=student_info, layers=req.student_layers,
                                 qkv_layers=req.student_qkv_layers, final_hidden=req.final_hidden)
        setup = _DistillationSetup(config=config, teacher=source, distiller=distiller, requirements=req,
                                   student_capture=capture, full_vocabulary=shared is None and cross is None,
                                   cross_tokenizer=cross)
        try:
            source.prepare(req)
            setup.teacher = self._kd_check_cache_coverage(source, req, cross)
            setup.shared_params = _shared_params(student, config.shared_params)
        except BaseException:
            setup.close()
            raise
        return setup

    def _kd_install(self, setup: _DistillationSetup, previous: _DistillationSetup | None) -> None:
        self._kd_installed = setup
        self.kd_config = setup.config
        self.kd_teacher = setup.teacher
        self.distiller = setup.distiller
        self._kd_requirements = setup.requirements
        self._kd_student_capture = setup.student_capture
        self._kd_shared_params = setup.shared_params
        self._kd_full_vocabulary = setup.full_vocabulary
        self._kd_cross_tokens = setup.cross_tokenizer
        self._kd_logs: dict[str, float] = defaultdict(float)
        self._kd_log_counts: dict[str, int] = defaultdict(int)
        self._kd_window_start = self.state.global_step
        self.kd_callback = DistillationCallback(self.distiller)
        self.add_callback(self.kd_callback)
        if getattr(self, "optimizer", None) is not None:  # enable_distillation after the optimizer exists
            self._kd_add_param_group(self.optimizer, replacing=None if previous is None else previous.distiller)

    def _kd_uninstall(self, setup: _DistillationSetup, *, keep_teacher: bool) -> None:
        """Remove a previous setup's callback and forward hooks (its optimizer group is replaced on install)."""
        self.remove_callback(self.kd_callback)
        setup.student_capture.remove()
        if not keep_teacher and isinstance(setup.teacher, LiveTeacher):
            setup.teacher.close()

    def _kd_prepare_teacher(self, source: TeacherSource) -> TeacherSource:
        """Under FSDP / DeepSpeed a live teacher (not ``self``: that is the student) is wrapped by the accelerator's
        setup (:func:`~kd_plugins.integrations.sharding.prepare_teacher`); elsewhere it stays as it is."""
        accelerator = getattr(self, "accelerator", None)
        if not isinstance(source, LiveTeacher) or source.is_self or sharded_kind(accelerator) is None:
            return source
        return LiveTeacher(prepare_teacher(source.model, accelerator), info=source.info)

    def _kd_probe_params(self, step: int) -> list[Tensor] | None:
        """The gradient-aware scheduler's shared parameters for this step. Under FSDP they are resolved again after
        the student's forward (the wrapper replaced the ones resolved at setup) on the steps that probe, and refused
        when FSDP resharded them (:func:`~kd_plugins.distributed.probe_parameters`)."""
        if sharded_kind(getattr(self, "accelerator", None)) != "fsdp":
            return self._kd_shared_params
        if not self.distiller.scheduler.needs_gradients(step):
            return None
        return probe_parameters(_shared_params(self.model, self.kd_config.shared_params))

    def _kd_teacher_argument(self, teacher: Any, config: KDConfig) -> Any:
        if config.teacher_cache is not None:
            if teacher is not None:
                raise ConfigError(
                    f"both teacher={_describe(teacher)} and teacher_cache={config.teacher_cache!r} (KD config) are "
                    "given; pass one teacher: drop teacher= to train from the cache, or teacher_cache to run the teacher"
                )
            from kd_plugins.integrations.teacher_cache import TeacherCache, TeacherCacheError

            if not os.path.isdir(config.teacher_cache):
                raise TeacherCacheError(f"teacher_cache={config.teacher_cache!r} does not exist (no folder "
                                        f"{os.path.abspath(config.teacher_cache)}); build it with `kd-plugins "
                                        "cache-teacher --out DIR`")
            return TeacherCache(config.teacher_cache)
        if teacher is None:
            teacher = getattr(self, "teacher_model", None)  # TRL's DistillationTrainer keeps its own teacher
        if teacher is None:
            raise ConfigError("distillation needs a teacher: pass teacher=<model, path, 'self', a teacher cache folder "
                              "or a TeacherCache>, or name teacher_cache: DIR in the KD config")
        return teacher

    def _kd_cross_tokenizer(self, source: TeacherSource, teacher: Any, teacher_tokenizer: Any,
                            config: KDConfig) -> CrossTokenizer | None:
        """With ``cross_tokenizer: true``: the :class:`CrossTokenizer` that gives the teacher its own tokenization
        (None when both tokenizers are one); see :mod:`kd_plugins.integrations.cross_tokenizer`. A cross-tokenizer
        teacher cache reads like a live teacher: its tokenizer is the one saved in it (or ``teacher_tokenizer=``),
        and both tokenizers must be the ones it was written with."""
        if not config.cross_tokenizer:
            return None
        from kd_plugins.integrations.teacher_cache import TeacherCache

        student_tokenizer = tokenizer_of(getattr(self, "processing_class", None))
        kind = "self" if isinstance(source, LiveTeacher) and source.is_self else (
            "model" if isinstance(source, LiveTeacher) else "cache")
        if kind == "model":
            teacher_tokenizer = teacher_tokenizer_of(teacher, teacher_tokenizer)
        elif isinstance(source, TeacherCache) and source.cross_tokenizer:
            teacher_tokenizer = (load_tokenizer(teacher_tokenizer) if teacher_tokenizer is not None
                                 else source.teacher_tokenizer())
            source.check_tokenizers(student_tokenizer, teacher_tokenizer)
            kind = "model"  # the cache holds the teacher's outputs on its own tokenization
        else:
            teacher_tokenizer = None
        args = getattr(self, "args", None)
        padding_free = bool(getattr(args, "padding_free", False) or getattr(args, "packing", False))
        return cross_tokenizer_for(student_tokenizer, teacher_tokenizer, teacher_kind=kind, padding_free=padding_free)

    def _kd_shared_vocabulary(self, source: TeacherSource, teacher: Any, teacher_tokenizer: Any,
                              student_info: ModelInfo, teacher_info: ModelInfo, *, needs_logits: bool) -> int | None:
        """Compare the tokenizers (see :mod:`kd_plugins.integrations.vocabulary`); the shared vocabulary when one
        tokenizer's models pad it to different sizes, else None."""
        student_tokenizer = tokenizer_of(getattr(self, "processing_class", None))
        if isinstance(source, LiveTeacher) and source.is_self:
            return None  # the student's own base: one model, one tokenizer
        if not isinstance(source, LiveTeacher):
            from kd_plugins.integrations.teacher_cache import TeacherCache

            if isinstance(source, TeacherCache):  # a cache records the hash of the tokenizer it was built with
                return self._kd_check_cache_tokenizer(source, student_tokenizer, student_info, teacher_info,
                                                      needs_logits)
            return shared_vocabulary(student_tokenizer, None, student_info, teacher_info, needs_logits=needs_logits)
        teacher_tokenizer = teacher_tokenizer_of(teacher, teacher_tokenizer)
        return shared_vocabulary(student_tokenizer, teacher_tokenizer, student_info, teacher_info,
                                 needs_logits=needs_logits)

    def _kd_check_cache_tokenizer(self, cache, student_tokenizer, student_info, teacher_info, needs_logits) -> None:
        from kd_plugins.integrations.teacher_cache import tokenizer_hash
        from kd_plugins.integrations.vocabulary import CROSS_TOKENIZER_NOT_CONFIGURED

        recorded = cache.manifest.get("tokenizer_hash", "none")
        if cache.cross_tokenizer:
            raise IncompatibleModelsError(
                f"teacher cache {cache.path} is a cross-tokenizer cache (it holds the teacher's outputs on its own "
                "tokenization of the examples), but the KD config does not set cross_tokenizer: true; set it, with "
                "terms that compare aligned spans")
        if student_tokenizer is not None and recorded != "none" and tokenizer_hash(student_tokenizer) != recorded:
            raise IncompatibleModelsError(
                f"teacher cache {cache.path} was built with another tokenizer than the student's (tokenizer hash "
                f"{recorded[:12]}... != {tokenizer_hash(student_tokenizer)[:12]}...; the hash covers the vocabulary and "
                f"the special tokens). {CROSS_TOKENIZER_NOT_CONFIGURED}; or rebuild the cache with the student's "
                "tokenizer (`kd-plugins cache-teacher`)"
            )
        if needs_logits and student_info.vocab_size != teacher_info.vocab_size:
            raise IncompatibleModelsError(
                f"teacher cache {cache.path} holds top-k log-probs over the teacher's vocab_size="
                f"{teacher_info.vocab_size}, the student has vocab_size={student_info.vocab_size}: cached top-k rows "
                "cannot be restricted to a shared vocabulary; use the live teacher (teacher=<model or path>), whose "
                "padded vocabulary is compared on the shared real tokens"
            )
        return None

    def _kd_check_cache_coverage(self, source: TeacherSource, requirements: Requirements,
                                 cross: CrossTokenizer | None = None) -> TeacherSource:
        """A teacher cache must hold every training row before the first step (see
        :mod:`kd_plugins.integrations.cache_coverage`): with ``cross``, each row's teacher tokenization, the ids the
        steps will look up (the student's special tokens, such as an appended EOS, are not part of it)."""
        from kd_plugins.integrations.teacher_cache import TeacherCache

        if not isinstance(source, TeacherCache):
            return source
        sequences = training_sequences(getattr(self, "train_dataset", None))
        if sequences is None:
            logger.warning("kd_plugins: the training data cannot be listed up front (an iterable dataset?), so the "
                           "teacher cache is checked batch by batch")
            return source
        if cross is not None:
            rows = [row for row in cross.teacher_sequences(sequences) if row]  # a row of special tokens: none
            return check_cache_covers(source, rows, eos_token_id=None, requirements=requirements)
        tokenizer = tokenizer_of(getattr(self, "processing_class", None))
        eos = None if tokenizer is None else tokenizer.eos_token_id
        return check_cache_covers(source, sequences, eos_token_id=eos, requirements=requirements)

    @staticmethod
    def _kd_has_logit_terms(config: KDConfig) -> bool:
        from kd_plugins.plugins import family_of

        return any(family_of(t.name) == "logit" for t in config.terms)

    # --- optimizer ----------------------------------------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._kd_add_param_group(self.optimizer)
        return optimizer

    def _kd_add_param_group(self, optimizer, *, replacing: Distiller | None = None) -> None:
        """Add the Distiller's trainable parameters as their own group, or -- replacing a previous Distiller --
        put them in its group (same position, so the learning-rate scheduler's per-group base rates still line up)
        and drop the old parameters' optimizer state."""
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        lr = self.kd_config.projector_lr if self.kd_config.projector_lr is not None else self.args.learning_rate
        if replacing is not None:
            old = {id(p) for p in replacing.parameters()}
            for index, group in enumerate(optimizer.param_groups):
                if old and any(id(p) in old for p in group["params"]):
                    for p in group["params"]:
                        optimizer.state.pop(p, None)
                    group["params"] = params
                    group["lr"] = lr
                    if "initial_lr" in group:
                        group["initial_lr"] = lr
                    base_lrs = getattr(getattr(self, "lr_scheduler", None), "base_lrs", None)
                    if isinstance(base_lrs, list) and index < len(base_lrs):
                        base_lrs[index] = lr
                    return
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not params or all(id(p) in present for p in params):
            return
        optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})

    def _clip_grad_norm(self, model):
        """Clip the joint gradient of the student and the Distiller (projectors, learned temperatures, scheduler
        parameters) to ``max_grad_norm``: the Distiller is outside the wrapped model, so the Trainer's own clip
        would leave it out. Returns the joint pre-clip norm (logged as ``grad_norm``). The Distiller's gradients
        are averaged across ranks first, so every rank clips with the same norm. Under FSDP the sharded student's
        norm and the replicated Distiller's are combined (:func:`~kd_plugins.integrations.sharding.clip_jointly`).
        DeepSpeed (its engine clips), XLA and mixed-mesh models keep the Trainer's clip (the Distiller is not
        clipped there)."""
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params or not self._kd_can_clip_jointly(model):
            return super()._clip_grad_norm(model)
        self.kd_callback.average_gradients()
        if sharded_kind(self.accelerator) == "fsdp":
            return clip_jointly(model, params, self.args.max_grad_norm, self.accelerator)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def _kd_can_clip_jointly(self, model) -> bool:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA):
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # verify the checkpoint's KD state before the host loads anything (model, optimizer, scheduler, RNG): a
        # refused resume changes nothing
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if isinstance(folder, (str, os.PathLike)):
            self.kd_callback.read(os.fspath(folder), strict=self.kd_resume_requires_state)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        state = self.kd_callback.read(resume_from_checkpoint, strict=self.kd_resume_requires_state)  # verified first
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if state is not None:
            self.kd_callback.apply(state)
        self._kd_restored_from = os.path.abspath(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # under DeepSpeed the Trainer loads a checkpoint with deepspeed_load_checkpoint, never _load_from_checkpoint:
        # the KD state is restored here then (this runs on every resume, after the model is loaded)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.__dict__.get("_kd_restored_from") == os.path.abspath(checkpoint):
            return
        state = self.kd_callback.read(checkpoint, strict=self.kd_resume_requires_state)
        if state is not None:
            self.kd_callback.apply(state)
        self._kd_restored_from = os.path.abspath(checkpoint)

    # --- the step -----------------------------------------------------------------------------------------

    # Whether the host's compute_loss is the plain causal-LM cross-entropy a logit term can reproduce (a declared
    # trait of the host trainer; KDDistillationTrainer's host loss is a JSD on generated completions).
    kd_host_loss_is_causal_lm_ce = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        window = inputs.pop(WINDOW_TOKENS_KEY, None)
        if not model.training:  # evaluation reports the host's own loss, comparable to a run without KD
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        kd_inputs = self._kd_model_inputs(inputs)  # before the host mutates inputs
        batch = BatchContext.from_inputs(
            labels=kd_inputs.get("labels"), input_ids=kd_inputs.get("input_ids"),
            attention_mask=kd_inputs.get("attention_mask"), position_ids=kd_inputs.get("position_ids"),
            step=self.state.global_step,
        )
        teacher_inputs = kd_inputs
        if self._kd_cross_tokens is not None:  # the teacher reads its own tokenization of the same texts
            teacher_inputs, alignment = self._kd_cross_tokens.teacher_batch(kd_inputs)
            batch = dataclasses.replace(batch, alignment=alignment)
        teacher = self.kd_teacher.capture(teacher_inputs, self._kd_requirements)
        if not all_finite(teacher):
            return self._kd_skip_transfer(model, inputs, batch, return_outputs, num_items_in_batch)
        facts = self._kd_host_facts(model, inputs, kd_inputs, batch, num_items_in_batch, window, return_outputs)
        plan = self.distiller.plan(facts, step=batch.step)
        with self._kd_student_capture.recording():
            host_loss, outputs = self._kd_run_student(plan, model, inputs, kd_inputs, return_outputs,
                                                      num_items_in_batch)
        student = self._kd_student_capture.result()
        self._kd_check_student_graph(student)
        out = self.distiller(student, teacher, batch, plan=plan, task_loss=host_loss,
                             shared_params=self._kd_probe_params(batch.step),
                             reduce=self._kd_cross_rank_mean(contributes=True))
        self._kd_log_step(out, plan)
        return (out.loss, outputs) if return_outputs else out.loss

    def _kd_run_student(self, plan: StepPlan, model, inputs, kd_inputs, return_outputs, num_items_in_batch):
        """``(host loss or None, host outputs or None)``: the host's own ``compute_loss`` (``HOST``), or the backbone
        only, through the model's forward (the LM head runs once, inside the logit terms, or not at all)."""
        if plan.student_mode is StudentMode.HOST:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
            return self._kd_masked_task_loss(loss, kd_inputs), outputs
        run_backbone(model, kd_inputs)
        self._kd_count_host_tokens(kd_inputs)
        return None, None

    def _kd_masked_task_loss(self, loss: Tensor, kd_inputs: Mapping[str, Any]) -> Tensor:
        """The host's loss, except on a micro-batch without a single target: there the host's cross-entropy is 0/0
        (NaN for the ``transformers.Trainer``), which would make the whole step NaN -- and the Trainer logs NaN steps
        as the running mean (0.0 on the first). It is an exact, gradient-free 0 instead, like every transfer term on
        such a batch, and the micro-batch is counted in the logs (``kd/all_masked_micro_batches``)."""
        labels = kd_inputs.get("labels")
        if not isinstance(loss, Tensor) or not isinstance(labels, Tensor) or bool((labels != -100).any()):
            return loss
        self._kd_accumulate({"kd/all_masked_micro_batches": 1.0}, {})
        if bool(torch.isfinite(loss).all()):
            return loss
        if not self.__dict__.get("_kd_masked_warned"):
            self._kd_masked_warned = True
            logger.warning("kd_plugins: a micro-batch at step %d has no target token (all labels -100); its task loss "
                           "is 0 (the host's was %s) and only the transfer terms train on it", self.state.global_step,
                           float(loss.detach()))
        return torch.zeros((), dtype=loss.dtype, device=loss.device)

    def _kd_skip_transfer(self, model, inputs, batch: BatchContext, return_outputs, num_items_in_batch):
        """A step whose teacher outputs are not finite: raise, or train on the host's loss alone."""
        if self.kd_config.on_nonfinite_teacher == "raise":
            raise NonFiniteTeacherError(
                f"teacher outputs contain NaN/inf at step {self.state.global_step}; set "
                "on_nonfinite_teacher: skip to train on the task loss alone for such steps"
            )
        logger.warning("kd_plugins: non-finite teacher outputs at step %d; skipping transfer terms",
                       self.state.global_step)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        # other ranks may run the terms: take part in the scheduler's collectives with no weight
        self.distiller.skip_transfer(batch, task_loss=result[0] if return_outputs else result,
                                     shared_params=self._kd_probe_params(batch.step),
                                     reduce=self._kd_cross_rank_mean(contributes=False))
        self._kd_accumulate({"kd/skipped_steps": 1.0}, {})
        return result

    def _kd_log_step(self, out, plan: StepPlan) -> None:
        """Logged like the Trainer's own loss: losses summed over the window's micro-batches (``plan.log_scale``
        makes the sum the window's value), averaged over optimizer steps; weights and metrics averaged."""
        logs = out.log_dict()
        summed = {k: v * plan.log_scale for k, v in logs.items() if k.startswith("kd/loss/") or k == "kd/transfer"}
        self._kd_accumulate(summed, {k: v for k, v in logs.items() if k not in summed})

    # --- host facts ---------------------------------------------------------------------------------------

    def _kd_host_facts(self, model, inputs, kd_inputs, batch, num_items_in_batch, window, return_outputs) -> HostFacts:
        """What the plan needs to know about this micro-batch (see :class:`~kd_plugins.HostFacts`)."""
        num_items = self._kd_num_items(inputs, num_items_in_batch)
        scaled = self._kd_loss_is_scaled_for_ga(num_items)
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return HostFacts(
            loss_scaled_for_ga=scaled,
            grad_accumulation_steps=max(1, int(ga)),
            num_items_in_batch=num_items,
            items_world_factor=self._kd_world_factor(num_items),
            num_tokens_in_batch=None if window is None else window.count,
            tokens_world_factor=1.0 if window is None else window.world_factor,
            fusable_task_loss=not return_outputs and self._kd_task_loss_is_fusable(
                model, kd_inputs, batch, num_items_in_batch, scaled),
            grad_enabled=torch.is_grad_enabled(),
        )

    def _kd_task_loss_is_fusable(self, model, kd_inputs, batch, num_items_in_batch, scaled_for_ga) -> bool:
        """True when a carrier term's CE reproduces the host's loss on this batch exactly: the host's loss is the
        plain causal-LM CE, with the same normaliser and the same targets, and not the host's own 0/0 convention."""
        if not self.kd_host_loss_is_causal_lm_ce or not self._kd_host_is_plain_ce(model):
            return False
        if not self._kd_full_vocabulary:
            return False  # the logit terms see the shared sub-vocabulary; the host's CE is over the whole head
        if num_items_in_batch is not None and not scaled_for_ga:
            return False  # the CE's normaliser must be the logit terms' (num_items_in_batch only when scaled for GA)
        labels = kd_inputs.get("labels")
        if not isinstance(labels, Tensor):
            return False
        # the host's targets: labels shifted left by one (HF causal-LM convention), -100 at the end; the logit terms
        # see BatchContext.labels, which also cut packed-sequence boundaries -- fuse only when they agree
        host_targets = shift_labels(labels)
        if not torch.equal(batch.labels, host_targets):
            return False
        valid = int((host_targets != -100).sum())
        # an all-masked batch keeps the host's own 0/0 convention (NaN for the Trainer, 0 for TRL)
        return valid > 0 or (num_items_in_batch is not None and float(num_items_in_batch) > 0)

    def _kd_host_is_plain_ce(self, model) -> bool:
        """True when the host's training loss is the model's plain causal-LM cross-entropy. Sharded LM heads (FSDP,
        DeepSpeed, XLA) keep the host's loss: the logit terms read the head weight outside its forward."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
            return False
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

        loss_function = getattr(unwrap_model(model), "loss_function", None)
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
        # valid tokens too (the TOKENS terms' normaliser) and let the count travel with each micro-batch.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        window = self._kd_count_tokens(batch_samples, device)
        if window is not None:
            for batch in batch_samples:
                batch[WINDOW_TOKENS_KEY] = window
        return batch_samples, num_items_in_batch

    def _kd_count_tokens(self, batch_samples: list, device) -> WindowTokens | None:
        """The valid tokens of the accumulation window: attention-mask tokens (every token without a mask) of all
        micro-batches, summed over ranks when ``average_tokens_across_devices`` -- then the world factor undoes DDP's
        gradient averaging, as for logit terms. None when not countable."""
        counts = []
        for batch in batch_samples:
            if not isinstance(batch, MutableMapping):
                return None
            mask = batch.get("attention_mask")
            reference = mask if mask is not None else batch.get("input_ids")
            if not isinstance(reference, Tensor):
                return None
            counts.append(mask.sum() if mask is not None else torch.tensor(reference.numel()))
        if not counts:
            return None
        count = torch.stack([c.to(device) for c in counts]).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            return WindowTokens(self.accelerator.gather(count).sum() / tp, float(self.accelerator.num_processes // tp))
        return WindowTokens(count, 1.0)

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
        return functools.partial(cross_rank_mean, contributes=contributes)

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
        kd_batches_are_dataset_rows = False

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

        def _kd_count_tokens(self, batch_samples: list, device) -> WindowTokens | None:
            return None  # completions are generated after pre-fetching: token-mean terms stay micro-batch means

else:  # pragma: no cover
    KDDistillationTrainer = None  # type: ignore[assignment,misc]


def enable_distillation(trainer: Trainer, *, teacher: Any = None, config: Any, teacher_tokenizer: Any = None) -> Trainer:
    """Upgrade an already-built trainer in place (and return it): its class becomes a subclass with
    :class:`KDTrainerMixin`, then distillation is set up as if it had been constructed with ``teacher=``,
    ``kd_config=`` and ``teacher_tokenizer=``.

    Idempotent: called again on the same trainer (a re-run notebook cell), the new setup *replaces* the previous one
    -- its :class:`DistillationCallback` and forward hooks are removed and its optimizer parameter group is replaced
    -- and a call that is refused leaves the previous setup as it was."""
    teacher_tokenizer_arg = {"teacher_tokenizer": teacher_tokenizer}
    if not isinstance(trainer, KDTrainerMixin):
        cls = type(trainer)
        trainer.__class__ = _kd_class(cls)
        try:
            trainer._kd_setup(teacher, config, **teacher_tokenizer_arg)
        except BaseException:
            trainer.__class__ = cls  # refused: the trainer stays what it was
            raise
        return trainer
    trainer._kd_setup(teacher, config, **teacher_tokenizer_arg)
    return trainer


# --- helpers ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kd_class(cls: type) -> type:
    """The distilling subclass of a trainer class (one per class, so re-upgrading gives the same class)."""
    return type(f"KD{cls.__name__}", (KDTrainerMixin, cls), {"__module__": __name__})


def _is_teacher_cache(source: Any) -> bool:
    from kd_plugins.integrations.teacher_cache import TeacherCache

    return isinstance(source, TeacherCache)


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, (str, os.PathLike)) else type(value).__name__


def _shared_params(student: nn.Module, spec: str) -> list[Tensor]:
    """Resolve ``KDConfig.shared_params`` to student parameters for gradient-aware schedulers.

    ``last_layer`` / ``final_norm`` on a frozen base (LoRA) fall back to what is trainable in the last block; a
    substring that matches no parameter name is refused, naming the closest names."""
    base = unwrap_model(student)
    decoder, prefix = find_decoder(base)
    blocks, _ = decoder_blocks(decoder, prefix)
    if spec == "final_norm":
        params = list(final_norm(decoder, prefix)[0].parameters())
    elif spec == "last_layer":
        params = list(blocks[-1].parameters())
    else:
        names = [name for name, _ in base.named_parameters()]
        params = [p for name, p in base.named_parameters() if spec in name]
        if not params:
            raise ConfigError(_unknown_shared_params_message(spec, names, type(base).__name__))
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        trainable = [p for p in blocks[-1].parameters() if p.requires_grad]
        if spec not in ("final_norm", "last_layer"):
            logger.warning("kd_plugins: shared_params=%r matches only frozen parameters; gradient-aware schedulers "
                           "compare gradients on the trainable parameters of the last block instead", spec)
    return trainable


def _unknown_shared_params_message(spec: str, names: list[str], model: str) -> str:
    candidates: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            for j in range(i + 1, len(parts) + 1):
                candidates.setdefault(".".join(parts[i:j]), name)
    close = difflib.get_close_matches(spec, list(candidates), n=4, cutoff=0.6)
    hint = ("; close matches: " + ", ".join(f"{c!r} (e.g. {candidates[c]!r})" for c in close)) if close else ""
    return (f"shared_params={spec!r} matches no parameter name of the student ({model}, {len(names)} parameters)"
            f"{hint}; use 'last_layer', 'final_norm' or a substring of a parameter name such as {names[-1]!r}")
