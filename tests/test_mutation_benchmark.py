"""benchmarks/mutation.py's bookkeeping of mutmut's results, on fake result files: a ``--recheck`` runs only the
stored survivors, and the results mutmut resets for the mutants it was not asked to run are kept from the snapshot
taken before, so the published counts cover every mutant."""

from __future__ import annotations

import json
from pathlib import Path

from tests._bench import load_benchmark


def _module():
    return load_benchmark("mutation")


def _write_meta(work: Path, codes: dict) -> None:
    meta = work / "mutants" / "kd_plugins" / "functional" / "sparse.py.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))


def test_a_recheck_keeps_the_results_of_the_mutants_it_does_not_run(tmp_path):
    mutation = _module()
    name = "kd_plugins.functional.sparse.x_f__mutmut_{}".format
    # a full run: 1 and 2 killed (exit 1), 3 survived (0), 4 had no tests (33), 5 timed out (-24)
    _write_meta(tmp_path, {name(1): 1, name(2): 1, name(3): 0, name(4): 33, name(5): -24})
    modules = ["kd_plugins/functional/sparse.py"]
    assert mutation._survivor_names(tmp_path, modules) == [name(3), name(4)]
    assert mutation._survivor_names(tmp_path, ["kd_plugins/functional/fused.py"]) == []
    mutation._save_snapshot(tmp_path)
    # mutmut reruns only 3 and 4 and resets the others to "not run" (None): 3 is killed now, 4 still has no tests
    _write_meta(tmp_path, {name(1): None, name(2): None, name(3): 1, name(4): 33, name(5): None})
    statuses = mutation._statuses(tmp_path)
    assert statuses == {name(1): "killed", name(2): "killed", name(3): "killed", name(4): "no tests",
                        name(5): "timeout"}
    result = mutation._collect(tmp_path, modules, [], diffs=False)
    data = result["modules"]["kd_plugins/functional/sparse.py"]
    assert data["counts"] == {"killed": 3, "timeout": 1, "no tests": 1}
    assert data["score"] == 0.8  # (killed + timeout) / all five
    assert [s["name"] for s in data["survivors"]] == [name(4)]
    # a second recheck starts from what the first left
    mutation._save_snapshot(tmp_path)
    _write_meta(tmp_path, {name(1): None, name(2): None, name(3): None, name(4): 1, name(5): None})
    assert set(mutation._statuses(tmp_path).values()) == {"killed", "timeout"}


def test_without_a_snapshot_a_mutant_not_run_is_reported_as_such(tmp_path):
    mutation = _module()
    _write_meta(tmp_path, {"kd_plugins.functional.sparse.x_f__mutmut_1": None})
    assert mutation._statuses(tmp_path) == {"kd_plugins.functional.sparse.x_f__mutmut_1": "not run"}
