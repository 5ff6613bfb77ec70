"""transformers lifecycle glue: :class:`DistillationCallback` saves and restores the Distiller's state
(projectors, learned temperatures, scheduler) with every Trainer checkpoint.

A callback cannot change the loss (it never sees inputs or the loss); that lives in
:mod:`kd_plugins.integrations.trl`.
"""

from __future__ import annotations

import logging
import os
import tempfile

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kd_plugins.distiller import Distiller

logger = logging.getLogger(__name__)

KD_STATE_NAME = "kd_state.safetensors"


class DistillationCallback(TrainerCallback):
    """Writes ``kd_state.safetensors`` into each checkpoint folder and restores it on resume.

    Args:
        distiller: the run's :class:`~kd_plugins.Distiller`.

    It also owns the Distiller's gradient lifecycle, which the Trainer does not see: gradients are averaged
    across ranks before each optimizer step (DDP) and cleared after it.

    ``on_save`` writes the state atomically (temporary file, then ``os.replace``) into
    ``output_dir/checkpoint-<global_step>``. :meth:`load` restores it; the trainer mixin calls it when
    ``train(resume_from_checkpoint=...)`` loads a checkpoint.
    """

    def __init__(self, distiller: Distiller):
        self.distiller = distiller

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
        # The Distiller is not inside the DDP-wrapped model: average its gradients across ranks ourselves.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for param in self.distiller.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad.div_(world)

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer zeroes only the model's gradients after the optimizer step; the Distiller's are ours to clear.
        self.distiller.zero_grad(set_to_none=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self.save(folder)

    def save(self, folder: str) -> str:
        """Write the Distiller state into ``folder``; return the file path."""
        path = os.path.join(folder, KD_STATE_NAME)
        fd, tmp = tempfile.mkstemp(prefix=".kd_state.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(self.distiller.kd_state_dict(), tmp, metadata={"format": "pt", "producer": "kd_plugins"})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info("kd_plugins: saved distillation state to %s", path)
        return path

    def load(self, folder: str, *, strict: bool = True) -> bool:
        """Restore the Distiller state from ``folder``. Returns False (with a warning) when the file is absent
        and ``strict`` is False."""
        path = os.path.join(folder, KD_STATE_NAME)
        if not os.path.isfile(path):
            if strict:
                raise FileNotFoundError(
                    f"{path} not found: the checkpoint has no kd_plugins state (was it saved without distillation?)"
                )
            logger.warning("kd_plugins: %s not found; projectors and scheduler start fresh", path)
            return False
        device = next((p.device for p in self.distiller.parameters()), None)
        state = load_file(path, device=str(device) if device is not None else "cpu")
        self.distiller.load_kd_state_dict(state)
        logger.info("kd_plugins: restored distillation state from %s", path)
        return True
