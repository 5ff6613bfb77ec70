"""The training setup shared by the main job and ``benchmarks/``: one place for the SFT arguments, the KD-config
placeholders of a derived student, a wall-clock limit and a progress clock.

* :func:`sft_config` -- the ``trl.SFTConfig`` of a CPU distillation run (AdamW with beta2 0.95, cosine schedule
  with linear warm-up, clipping at 1.0, fp32, no checkpointing, no saving, no reporting);
* :func:`resolve_kd_config` -- a KD config dict with ``layers: kept`` and ``warmup_steps: auto`` filled in for a
  student derived from the teacher's blocks;
* :func:`time_limit_callback` -- a ``TrainerCallback`` that stops training after a number of minutes;
* :class:`Clock` -- elapsed-time progress lines.
"""

from __future__ import annotations

import copy
import time
from dataclasses import fields
from typing import Any, Mapping, Sequence

__all__ = ["Clock", "no_checkpointing", "resolve_kd_config", "sft_config", "time_limit_callback"]


def sft_config(
    output_dir: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    block_size: int,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    logging_steps: int | None = None,
    progress_bar: bool = False,
    **overrides: Any,
):
    """The ``trl.SFTConfig`` every recipe trains with (keyword ``overrides`` win).

    ``steps`` optimizer steps of ``batch_size`` pre-tokenised blocks of ``block_size`` tokens; the learning rate
    warms up linearly over ``warmup_ratio`` of the steps (at least one), then decays on a cosine. ``seed`` sets
    both the model seed and the data order (``data_seed``).
    """
    from trl import SFTConfig

    settings = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, int(round(warmup_ratio * steps))), weight_decay=0.0, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=logging_steps or max(1, steps // 20), save_strategy="no", report_to=[],
        bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, seed=seed, data_seed=seed,
        max_length=block_size, packing=False, disable_tqdm=not progress_bar, **no_checkpointing(SFTConfig),
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def no_checkpointing(config_cls) -> dict[str, bool]:
    """The keyword that turns activation checkpointing off in ``config_cls`` (transformers 5.23 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing``; the old name warns)."""
    names = {f.name for f in fields(config_cls)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}


def resolve_kd_config(
    kd: Mapping[str, Any], kept: Sequence[int], teacher_layers: int, *, steps: int | None = None,
    warmup_ratio: float = 0.1,
) -> dict[str, Any]:
    """A copy of the KD config dict ``kd`` with the placeholders of a derived student filled in.

    * a term's ``layers: kept`` becomes :func:`~kd_plugins.recipes.student.kept_layer_pairs` of the kept teacher
      blocks (student block ``k`` meets the teacher's state just before the next kept block);
    * a scheduler's ``warmup_steps: auto`` becomes ``round(warmup_ratio * steps)`` (``steps`` is then required).
    """
    from kd_plugins.recipes.student import kept_layer_pairs

    data = copy.deepcopy(dict(kd))
    for term in data.get("terms") or []:
        if isinstance(term, dict) and term.get("layers") == "kept":
            term["layers"] = [list(pair) for pair in kept_layer_pairs(kept, teacher_layers)]
    scheduler = data.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("warmup_steps") == "auto":
        if steps is None:
            raise ValueError("scheduler warmup_steps: auto needs the run's number of steps")
        scheduler["warmup_steps"] = int(round(warmup_ratio * steps))
    return data


def time_limit_callback(max_minutes: float, *, say=print):
    """A ``TrainerCallback`` that stops training at the end of the first step after ``max_minutes`` (0: never)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if max_minutes and time.perf_counter() - self.start > 60.0 * max_minutes:
                say(f"--max-minutes {max_minutes:g} reached at step {state.global_step}; stopping")
                control.should_training_stop = True

    return TimeLimit()


class Clock:
    """Progress lines stamped with the time since construction: ``[name  12.3s] text``."""

    def __init__(self, name: str, *, minutes: bool = False):
        self.name = name
        self.minutes = minutes
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        stamp = f"{self.elapsed() / 60:5.1f} min" if self.minutes else f"{self.elapsed():6.1f}s"
        print(f"[{self.name} {stamp}] {text}", flush=True)

    def note(self, text: str) -> None:
        self.say(f"  {text}")
