"""Teachers: resolve what the user passed (a model, a path, or ``"self"``) into a frozen teacher, and check that
teacher and student can be distilled.

``"self"`` makes a PEFT student its own teacher: the frozen base model with the adapters disabled.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from kd_plugins.capture import unwrap_model
from kd_plugins.errors import ConfigError, IncompatibleModelsError
from kd_plugins.types import ModelInfo, Requirements

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Teacher:
    """A resolved teacher.

    Attributes:
        model: the teacher model; for ``self`` the PEFT student itself.
        is_self: True when the teacher is the student's base with adapters disabled.
    """

    model: nn.Module
    is_self: bool = False

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
) -> Teacher:
    """Turn ``teacher`` into a frozen, eval-mode :class:`Teacher` on the student's device.

    Args:
        teacher: an ``nn.Module``; a model path / hub id (loaded with ``AutoModelForCausalLM.from_pretrained``);
            or ``"self"`` for a PEFT student whose base model (adapters disabled) is the teacher.
        student: the student model (its device and dtype are the defaults).
        dtype: ``auto`` (the student's dtype), ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: passed to ``from_pretrained``; off unless you ask for it.

    Raises:
        ConfigError: ``"self"`` with a student that is not a PEFT model, or an unknown dtype.
    """
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
        return Teacher(model=student, is_self=True)

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
    return Teacher(model=model.to(device=student_param.device, dtype=target_dtype))


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
