"""Teachers: resolve what the user passed (a model, a path, ``"self"`` or a teacher cache) into one
:class:`~kd_plugins.TeacherSource`, and check that teacher and student can be distilled.

``"self"`` makes a PEFT student its own teacher: the frozen base model with the adapters disabled. A live teacher
(:class:`LiveTeacher`) and an offline :class:`~kd_plugins.integrations.teacher_cache.TeacherCache` answer the same
``capture(inputs, requirements)`` call, so a trainer never branches on where the teacher's tensors come from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
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
        teacher: an ``nn.Module``; a model path / hub id (loaded with ``AutoModelForCausalLM.from_pretrained``); the
            folder of a teacher cache (``kd-plugins cache-teacher``: read as a
            :class:`~kd_plugins.integrations.teacher_cache.TeacherCache`); ``"self"`` for a PEFT student whose base
            model (adapters disabled) is the teacher; or anything that already is a :class:`~kd_plugins.TeacherSource`
            (e.g. a ``TeacherCache``), returned as it is.
        student: the student model (its device and dtype are the defaults).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``. A path is loaded in this dtype (``auto``: the
            student's). A model object is never converted: ``auto`` keeps its own dtype (the losses compute in fp32
            from any input dtype), and an explicit dtype it is not in is refused -- converting it in place would
            change your object, and a converted copy would hold the teacher twice in memory.
        trust_remote_code: passed to ``from_pretrained``; off unless you ask for it.

    A model object is left as you passed it -- dtype, ``requires_grad`` flags and train/eval mode; it runs under
    ``no_grad`` in eval mode for each capture and gets its mode back -- except its device: a teacher on another
    (single) device than the student is moved to the student's device in place, as the Trainer moves the student
    (a copy there would cost the same device memory and keep the original too). A teacher loaded from a path is
    ours: frozen and in eval mode.

    Raises:
        ConfigError: ``"self"`` with a student that is not a PEFT model; an unknown dtype; a model object in another
            dtype than an explicit ``dtype``; a teacher object sharing parameter tensors with the student; a teacher
            path that does not exist or cannot be loaded.
    """
    if isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, os.PathLike):
        teacher = os.fspath(teacher)
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
        if is_teacher_cache(teacher):
            from kd_plugins.integrations.teacher_cache import TeacherCache

            return TeacherCache(teacher)
        model = load_pretrained_teacher(teacher, dtype=target_dtype, trust_remote_code=trust_remote_code,
                                        **from_pretrained_kwargs)
        model.requires_grad_(False)  # ours: loaded for this run
        model.eval()
        return LiveTeacher(model.to(device=student_param.device))
    if not isinstance(teacher, nn.Module):
        raise ConfigError(
            f"teacher={teacher!r} is invalid; expected a model object, a model path / hub id, a teacher cache "
            "folder, or 'self'"
        )
    model = teacher
    if model is student:
        raise ConfigError("the teacher is the student object itself; use teacher='self' with a PEFT student")
    _refuse_shared_parameters(model, student)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if dtype != "auto" and dtypes != [dtype]:
        raise ConfigError(
            f"teacher_dtype={dtype!r}, but the teacher object you passed holds {', '.join(dtypes)} weights; kd_plugins "
            "does not convert your object (in place it would change it, as a copy it would hold the teacher twice in "
            f"memory). Convert it yourself (teacher.to(torch.{dtype})), set teacher_dtype: auto to use it as it is, "
            "or pass its path so it is loaded in that dtype"
        )
    devices = {p.device for p in model.parameters()}
    if len(devices) == 1 and devices != {student_param.device} and not getattr(model, "hf_device_map", None):
        logger.info("kd_plugins: moving the teacher from %s to the student's device %s", devices.pop(),
                    student_param.device)
        model.to(device=student_param.device)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if trainable:
        logger.info("kd_plugins: the teacher runs under no_grad; its %d trainable parameter tensors get no gradient "
                    "(their requires_grad flags are left as they are)", trainable)
    return LiveTeacher(model)


def is_teacher_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``kd-plugins cache-teacher`` (it holds ``manifest.json`` and
    ``index.json``)."""
    folder = Path(path)
    return folder.is_dir() and (folder / "manifest.json").is_file() and (folder / "index.json").is_file()


def looks_like_hub_id(value: str) -> bool:
    """True when ``value`` has the form of a Hugging Face hub repository id (``name`` or ``owner/name``), which
    ``from_pretrained`` would look up on the hub rather than on disk."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", value)) and ".." not in value


def check_model_location(value: str, what: str, *, base: str | os.PathLike | None = None) -> None:
    """Refuse ``value`` (a model, tokenizer or data location) that is neither an existing path nor a hub id: a
    typo in a local path says the path does not exist instead of the hub's ``HFValidationError``. ``base``: the
    folder relative paths were resolved from (named in the message)."""
    if os.path.exists(value) or looks_like_hub_id(value):
        return
    where = f"relative paths resolve from {base}" if base is not None else f"relative paths resolve from {os.getcwd()}"
    raise ConfigError(f"{what}={value!r} does not exist (no such file or folder: {os.path.abspath(value)}; {where}) "
                      "and is not a hub model id; check the path")


def load_pretrained_teacher(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False,
                            **from_pretrained_kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, ...)``, with a :class:`~kd_plugins.ConfigError` naming the path
    when it does not exist or cannot be loaded."""
    from transformers import AutoModelForCausalLM

    check_model_location(path, "teacher")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    except (OSError, ValueError) as exc:
        where = "folder" if os.path.isdir(path) else "hub id"
        raise ConfigError(f"teacher={path!r} could not be loaded as a causal LM (a {where}; {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else exc!r}); check the path") from exc


def _refuse_shared_parameters(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher sharing parameter tensors with the student would change as the student trains."""
    student_storage = {(p.device, p.data_ptr()) for p in student.parameters() if p.numel()}
    shared = [name for name, p in teacher.named_parameters() if p.numel() and (p.device, p.data_ptr()) in student_storage]
    if shared:
        raise ConfigError(
            f"the teacher shares {len(shared)} parameter tensors with the student (e.g. {shared[0]!r}), so training "
            "the student would change the teacher; pass a separate copy (copy.deepcopy(teacher)) or, for a PEFT "
            "student distilled from its own base, teacher='self'"
        )


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
            "(the same tokenizer; one tokenizer padded to different sizes is compared on its shared real tokens when "
            "the trainer knows both tokenizers: processing_class= and teacher_tokenizer=)"
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
