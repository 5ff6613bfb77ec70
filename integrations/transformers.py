"""transformers lifecycle glue: :class:`DistillationCallback` saves and restores the Distiller's state
(projectors, learned temperatures, scheduler) with every Trainer checkpoint.

A callback cannot change the loss (it never sees inputs or the loss); that lives in
:mod:`kd_plugins.integrations.trl`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kd_plugins.distiller import Distiller
from kd_plugins.errors import KDError
from kd_plugins.kd_state import state_metadata, verify_kd_state

logger = logging.getLogger(__name__)

KD_STATE_NAME = "kd_state.safetensors"


@dataclass
class KDState:
    """A KD-state file read and verified by :meth:`DistillationCallback.read`, not yet applied.

    Attributes:
        path: the file.
        tensors: ``{name: tensor}`` on CPU.
        differences: configuration differences ``allow_config_change_on_resume`` let through (empty: the file was
            saved with this configuration); a non-empty list means only the fitting tensors are restored.
    """

    path: str
    tensors: dict[str, Tensor]
    differences: list[str] = field(default_factory=list)


class DistillationCallback(TrainerCallback):
    """Writes ``kd_state.safetensors`` into each checkpoint folder and restores it on resume.

    Args:
        distiller: the run's :class:`~kd_plugins.Distiller`.

    It also owns the Distiller's gradient lifecycle, which the Trainer does not see: gradients are averaged
    across ranks before each optimizer step (DDP) and cleared after it. The scheduler's state needs no syncing:
    under DDP the trainer mixin hands the Distiller a ``reduce`` so that every rank's scheduler sees the same
    rank-mean losses and probe gradients, and so computes the same weights and state.

    ``on_save`` writes the state atomically (temporary file, then ``os.replace``) into
    ``output_dir/checkpoint-<global_step>``. :meth:`load` restores it; the trainer mixin calls it when
    ``train(resume_from_checkpoint=...)`` loads a checkpoint.
    """

    def __init__(self, distiller: Distiller):
        self.distiller = distiller
        self._last_saved: str | None = None
        self._averaged = False  # gradients of the current optimizer step already averaged across ranks

    def on_train_begin(self, args, state, control, **kwargs):
        self.distiller.zero_grad(set_to_none=True)
        terms = ", ".join(f"{label} (w={w:g})" for label, w in self.distiller.base_weights.items())
        trainable = sum(p.numel() for p in self.distiller.parameters() if p.requires_grad)
        logger.info(
            "kd_plugins: distilling with %s; scheduler %s; %d trainable distillation parameters",
            terms or "no terms",
            self.distiller.config.scheduler.name,
            trainable,
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.average_gradients()

    def average_gradients(self) -> None:
        """Average the Distiller's gradients across DDP ranks, once per optimizer step.

        The Distiller is not inside the DDP-wrapped model, so DDP does not do it. One collective over every
        trainable parameter (zeros where a rank has no gradient, e.g. it skipped the transfer terms), so every
        rank issues the same collectives. The trainer mixin calls it before gradient clipping (so that every rank
        clips the same joint norm); the call from ``on_pre_optimizer_step`` is then a no-op.
        """
        import torch.distributed as dist

        if self._averaged:
            return
        self._averaged = True
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer zeroes only the model's gradients after the optimizer step; the Distiller's are ours to clear.
        self.distiller.zero_grad(set_to_none=True)
        self._averaged = False

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) and self._last_saved != os.path.abspath(folder):  # the mixin saves it earlier
            self.save(folder)

    def save(self, folder: str) -> str:
        """Write the Distiller state into ``folder`` (with the resolved KD configuration and a checksum in its
        metadata, see :mod:`kd_plugins.kd_state`); return the file path."""
        path = os.path.join(folder, KD_STATE_NAME)
        fd, tmp = tempfile.mkstemp(prefix=".kd_state.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            tensors = self.distiller.kd_state_dict()
            save_file(tensors, tmp, metadata=state_metadata(self.distiller, tensors))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._last_saved = os.path.abspath(folder)
        logger.info("kd_plugins: saved distillation state to %s", path)
        return path

    def read(self, folder: str, *, strict: bool = True) -> KDState | None:
        """Read and verify the Distiller state in ``folder`` without applying it (:meth:`apply` does).

        Returns None (with a warning) when the file is absent and ``strict`` is False.

        Raises:
            FileNotFoundError: the file is absent and ``strict`` (the message names the file).
            KDError: the file is unreadable or corrupt (its checksum does not match; the message names the file).
            ConfigError: it was saved with another KD configuration (the message lists the differing fields; set
                ``allow_config_change_on_resume: true`` to restore what still fits), or its tensors do not fit this
                Distiller (names and shapes).
        """
        path = os.path.join(folder, KD_STATE_NAME)
        if not os.path.isfile(path):
            if strict:
                raise FileNotFoundError(
                    f"{path} not found: this checkpoint has no kd_plugins state (saved without distillation, or "
                    "cut short by a crash), so projectors and scheduler cannot be restored. Resume from another "
                    "checkpoint, or set trainer.kd_resume_requires_state = False to start them fresh."
                )
            logger.warning("kd_plugins: %s not found; projectors and scheduler start fresh", path)
            return None
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as handle:
                metadata = handle.metadata()
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # safetensors' own message names neither the file nor the remedy
            raise KDError(
                f"{path} is unreadable ({type(exc).__name__}: {exc}); it may have been cut short by a crash: "
                "resume from an earlier checkpoint"
            ) from exc
        allow = self.distiller.config.allow_config_change_on_resume
        differences = verify_kd_state(tensors, metadata, self.distiller, where=path, allow_config_change=allow)
        if differences == ["<no configuration stored>"]:
            logger.warning("kd_plugins: %s stores no KD configuration or checksum (written by an older kd_plugins); "
                           "its tensors fit this run and are restored", path)
            differences = []
        elif differences:
            logger.warning("kd_plugins: %s was saved with another KD configuration (allow_config_change_on_resume):"
                           "\n  %s", path, "\n  ".join(differences))
        return KDState(path=path, tensors=tensors, differences=differences)

    def apply(self, state: KDState) -> None:
        """Load a state returned by :meth:`read` into the Distiller: exactly (the same configuration), or only the
        tensors whose name and shape still fit when the configuration changed (the rest start fresh, logged)."""
        fresh = self.distiller.load_kd_state_dict(state.tensors, partial=bool(state.differences))
        if fresh:
            logger.warning("kd_plugins: %d distillation tensors start fresh (not in %s or another shape): %s",
                           len(fresh), state.path, fresh)
        logger.info("kd_plugins: restored distillation state from %s", state.path)

    def load(self, folder: str, *, strict: bool = True) -> bool:
        """Restore the Distiller state from ``folder`` (:meth:`read`, then :meth:`apply`; nothing is loaded when
        :meth:`read` refuses the file). Returns False when the file is absent and ``strict`` is False."""
        state = self.read(folder, strict=strict)
        if state is None:
            return False
        self.apply(state)
        return True
