"""Mutation testing of the numerical and configuration core with mutmut: a benchmark of the test suite, not a gate.

    .venv/bin/python benchmarks/mutation.py                      # every target below, one after the other
    .venv/bin/python benchmarks/mutation.py --target config      # one target (repeatable)
    .venv/bin/python benchmarks/mutation.py --target functional --module kd_plugins/functional/sparse.py
    .venv/bin/python benchmarks/mutation.py --report-only        # rewrite the reports from the stored results
    .venv/bin/python benchmarks/mutation.py --target functional --recheck --label after   # survivors only, new tests

Each target is a set of modules and the tests that cover them. It is mutated in its own work folder (default
``/tmp/kd_plugins_mutation/<target>``), a copy of ``kd_plugins/`` and ``tests/``: the checkout is never touched,
so the suite can run beside it. ``kd_plugins.integrations`` and ``kd_plugins.recipes`` (mapped to ``integrations/``
and ``recipes/`` by pyproject's package-dir) are not mutated and are imported from the checkout. Runs resume: a
second call tests only the mutants without a result (mutmut keeps them in the work folder) as long as the tests
are unchanged; a change to any file under ``tests/`` (or ``--fresh``) starts the target over, except with
``--recheck``, which keeps every stored result and runs only the survivors against the current tests (adding tests
can only kill more mutants; a test that was weakened needs a full run). mutmut picks, for every mutant, the tests that reached the mutated function.

Writes ``docs/results/mutation.json`` (per target and module: killed, survived, timeout, no-tests, score, and the
surviving mutants with their diffs) and ``docs/results/mutation.md``. The score is
``(killed + timeout) / (killed + timeout + survived + no tests)``. CPU-heavy: run it niced, one target at a time on
a shared machine (``--jobs`` sets mutmut's parallel children, default 1).

Needs the ``mutation`` extra: ``pip install -e '.[mutation]' "torch==2.13.0"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"

# target -> (modules to mutate, tests that cover them). A module that does not exist yet is skipped with a note.
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "config": (["kd_plugins/config.py"], ["tests/test_config.py", "tests/test_bad_input.py"]),
    "functional": (
        ["kd_plugins/functional/_common.py", "kd_plugins/functional/chunked.py", "kd_plugins/functional/kernels.py",
         "kd_plugins/functional/logit.py", "kd_plugins/functional/sparse.py", "kd_plugins/functional/fused.py",
         "kd_plugins/functional/alignment.py", "kd_plugins/functional/cross_vocab.py"],
        ["tests/test_functional_logit.py", "tests/test_cross_vocab.py", "tests/test_functional_sparse.py", "tests/test_functional_fused_ce.py",
         "tests/test_functional_alignment.py", "tests/test_properties.py",
         "tests/test_functional_contracts.py"],
    ),
    "distiller": (["kd_plugins/distiller.py"],
                  ["tests/test_distiller.py", "tests/test_distiller_state.py", "tests/test_bad_input.py", "tests/test_dynamic_schedulers.py",
                   "tests/test_config_errors.py", "tests/test_plan.py"]),
    "plan": (["kd_plugins/plan.py"], ["tests/test_plan.py", "tests/test_distiller.py"]),
}

# mutmut's exit codes (mutmut/stats.py); anything else is "suspicious"
STATUS = {0: "survived", 1: "killed", 3: "killed", 2: "interrupted", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", -9: "segfault"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all targets")
    parser.add_argument("--module", action="append", help="mutate only these files of the target (paths)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kd_plugins_mutation"))
    parser.add_argument("--jobs", type=int, default=1, help="mutmut's parallel children")
    parser.add_argument("--fresh", action="store_true", help="discard stored results of the targets run")
    parser.add_argument("--recheck", action="store_true",
                        help="keep the stored results and run again only the mutants that survived (or had no "
                             "tests), against the checkout's current tests: new tests can only kill more mutants")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the reports from stored results")
    parser.add_argument("--label", default="current", help="name of this run in the reports (e.g. before, after)")
    parser.add_argument("--no-diffs", action="store_true", help="list surviving mutants by name only (faster)")
    args = parser.parse_args(argv)

    report_path = RESULTS / "mutation.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"runs": {}}
    run = report["runs"].setdefault(args.label, {})
    for target in args.target or list(TARGETS):
        modules, tests = TARGETS[target]
        modules = [m for m in modules if not args.module or m in args.module]
        present = [m for m in modules if (REPO / m).is_file()]
        missing = sorted(set(modules) - set(present))
        if missing:
            print(f"[{target}] not in this checkout (yet), skipped: {', '.join(missing)}")
        tests = [t for t in tests if (REPO / t).is_file()]
        if not present:
            continue
        work = args.work_dir / target
        if not args.report_only:
            survivors = _survivor_names(work, present) if args.recheck else []
            if args.recheck and not survivors:
                print(f"[{target}] nothing to recheck: no stored survivors in {work} (run without --recheck first)")
                continue
            if args.recheck:  # mutmut forgets the results of the mutants it is not asked to run: keep them
                _save_snapshot(work)
            _prepare(work, present, tests, fresh=args.fresh, keep=args.recheck)
            started = time.monotonic()
            _mutmut(work, "run", "--max-children", str(args.jobs), *survivors)
            print(f"[{target}] mutmut run took {time.monotonic() - started:.0f} s")
        result = _collect(work, present, tests, diffs=not args.no_diffs)
        if args.module and target in run:  # a partial run updates its modules and keeps the label's others
            result["modules"] = {**run[target]["modules"], **result["modules"]}
        run[target] = result
        _print_summary(target, result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (RESULTS / "mutation.md").write_text(_markdown(report))
    print(f"wrote {report_path.relative_to(REPO)} and docs/results/mutation.md")
    return 0


# --- the work folder -------------------------------------------------------------------------------------------


def _prepare(work: Path, modules: list[str], tests: list[str], *, fresh: bool, keep: bool = False) -> None:
    """A copy of kd_plugins/ and tests/ with a pyproject holding this target's mutmut and pytest settings. Stored
    results are discarded when a test file changed, unless ``keep`` (a recheck of the survivors)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "tests").rglob("*.py")):  # every test file: conftest and helpers matter too
        digest.update(path.read_bytes())
    stamp = work / "tests.sha256"
    if work.exists() and not keep and (fresh or not stamp.exists() or stamp.read_text() != digest.hexdigest()):
        shutil.rmtree(work)  # stored results are only valid for the tests that produced them
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest.hexdigest())
    for folder in ("kd_plugins", "tests"):
        shutil.copytree(REPO / folder, work / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    quoted = lambda items: "[" + ", ".join(json.dumps(i) for i in items) + "]"  # noqa: E731
    (work / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'markers = ["slow: long-running tests", "gpu: needs CUDA"]\n'
        'filterwarnings = ["ignore::DeprecationWarning"]\n\n'
        "[tool.mutmut]\n"
        'source_paths = ["kd_plugins"]\n'
        f"only_mutate = {quoted(modules)}\n"
        'also_copy = ["tests"]\n'
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
    )


SNAPSHOT = "statuses.json"  # the results before a --recheck, which mutmut resets for the mutants it does not run


def _statuses(work: Path) -> dict[str, str]:
    """Every mutant's status: mutmut's stored results over the snapshot taken before a recheck."""
    snapshot = work / SNAPSHOT
    statuses = json.loads(snapshot.read_text()) if snapshot.exists() else {}
    for meta in (work / "mutants").rglob("*.meta"):
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            if code is not None or name not in statuses:
                statuses[name] = "not run" if code is None else STATUS.get(code, "suspicious")
    return statuses


def _save_snapshot(work: Path) -> None:
    (work / SNAPSHOT).write_text(json.dumps({n: s for n, s in _statuses(work).items() if s != "not run"}))


def _survivor_names(work: Path, modules: list[str]) -> list[str]:
    """The stored mutants of ``modules`` that survived or had no tests."""
    dotted = tuple(m[:-3].replace("/", ".") + "." for m in modules)
    return sorted(n for n, s in _statuses(work).items() if n.startswith(dotted) and s in ("survived", "no tests"))


def _mutmut(work: Path, *arguments: str, capture: bool = False) -> str:
    env = {**os.environ, "KD_PLUGINS_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = ["nice", "-n", "5", sys.executable, "-m", "mutmut", *arguments]
    done = subprocess.run(command, cwd=work, env=env, text=True, capture_output=capture, check=False)
    if done.returncode != 0 and not capture:
        raise SystemExit(f"mutmut {' '.join(arguments)} failed in {work} (exit {done.returncode})")
    return done.stdout if capture else ""


# --- results ---------------------------------------------------------------------------------------------------


def _collect(work: Path, modules: list[str], tests: list[str], *, diffs: bool = True) -> dict:
    """Per module: counts by status and the surviving mutants with their diffs, from mutmut's stored results."""
    statuses = _statuses(work)
    per_module: dict[str, dict] = {}
    for module in modules:
        dotted = module[:-3].replace("/", ".")
        mine = {n: s for n, s in statuses.items() if n.startswith(dotted + ".")}
        counts: dict[str, int] = {}
        for status in mine.values():
            counts[status] = counts.get(status, 0) + 1
        survivors = []
        for name in sorted(n for n, s in mine.items() if s in ("survived", "no tests")):
            diff = _trim_diff(_mutmut(work, "show", name, capture=True)) if diffs else ""
            survivors.append({"name": name, "status": mine[name], "diff": diff})
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        tested = killed + counts.get("survived", 0) + counts.get("no tests", 0)
        per_module[module] = {"counts": counts, "score": round(killed / tested, 4) if tested else None,
                              "survivors": survivors}
    return {"tests": tests, "modules": per_module, "when": time.strftime("%Y-%m-%d %H:%M")}


def _trim_diff(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    return "\n".join(lines)


def _print_summary(target: str, result: dict) -> None:
    for module, data in result["modules"].items():
        score = "n/a" if data["score"] is None else f"{100 * data['score']:.1f} %"
        print(f"[{target}] {module}: {data['counts']} score {score}")


def _markdown(report: dict) -> str:
    out = ["# Mutation testing (mutmut)", "",
           "Generated by `benchmarks/mutation.py`. Score = (killed + timeout) / (killed + timeout + survived + no "
           "tests); `not run` mutants are pending (the run was interrupted; rerun to resume).", ""]
    for label, run in report["runs"].items():
        out += [f"## {label}", "", "| module | killed | timeout | survived | no tests | not run | score |",
                "|---|---|---|---|---|---|---|"]
        for target, result in run.items():
            for module, data in result["modules"].items():
                c = data["counts"]
                score = "n/a" if data["score"] is None else f"{100 * data['score']:.1f} %"
                out.append(f"| `{module}` | {c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} | "
                           f"{c.get('no tests', 0)} | {c.get('not run', 0)} | {score} |")
        out.append("")
        for target, result in run.items():
            for module, data in result["modules"].items():
                if not data["survivors"]:
                    continue
                out += [f"### {label}: surviving mutants of `{module}`", ""]
                for survivor in data["survivors"]:
                    out += [f"- `{survivor['name']}` ({survivor['status']})", ""]
                    if survivor["diff"]:
                        out += ["```diff", survivor["diff"], "```", ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
