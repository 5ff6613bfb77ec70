"""The ``kd-plugins`` console script.

Subcommands:

* ``kd-plugins list`` -- the registered components of every family and the plugin that provides each (core only:
  no transformers import).
* ``kd-plugins sft [trl sft arguments] [--kd_config KD.yaml] [--teacher_model_name_or_path PATH]`` -- TRL's
  ``trl sft`` with distillation; every ``trl sft`` argument and YAML key works, plus ``kd_config:`` (a path) or
  an inline ``kd:`` block and ``teacher_model_name_or_path:`` in the same ``--config`` YAML.
* ``kd-plugins demo [...]`` -- the SmolLM2 demonstration (``kd_plugins.recipes.main_job``).
* ``kd-plugins eval --student DIR [--teacher smollm2|PATH] [--tasks ...] [--domains ...]`` -- the retention suite
  (in-domain, out-of-domain and lm-evaluation-harness tasks) for a saved student (``kd_plugins.recipes.eval_cli``).
* ``kd-plugins cache-teacher --teacher PATH|smollm2 --data pydoc_topics|PATH --out DIR [--k 64] [--layers ...]``
  -- the offline teacher cache (``kd_plugins.integrations.teacher_cache``).
* ``kd-plugins generate --out DIR [--prompts mixed|instructions|corpus|FILE] ...`` -- teacher-generated distillation
  data and its teacher cache (``kd_plugins.recipes.generate``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

_DELEGATED = {
    "sft": ("kd_plugins.integrations.sft_cli", "TRL's `trl sft` with distillation (all trl sft arguments + KD)"),
    "demo": ("kd_plugins.recipes.main_job", "the SmolLM2 distillation demo"),
    "eval": ("kd_plugins.recipes.eval_cli", "retention suite: a saved student vs its teacher, in and out of domain"),
    "cache-teacher": ("kd_plugins.integrations.teacher_cache", "run a teacher once and cache its top-k log-probs"),
    "report": ("kd_plugins.report", "plot per-term KD losses and scheduler weights of a run"),
    "generate": ("kd_plugins.recipes.generate", "sample distillation data from the teacher and cache the teacher on it"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # their own parsers own --help and every argument
        return _delegate(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.family)
    parser.print_help()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-plugins", description="Knowledge distillation plug-ins for LLMs.")
    commands = parser.add_subparsers(dest="command")
    listing = commands.add_parser("list", help="list registered components per family, with their providers")
    listing.add_argument("--family", choices=("logit", "alignment", "scheduler"), help="only this family")
    for name, (_, help_text) in _DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _list(family: str | None) -> int:
    from kd_plugins.plugins import available_components

    components = available_components()
    for fam, names in components.items():
        if family and fam != family:
            continue
        print(f"{fam}:")
        width = max((len(n) for n in names), default=0)
        for name, provider in names.items():
            print(f"  {name.ljust(width)}  ({provider})")
        if not names:
            print("  (none)")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module_name, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"kd-plugins {command}: {module_name} is not available in this installation.", file=sys.stderr)
            return 2
        if exc.name and exc.name.split(".")[0] in ("transformers", "trl", "peft", "accelerate", "datasets"):
            print(
                f"kd-plugins {command} needs the Hugging Face stack ({exc.name} is missing): "
                "pip install 'kd_plugins[trl]'",
                file=sys.stderr,
            )
            return 2
        raise
    from kd_plugins.errors import KDError

    try:
        result = module.main(argv)
    except KDError as exc:  # a configuration problem: say it plainly, no traceback
        print(f"kd-plugins {command}: {exc}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
