"""Teachers: resolve what the user passed (a model, a path, ``"self"`` or a teacher cache) into one
:class:`~kd_plugins.TeacherSource`, and check that teacher and student can be distilled.

``"self"`` makes a PEFT student its own teacher: the frozen base model with the adapters disabled. A live teacher
(:class:`LiveTeacher`) and an offline :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` answer the same
``capture(inputs, requirements)`` call, so a trainer never branches on where the teacher's tensors come from.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from kd_plugins.capture import FeatureCapture, run_backbone, unwrap_model
from kd_plugins.errors import ConfigError, IncompatibleModelsError
from kd_plugins.types import ModelCapture, ModelInfo, Requirements, TeacherSource

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LiveTeacher:
    """A teacher model run on every batch (a :class:`~kd_plugins.TeacherSource`).

    Args:
        model: the frozen teacher; for ``is_self`` the PEFT student itself.
        is_self: the teacher is the student's base model with its adapters disabled (``teacher="self"``).
        info: its :class:`~kd_plugins.ModelInfo` (default: read from the model's config).

    :meth:`capture` runs the model's forward without its LM head (``no_grad``, eval mode, adapters off for ``self``)
    while forward hooks record what the requirements ask for; the hooks are attached by :meth:`prepare` (or the
    first capture) and replaced when the requirements change.
    """

    def __init__(self, model: nn.Module, *, is_self: bool = False, info: ModelInfo | None = None):
        self.model = model
        self.is_self = is_self
        self._info = info if info is not None else model_info(model, "teacher")
        self._capture: FeatureCapture | None = None
        self._requirements: Requirements | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def prepare(self, requirements: Requirements) -> None:
        """Attach the forward hooks ``requirements`` need (raises :class:`~kd_plugins.IncompatibleModelsError` for a
        module layout they cannot be read from), so a problem shows before the first training step."""
        if self._capture is not None and requirements == self._requirements:
            return
        self.close()
        self._capture = FeatureCapture(
            self.model, info=self._info, layers=requirements.teacher_layers,
            qkv_layers=requirements.teacher_qkv_layers, final_hidden=requirements.final_hidden,
        )
        self._requirements = requirements

    def capture(self, inputs: Mapping[str, Any], requirements: Requirements) -> ModelCapture:
        self.prepare(requirements)
        with self.forward_context(), self._capture.recording():
            run_backbone(self.model, inputs)
            return self._capture.result()  # inside the context: a 'self' teacher's head has its adapters off

    def close(self) -> None:
        """Detach the forward hooks."""
        if self._capture is not None:
            self._capture.remove()
        self._capture, self._requirements = None, None

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Everything a teacher forward must run inside: ``no_grad``, eval mode, adapters off for ``self``."""
        was_training = self.model.training
        with torch.no_grad():
            self.model.eval()
            try:
                if self.is_self:
                    with self.model.disable_adapter():
                        yield
                else:
                    yield
            finally:
                self.model.train(was_training)


def resolve_teacher(
    teacher: Any,
    student: nn.Module,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
) -> TeacherSource:
    """Turn ``teacher`` into a :class:`~kd_plugins.TeacherSource`: a frozen, eval-mode :class:`LiveTeacher` on the
    student's device, or the given source itself.

    Args:
        teacher: an ``nn.Module``; a model path / hub id (loaded with ``AutoModelForCausalLM.from_pretrained``);
            ``"self"`` for a PEFT student whose base model (adapters disabled) is the teacher; or anything that
            already is a :class:`~kd_plugins.TeacherSource` (e.g. a
            :class:`~kd_plugins.integrations.teacher_cache.TeacherCache`), returned as it is.
        student: the student model (its device and dtype are the defaults).
        dtype: ``auto`` (the student's dtype), ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: passed to ``from_pretrained``; off unless you ask for it.

    Raises:
        ConfigError: ``"self"`` with a student that is not a PEFT model, or an unknown dtype.
    """
    if isinstance(teacher, TeacherSource):
        return teacher
    student_param = next(student.parameters())
    if dtype == "auto":
        target_dtype = student_param.dtype
    elif dtype in _DTYPES:
        target_dtype = _DTYPES[dtype]
    else:
        raise ConfigError(f"teacher_dtype={dtype!r} is invalid; expected 'auto' or one of {sorted(_DTYPES)}")

    if isinstance(teacher, str) and teacher == "self":
        if not (hasattr(student, "disable_adapter") and hasattr(student, "get_base_model")):
            raise ConfigError(
                "teacher='self' needs a PEFT student (its base model with adapters disabled is the teacher), but "
                f"the student is a {type(student).__name__}; pass a teacher model or path, or add a peft_config"
            )
        return LiveTeacher(student, is_self=True)

    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            teacher, dtype=target_dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    elif isinstance(teacher, nn.Module):
        model = teacher
    else:
        raise ConfigError(
            f"teacher={teacher!r} is invalid; expected a model object, a model path / hub id, or 'self'"
        )
    if model is student:
        raise ConfigError("the teacher is the student object itself; use teacher='self' with a PEFT student")

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        logger.info("kd_plugins: freezing %d trainable teacher parameter tensors", len(trainable))
    model.requires_grad_(False)
    model.eval()
    return LiveTeacher(model.to(device=student_param.device, dtype=target_dtype))


def model_info(model: nn.Module, name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a Hugging Face model (PEFT unwrapped)."""
    return ModelInfo.from_config(unwrap_model(model).config, name=name)


def check_compatible(
    student: ModelInfo, teacher: ModelInfo, requirements: Requirements | None = None
) -> None:
    """Raise :class:`IncompatibleModelsError` (naming both sides) if the models cannot be distilled as required.

    Logit-level terms (``requirements.final_hidden``, or ``requirements=None`` meaning "assume logit terms")
    need one vocabulary. Layer indices must exist on both sides.
    """
    needs_logits = requirements is None or requirements.final_hidden
    if needs_logits and student.vocab_size != teacher.vocab_size:
        raise IncompatibleModelsError(
            f"vocabulary mismatch: student {student.name!r} has vocab_size={student.vocab_size}, teacher "
            f"{teacher.name!r} has vocab_size={teacher.vocab_size}; logit-level terms need one shared vocabulary "
            "(use the same tokenizer, or only representation-level terms)"
        )
    if requirements is not None:
        for side, info, layers in (
            ("student", student, requirements.student_layers | requirements.student_qkv_layers),
            ("teacher", teacher, requirements.teacher_layers | requirements.teacher_qkv_layers),
        ):
            bad = sorted(i for i in layers if not 0 <= i < info.num_layers)
            if bad:
                raise IncompatibleModelsError(
                    f"{side} {info.name!r} has {info.num_layers} layers; layers {bad} do not exist"
                )
