"""Distillation metrics as local Hugging Face ``evaluate`` modules, loadable offline.

Each metric is a self-contained ``evaluate`` script at ``kd_plugins/metrics/<name>/<name>.py`` (shipped as
package data), so ``evaluate.load`` reads it from disk and never contacts a hub:

* ``top1_agreement`` -- how often the student's top-1 token equals the teacher's.
* ``kl_to_teacher`` -- mean ``KL(p_teacher || p_student)`` per position, from logits or log-probabilities.
* ``retention`` -- the student's score as a fraction of the teacher's (accuracy: ``student / teacher``;
  perplexity and other lower-is-better scores: ``teacher / student``).

Example::

    from kd_plugins import metrics
    agreement = metrics.load("top1_agreement")
    agreement.compute(predictions=student_logits[valid], references=teacher_logits[valid])

``evaluate`` (the ``eval`` extra) is imported only when :func:`load` is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS", "load", "metric_path"]

METRICS = ("kl_to_teacher", "retention", "top1_agreement")
_HERE = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """The path of the ``evaluate`` script of metric ``name`` (usable as ``evaluate.load(str(path))``)."""
    if name not in METRICS:
        raise ValueError(f"unknown kd_plugins metric {name!r}; available: {', '.join(METRICS)}")
    return _HERE / name / f"{name}.py"


def load(name: str, **kwargs: Any):
    """``evaluate.load`` of a bundled metric by name, offline. ``kwargs`` go to ``evaluate.load``."""
    path = metric_path(name)
    try:
        import evaluate
    except ImportError as exc:  # optional dependency: say which extra brings it
        raise ImportError(
            "kd_plugins.metrics.load needs the 'evaluate' package: pip install 'kd_plugins[eval]'"
        ) from exc
    return evaluate.load(str(path), **kwargs)
