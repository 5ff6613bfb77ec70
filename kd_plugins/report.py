"""``kd-plugins report RUN_DIR [--out DIR]``: plot per-term transfer losses and dynamic weights of a run.

Reads the Hugging Face Trainer's ``trainer_state.json`` (its ``log_history``) from ``RUN_DIR`` or, when the run
directory has none, from its latest ``checkpoint-*`` folder. kd_plugins logs ``kd/loss/<term>`` (unweighted
per-term losses) and ``kd/weight/<term>`` (the weight the scheduler applied); the host's ``loss`` is plotted
beside them when present. Writes ``kd_losses.png`` and ``kd_weights.png`` (and ``kd_weighted.png``: weight ×
loss per term, showing what each term actually contributed) into ``--out`` (default: ``RUN_DIR/plots``).

Needs matplotlib (the ``eval`` extra); it is imported only when plotting, with the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["ReportError", "find_trainer_state", "kd_series", "main", "write_report"]

LOSS_PREFIX = "kd/loss/"
WEIGHT_PREFIX = "kd/weight/"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

Series = dict[str, list[tuple[int, float]]]


class ReportError(Exception):
    """The run directory has no usable training log (the message says what was looked for)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kd-plugins report``; returns a process exit code (0 ok, 2 no usable log)."""
    parser = argparse.ArgumentParser(
        prog="kd-plugins report",
        description="Plot per-term KD losses and scheduler weights from a run's trainer_state.json.",
    )
    parser.add_argument("run_dir", type=Path, help="training output directory (or one checkpoint-* inside it)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"kd-plugins report: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def write_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the PNGs for ``run_dir`` and return their paths."""
    run_dir = Path(run_dir)
    state_path = find_trainer_state(run_dir)
    history = _load_history(state_path)
    losses, weights, host_loss = kd_series(history)
    if not losses and not weights:
        keys = sorted({k for entry in history for k in entry})
        raise ReportError(
            f"{state_path} has a log history but no kd_plugins keys ({LOSS_PREFIX}<term>, {WEIGHT_PREFIX}<term>); "
            f"keys found: {', '.join(keys) or '(none)'}. Was the run trained with a KD config?"
        )
    out_dir = Path(out) if out is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    written = []
    if losses:
        extra = {"loss (host, total)": host_loss} if host_loss else {}
        written.append(_plot(out_dir / "kd_losses.png", {**losses, **extra}, f"{title}: transfer losses",
                             "loss (unweighted)", log_y=_spans_decades(losses)))
    if weights:
        written.append(_plot(out_dir / "kd_weights.png", weights, f"{title}: scheduler weights", "weight"))
    weighted = _weighted(losses, weights)
    if weighted:
        written.append(_plot(out_dir / "kd_weighted.png", weighted, f"{title}: weight × loss per term",
                             "contribution to the total"))
    return written


def find_trainer_state(run_dir: str | Path) -> Path:
    """``RUN_DIR/trainer_state.json``, else the one in the latest ``checkpoint-<step>``; ReportError if neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    direct = run_dir / STATE_FILE
    if direct.is_file():
        return direct
    checkpoints = sorted(
        (int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    )
    for _, checkpoint in reversed(checkpoints):
        if (checkpoint / STATE_FILE).is_file():
            return checkpoint / STATE_FILE
    raise ReportError(
        f"no {STATE_FILE} in {run_dir} or in any checkpoint-* folder inside it "
        f"(found checkpoints: {[p.name for _, p in checkpoints] or 'none'}); "
        "the Trainer writes it when it saves a checkpoint or finishes training"
    )


def kd_series(history: Sequence[dict]) -> tuple[Series, Series, list[tuple[int, float]]]:
    """Split a log history into ``({term: [(step, loss)]}, {term: [(step, weight)]}, [(step, host loss)])``."""
    losses: Series = {}
    weights: Series = {}
    host: list[tuple[int, float]] = []
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith(LOSS_PREFIX):
                losses.setdefault(key[len(LOSS_PREFIX):], []).append((int(step), float(value)))
            elif key.startswith(WEIGHT_PREFIX):
                weights.setdefault(key[len(WEIGHT_PREFIX):], []).append((int(step), float(value)))
            elif key == "loss":
                host.append((int(step), float(value)))
    return losses, weights, host


# --- helpers ------------------------------------------------------------------------------------------------


def _load_history(state_path: Path) -> list[dict]:
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{state_path} is not valid JSON: {exc}") from exc
    history = state.get("log_history") if isinstance(state, dict) else None
    if not history:
        raise ReportError(f"{state_path} has no log_history entries (was logging_steps larger than the run?)")
    return history


def _weighted(losses: Series, weights: Series) -> Series:
    out: Series = {}
    for term in sorted(set(losses) & set(weights)):
        weight_at = dict(weights[term])
        points = [(step, weight_at[step] * loss) for step, loss in losses[term] if step in weight_at]
        if points:
            out[term] = points
    return out


def _spans_decades(series: Series) -> bool:
    values = [v for points in series.values() for _, v in points]
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > 100


def _plot(path: Path, series: Series, title: str, ylabel: str, log_y: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=name, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
