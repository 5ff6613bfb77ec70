"""The retention suite: how much of the teacher a student keeps, in-domain, out of domain and on downstream tasks.

Three kinds of measurement, each teacher vs student on the same inputs:

* **language modelling per domain** (:data:`DOMAINS`): the in-domain held-out split (``pydoc_heldout``: the first
  blocks of the training corpus's held-out documents -- the blocks every in-domain figure of the main job uses)
  and out-of-domain English that no training path reads (``wikipedia``, ``dialog``: see
  :func:`kd_plugins.recipes.data.load_eval_corpus`; evenly spaced blocks over the whole corpus). Per domain:
  next-token top-1 accuracy, NLL / perplexity, top-1 agreement with the teacher and KL(teacher ‖ student);
* **multiple-choice tasks** (:data:`TASKS`) through lm-evaluation-harness (``lm_eval.simple_evaluate`` on the
  in-memory models, local task YAMLs in ``recipes/tasks``, fully offline): accuracy and length-normalised
  accuracy;
* **retention**, the student's score as a fraction of the teacher's (1.0 = teacher level), see :func:`lm_retention`
  and :func:`task_retention` (for tasks also *above chance*: ``(student - chance) / (teacher - chance)``).

The teacher's side is computed once (:class:`TeacherReference`: its final hidden states per domain -- later
evaluations only re-apply its LM head -- and its task scores), optionally cached on disk under a fingerprint of its
weights, and reused for every student: the main job, ``kd-plugins eval`` (:mod:`kd_plugins.recipes.eval_cli`),
:class:`RetentionCallback` during training and ``benchmarks/retention_rows.py``.

Entry point: :func:`run_suite` -> a JSON-ready report; :func:`report_table` (one Markdown table),
:func:`plot_report` (PNG) and :func:`write_report` (all three files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RETENTION_TARGET = 0.923  # the paper's headline retention, drawn on the plot


@dataclass(frozen=True)
class DomainSpec:
    """One language-modelling domain of the suite."""

    kind: str  # "in_domain" or "out_of_domain"
    description: str
    licence: str


@dataclass(frozen=True)
class TaskSpec:
    """One multiple-choice task of the suite (its YAML is ``recipes/tasks/<name>.yaml``)."""

    chance: float  # expected accuracy of a uniform guess (1 / number of choices)
    description: str
    licence: str


DOMAINS: dict[str, DomainSpec] = {
    "pydoc_heldout": DomainSpec("in_domain", "Python reference-manual topics (pydoc_data), the held-out documents "
                                "of the training corpus (split by document, seed 0)", "PSF License"),
    "wikipedia": DomainSpec("out_of_domain", "English Wikipedia, 97 articles of a 2016 dump shipped as test data "
                            "by the gensim wheel, markup stripped", "CC BY-SA 3.0 / GFDL"),
    "dialog": DomainSpec("out_of_domain", "chatterbot-corpus English conversations (everyday questions and "
                         "answers; technical categories left out)", "BSD-3-Clause"),
}
TASKS: dict[str, TaskSpec] = {
    "kd_wiki_cloze": TaskSpec(0.25, "Wikipedia sentences without their last word; pick it among 4 words",
                              "CC BY-SA 3.0 / GFDL"),
    "kd_dialog_reply": TaskSpec(0.25, "a chatterbot-corpus question; pick its reply among 4 (the others come "
                                "from conversations of other categories)", "BSD-3-Clause"),
}

__all__ = [
    "DOMAINS", "RETENTION_TARGET", "TASKS", "TASKS_DIR", "DomainSpec", "RetentionCallback", "SuiteConfig",
    "TaskSpec", "TeacherReference", "default_cache_dir", "domain_blocks", "evaluate_tasks", "lm_retention",
    "model_fingerprint", "plot_report", "report_table", "run_suite", "summarize", "task_retention", "write_report",
]


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite measures and how much of it.

    Args:
        domains: language-modelling domains (names of :data:`DOMAINS`).
        tasks: multiple-choice tasks (names of :data:`TASKS`); empty: none.
        block_size: tokens per language-modelling block.
        max_blocks: blocks per domain (``block_size - 1`` predicted tokens each).
        task_limit: items per task (``None``: all of them).
        batch_size: blocks per forward pass in the language-modelling part.
        task_batch_size: lm-evaluation-harness batch size.
    """

    domains: tuple[str, ...] = tuple(DOMAINS)
    tasks: tuple[str, ...] = tuple(TASKS)
    block_size: int = 128
    max_blocks: int = 48
    task_limit: int | None = None
    batch_size: int = 8
    task_batch_size: int = 32

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for name, known, what in (("domains", DOMAINS, "domain"), ("tasks", TASKS, "task")):
            unknown = [n for n in getattr(self, name) if n not in known]
            if unknown:
                raise ValueError(f"SuiteConfig.{name}: unknown {what}(s) {unknown}; available: {list(known)}")
        if not self.domains and not self.tasks:
            raise ValueError("SuiteConfig: domains and tasks are both empty; nothing to measure")
        for name, low in (("block_size", 2), ("max_blocks", 1), ("batch_size", 1), ("task_batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"SuiteConfig.{name}={value!r} is invalid; expected an integer >= {low}")
        if self.task_limit is not None and (not isinstance(self.task_limit, int) or self.task_limit < 1):
            raise ValueError(f"SuiteConfig.task_limit={self.task_limit!r} is invalid; expected None or an integer >= 1")


# --- the teacher's side, computed once ----------------------------------------------------------------------


class TeacherReference:
    """The teacher's side of the suite for one :class:`SuiteConfig`, computed once and reused for any student.

    Per domain it keeps the token blocks and the teacher's final hidden states (after the final norm): later
    evaluations apply only the teacher's LM head to them, the same computation as a teacher forward without its
    blocks. Per task it keeps the teacher's lm-evaluation-harness scores. With ``cache_dir`` both are stored on
    disk under :func:`model_fingerprint` of the teacher (and a hash of the blocks / task files), so another
    process with the same teacher skips the teacher's forward passes.

    Args:
        teacher: the frozen teacher (a causal LM with ``get_decoder()`` and ``get_output_embeddings()``).
        tokenizer: the tokenizer of teacher and student.
        config: what to measure.
        cache_dir: folder of the disk cache (``None``: memory only).
        blocks: token blocks per domain, overriding :func:`domain_blocks` (tests, or a caller that has them).
        progress: show progress bars.
    """

    def __init__(self, teacher: nn.Module, tokenizer, config: SuiteConfig = SuiteConfig(), *,
                 cache_dir: str | os.PathLike | None = None, blocks: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 progress: bool = True):
        from kd_plugins.capture import logit_postprocessing

        self.teacher, self.tokenizer, self.config, self.progress = teacher, tokenizer, config, progress
        self.head = teacher.get_output_embeddings()
        self.scale, self.softcap = logit_postprocessing(teacher)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.fingerprint = model_fingerprint(teacher)
        self.blocks: dict[str, Tensor] = {}
        self._hidden: dict[str, dict[bytes, Tensor]] = {}
        self._task_scores: dict[str, dict[str, float]] | None = None
        self.seconds: dict[str, float] = {}
        for name in config.domains:
            given = None if blocks is None else blocks.get(name)
            rows = given if given is not None else domain_blocks(name, tokenizer, block_size=config.block_size,
                                                                 max_blocks=config.max_blocks)
            data = torch.as_tensor([list(b) for b in rows], dtype=torch.long)
            if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
                raise ValueError(f"domain {name!r}: blocks must be (N >= 1, T >= 2) token ids, got {tuple(data.shape)}")
            self.blocks[name] = data

    def domain_teacher(self, name: str) -> nn.Module:
        """A module standing in for the teacher on domain ``name``'s blocks (for
        :func:`~kd_plugins.recipes.evaluation.evaluate_lm`): ``forward(input_ids)`` returns ``.logits`` from the
        stored hidden states; a row that is not one of the domain's blocks raises ``KeyError``."""
        if name not in self._hidden:
            self._hidden[name] = self._load_or_compute_hidden(name)
        return _StoredTeacher(self._hidden[name], self.head, self.scale, self.softcap)

    def task_scores(self) -> dict[str, dict[str, float]]:
        """The teacher's score per task, ``{task: {"acc", "acc_norm", "items"}}`` (computed on first use)."""
        if self._task_scores is None:
            self._task_scores = self._load_or_compute_tasks()
        return self._task_scores

    def prepare(self) -> "TeacherReference":
        """Compute (or load) every domain's hidden states and the task scores now; returns ``self``."""
        for name in self.config.domains:
            self.domain_teacher(name)
        if self.config.tasks:
            self.task_scores()
        return self

    # -- internals --

    def _cache_file(self, kind: str, payload: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return self.cache_dir / self.fingerprint[:16] / f"{kind}-{digest}"

    def _load_or_compute_hidden(self, name: str) -> dict[bytes, Tensor]:
        data = self.blocks[name]
        path = self._cache_file(f"domain-{name}", hashlib.sha256(data.numpy().tobytes()).hexdigest() + str(data.shape))
        if path is not None and path.with_suffix(".pt").is_file():
            stored = torch.load(path.with_suffix(".pt"), weights_only=True)
            if torch.equal(stored["blocks"], data):
                return {row.numpy().tobytes(): h for row, h in zip(data, stored["hidden"])}
        started = time.perf_counter()
        hidden = []
        was_training = self.teacher.training
        self.teacher.eval()
        device = next(self.teacher.parameters()).device
        try:
            with torch.no_grad():
                for batch in _progress(data.split(self.config.batch_size), self.progress,
                                       f"teacher on {name} ({data.shape[0]} blocks)"):
                    out = self.teacher.get_decoder()(input_ids=batch.to(device), use_cache=False).last_hidden_state
                    hidden.append(out.float().cpu())
        finally:
            self.teacher.train(was_training)
        states = torch.cat(hidden)
        self.seconds[f"teacher_{name}"] = time.perf_counter() - started
        if path is not None:
            _atomic_save(path.with_suffix(".pt"), {"blocks": data, "hidden": states})
        return {row.numpy().tobytes(): h for row, h in zip(data, states)}

    def _load_or_compute_tasks(self) -> dict[str, dict[str, float]]:
        import lm_eval

        key = json.dumps({"tasks": {t: _task_digest(t) for t in self.config.tasks}, "limit": self.config.task_limit,
                          "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?"}, sort_keys=True)
        path = self._cache_file("tasks", key)
        if path is not None and path.with_suffix(".json").is_file():
            return json.loads(path.with_suffix(".json").read_text())
        started = time.perf_counter()
        scores = evaluate_tasks(self.teacher, self.tokenizer, self.config.tasks, limit=self.config.task_limit,
                                batch_size=self.config.task_batch_size)
        self.seconds["teacher_tasks"] = time.perf_counter() - started
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(scores, indent=1))
            tmp.replace(path.with_suffix(".json"))
        return scores


def run_suite(student: nn.Module, reference: TeacherReference, *, progress: bool | None = None) -> dict[str, Any]:
    """Measure ``student`` against the teacher of ``reference`` on every domain and task of ``reference.config``.

    Returns a JSON-ready report: ``{"domains": {name: {"kind", "tokens", "teacher", "student", "retention"}},
    "tasks": {name: {"chance", "items", "teacher", "student", "retention"}}, "summary": summarize(...),
    "setup": {...}, "seconds": {...}}``. The student is put in eval mode for the call and restored afterwards.
    """
    from kd_plugins.recipes.evaluation import evaluate_lm

    progress = reference.progress if progress is None else progress
    config = reference.config
    started, started_cpu = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    domains: dict[str, Any] = {}
    for name in config.domains:
        teacher = reference.domain_teacher(name)
        t0 = time.perf_counter()
        metrics = evaluate_lm(student, reference.blocks[name], teacher=teacher, batch_size=config.batch_size,
                              progress=f"student on {name}" if progress else False)
        seconds[f"student_{name}"] = time.perf_counter() - t0
        teacher_metrics = {k[len("teacher_"):]: v for k, v in metrics.items() if k.startswith("teacher_")}
        student_metrics = {k: v for k, v in metrics.items() if not k.startswith("teacher_") and k != "tokens"}
        domains[name] = {
            "kind": DOMAINS[name].kind, "tokens": metrics["tokens"], "blocks": int(reference.blocks[name].shape[0]),
            "teacher": teacher_metrics, "student": student_metrics,
            "retention": lm_retention(student_metrics, teacher_metrics),
        }
    tasks: dict[str, Any] = {}
    if config.tasks:
        teacher_scores = reference.task_scores()
        t0 = time.perf_counter()
        student_scores = evaluate_tasks(student, reference.tokenizer, config.tasks, limit=config.task_limit,
                                        batch_size=config.task_batch_size)
        seconds["student_tasks"] = time.perf_counter() - t0
        for name in config.tasks:
            chance = TASKS[name].chance
            t, s = teacher_scores[name], student_scores[name]
            tasks[name] = {
                "chance": chance, "items": s["items"], "teacher": t, "student": s,
                "retention": {
                    "acc": _ratio(s["acc"], t["acc"]), "acc_above_chance": task_retention(s["acc"], t["acc"], chance),
                    "acc_norm": _ratio(s["acc_norm"], t["acc_norm"]),
                    "acc_norm_above_chance": task_retention(s["acc_norm"], t["acc_norm"], chance),
                },
            }
    seconds.update({k: v for k, v in reference.seconds.items()})
    seconds["suite_wall"] = time.perf_counter() - started
    seconds["suite_cpu"] = time.process_time() - started_cpu
    report = {"domains": domains, "tasks": tasks, "setup": {**asdict(config), "teacher_fingerprint": reference.fingerprint},
              "seconds": seconds}
    report["summary"] = summarize(report)
    return report


# --- retention arithmetic -----------------------------------------------------------------------------------


def lm_retention(student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]:
    """Language-modelling retention of one domain (1.0 = teacher level; keys missing on either side skipped).

    * ``accuracy``: student / teacher top-1 accuracy;
    * ``perplexity``: teacher / student perplexity; ``nll``: teacher / student NLL;
    * ``agreement``: the student's top-1 agreement with the teacher (the teacher agrees with itself: 1);
    * ``kl``: ``exp(-KL(teacher ‖ student))`` (the teacher's own KL is 0, so 1; it is the geometric mean, over
      positions and the teacher's distribution, of the student's probability relative to the teacher's).
    """
    out: dict[str, float] = {}
    if "accuracy" in student and "accuracy" in teacher:
        out["accuracy"] = _ratio(student["accuracy"], teacher["accuracy"])
    if "perplexity" in student and "perplexity" in teacher:
        out["perplexity"] = _ratio(teacher["perplexity"], student["perplexity"])
    if "nll" in student and "nll" in teacher:
        out["nll"] = _ratio(teacher["nll"], student["nll"])
    if "agreement" in student:
        out["agreement"] = float(student["agreement"])
    if "kl_teacher_student" in student:
        out["kl"] = math.exp(-float(student["kl_teacher_student"]))
    return out


def task_retention(student: float, teacher: float, chance: float) -> float:
    """Retention above chance, ``(student - chance) / (teacher - chance)``: 1.0 at the teacher's level, 0.0 at a
    uniform guess, negative below it. NaN when the teacher is not above chance (nothing to retain)."""
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance={chance!r} is invalid; expected 0 <= chance < 1")
    if teacher <= chance:
        return float("nan")
    return (float(student) - chance) / (float(teacher) - chance)


def summarize(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Headline numbers of a :func:`run_suite` report: in-domain and mean out-of-domain top-1 / perplexity /
    agreement / ``exp(-KL)`` retention, and the mean task retention (raw and above chance, on ``acc``)."""
    domains, tasks = report.get("domains", {}), report.get("tasks", {})
    out: dict[str, float | None] = {}
    for kind in ("in_domain", "out_of_domain"):
        rows = [d["retention"] for d in domains.values() if d["kind"] == kind]
        for key, label in (("accuracy", "top1"), ("perplexity", "perplexity"), ("agreement", "agreement"),
                           ("kl", "exp_neg_kl")):
            out[f"{kind}_{label}"] = _mean([r.get(key) for r in rows])
    out["tasks_acc"] = _mean([t["retention"]["acc"] for t in tasks.values()])
    out["tasks_acc_above_chance"] = _mean([t["retention"]["acc_above_chance"] for t in tasks.values()])
    out["tasks_student_acc"] = _mean([t["student"]["acc"] for t in tasks.values()])
    out["tasks_teacher_acc"] = _mean([t["teacher"]["acc"] for t in tasks.values()])
    return out


# --- language-model data and the tasks ----------------------------------------------------------------------


def domain_blocks(name: str, tokenizer, *, block_size: int = 128, max_blocks: int = 48) -> list[list[int]]:
    """The token blocks of domain ``name``.

    ``pydoc_heldout``: the first ``max_blocks`` blocks of the held-out documents (``split_corpus(load_corpus(),
    0.1, seed=0)``: the blocks the main job has always evaluated on). Out-of-domain corpora: ``max_blocks`` blocks
    evenly spaced over the whole corpus's token stream (so every part of it counts, not only its first document).
    """
    from kd_plugins.recipes.data import load_corpus, load_eval_corpus, split_corpus, token_blocks

    if name not in DOMAINS:
        raise ValueError(f"domain {name!r} is unknown; available: {list(DOMAINS)}")
    if name == "pydoc_heldout":
        heldout = split_corpus(load_corpus("pydoc_topics"), heldout_fraction=0.1, seed=0)[1]
        return token_blocks(heldout, tokenizer, block_size=block_size, max_blocks=max_blocks)
    blocks = token_blocks(load_eval_corpus(name), tokenizer, block_size=block_size)
    if len(blocks) <= max_blocks:
        return blocks
    stride = len(blocks) / max_blocks
    return [blocks[int((i + 0.5) * stride)] for i in range(max_blocks)]


def evaluate_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                   batch_size: int = 32, tasks_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Score ``model`` on the multiple-choice ``tasks`` with lm-evaluation-harness, offline.

    ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model, tokenizer=tokenizer)`` with a ``TaskManager`` that
    sees only the task YAMLs of ``tasks_dir`` (default: the shipped ``recipes/tasks``; their relative
    ``data_files`` are resolved against that folder). ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set for the
    call. The model's train/eval mode is restored afterwards.

    Returns:
        ``{task: {"acc", "acc_norm", "acc_stderr", "items"}}`` (``acc_stderr`` = the binomial standard error).

    Raises:
        ImportError: ``lm-eval`` is not installed (``pip install 'kd_plugins[eval]'``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the task part of the retention suite needs lm-evaluation-harness: "
                          "pip install 'kd_plugins[eval]'  (or: pip install lm-eval)") from exc
    tasks = list(tasks)
    source = Path(tasks_dir) if tasks_dir is not None else TASKS_DIR
    was_training = model.training
    device = next(model.parameters()).device
    with _offline(), tempfile.TemporaryDirectory(prefix="kd_tasks_") as include:
        for name in tasks:
            _materialise_task(source / f"{name}.yaml", Path(include))
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
            manager = TaskManager(include_path=include, include_defaults=False, verbosity="ERROR")
            results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
        finally:
            model.train(was_training)
    out = {}
    for name in tasks:
        row = results["results"][name]
        items = int(results["n-samples"][name]["effective"])
        acc = float(row["acc,none"])
        out[name] = {"acc": acc, "acc_norm": float(row["acc_norm,none"]),
                     "acc_stderr": math.sqrt(acc * (1 - acc) / items) if items else float("nan"), "items": items}
    return out


# --- report: table, plot, files -----------------------------------------------------------------------------


def report_table(report: Mapping[str, Any]) -> str:
    """One Markdown table: a row per domain (top-1) and per task (accuracy), teacher vs student and retention."""
    lines = ["| domain / task | kind | score | teacher | student | retention | above chance | ppl teacher → student "
             "| top-1 agreement | KL(t‖s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in report.get("domains", {}).items():
        t, s, r = d["teacher"], d["student"], d["retention"]
        lines.append(f"| {name} | {d['kind'].replace('_', '-')} | top-1 | {t['accuracy']:.1%} | {s['accuracy']:.1%} | "
                     f"{_pct(r['accuracy'])} | – | {t['perplexity']:.1f} → {s['perplexity']:.1f} | "
                     f"{s['agreement']:.1%} | {s['kl_teacher_student']:.3f} |")
    for name, k in report.get("tasks", {}).items():
        t, s, r = k["teacher"], k["student"], k["retention"]
        lines.append(f"| {name} ({k['items']} items) | task | acc (chance {k['chance']:.0%}) | {t['acc']:.1%} | "
                     f"{s['acc']:.1%} ± {s['acc_stderr']:.1%} | {_pct(r['acc'])} | {_pct(r['acc_above_chance'])} | – | – | – |")
    return "\n".join(lines)


def summary_line(report: Mapping[str, Any]) -> str:
    """The headline in one sentence (in-domain, out-of-domain and task retention)."""
    s = report.get("summary") or summarize(report)
    parts = []
    if s.get("in_domain_top1") is not None:
        parts.append(f"in-domain top-1 retention {_pct(s['in_domain_top1'])}")
    if s.get("out_of_domain_top1") is not None:
        parts.append(f"out-of-domain {_pct(s['out_of_domain_top1'])} (perplexity retention "
                     f"{_pct(s['out_of_domain_perplexity'])}, agreement {_pct(s['out_of_domain_agreement'])})")
    if s.get("tasks_acc") is not None:
        parts.append(f"tasks {_pct(s['tasks_student_acc'])} vs teacher {_pct(s['tasks_teacher_acc'])}: "
                     f"{_pct(s['tasks_acc'])} raw, {_pct(s['tasks_acc_above_chance'])} above chance")
    return "; ".join(parts)


def plot_report(report: Mapping[str, Any], path: str | os.PathLike, *, title: str = "retention suite") -> Path:
    """Two panels: teacher vs student score per domain (top-1) and task (accuracy, chance marked); retention per
    domain (top-1, perplexity) and task (raw, above chance) against the 92.3 % target. Written with matplotlib's
    Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    domains, tasks = report.get("domains", {}), report.get("tasks", {})
    names = list(domains) + list(tasks)
    teacher = [d["teacher"]["accuracy"] for d in domains.values()] + [k["teacher"]["acc"] for k in tasks.values()]
    student = [d["student"]["accuracy"] for d in domains.values()] + [k["student"]["acc"] for k in tasks.values()]
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(names) + 4), 4.8), dpi=100)
    left.bar([i - 0.2 for i in x], [100 * v for v in teacher], 0.4, label="teacher", color="tab:gray")
    left.bar([i + 0.2 for i in x], [100 * v for v in student], 0.4, label="student", color="tab:blue")
    for i, k in enumerate(tasks.values(), start=len(domains)):
        left.hlines(100 * k["chance"], i - 0.45, i + 0.45, colors="tab:red", linestyles=":",
                    label="chance" if i == len(domains) else None)
    left.set_xticks(list(x), [f"{n}\n({'task' if n in tasks else domains[n]['kind'].replace('_', '-')})" for n in names],
                    fontsize="small")
    left.set_ylabel("top-1 accuracy (domains) / accuracy (tasks), %")
    left.set_title("teacher vs student")
    left.legend(fontsize="small")
    first = [d["retention"]["accuracy"] for d in domains.values()] + [k["retention"]["acc"] for k in tasks.values()]
    second = [d["retention"]["perplexity"] for d in domains.values()] + \
             [k["retention"]["acc_above_chance"] for k in tasks.values()]
    right.bar([i - 0.2 for i in x], [100 * _finite(v) for v in first], 0.4, color="tab:blue",
              label="top-1 (domains) / raw accuracy (tasks)")
    right.bar([i + 0.2 for i in x], [100 * _finite(v) for v in second], 0.4, color="tab:orange",
              label="perplexity (domains) / above chance (tasks)")
    right.axhline(100 * RETENTION_TARGET, color="tab:red", linestyle="--", label="target 92.3 %")
    right.set_xticks(list(x), names, fontsize="small")
    right.set_ylabel("retention, % of teacher")
    right.set_title("retention")
    right.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike, *, stem: str = "retention",
                 title: str = "retention suite") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (table + summary line + plot link) and ``<stem>.png`` into
    ``out_dir``; returns their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
    plot_report(report, paths["png"], title=title)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_json_default))
    tmp.replace(paths["json"])
    paths["md"].write_text(f"# {title}\n\n{report_table(report)}\n\n{summary_line(report)}\n\n"
                           f"![retention]({paths['png'].name})\n")
    return paths


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of a model's class, config and weights (a strided sample of every parameter), for cache keys:
    the same checkpoint gives the same fingerprint in any process; a trained or different model another one."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            digest.update(name.encode() + str(tuple(param.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$KD_PLUGINS_CACHE/retention``, else ``~/.cache/kd_plugins/retention``."""
    root = os.environ.get("KD_PLUGINS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kd_plugins") / "retention"


# --- the training callback ----------------------------------------------------------------------------------


class RetentionCallback(TrainerCallback):
    """Runs a cheap subset of the suite every ``every`` optimizer steps during training and logs it through the
    trainer's own logs (``trainer.log``: ``state.log_history``, the console, TensorBoard, W&B).

    The teacher's side is computed once, at the first evaluation, and reused. Logged keys (``prefix`` +):
    ``<domain>/top1``, ``<domain>/perplexity``, ``<domain>/agreement``, ``<domain>/kl``, ``<domain>/top1_retention``,
    ``<domain>/perplexity_retention``; with tasks ``<task>/acc``, ``<task>/acc_above_chance``; and ``seconds``.

    Usage::

        callback = RetentionCallback(teacher, tokenizer, every=50)
        trainer.add_callback(callback.attach(trainer))   # or RetentionCallback(..., trainer=trainer)

    Args:
        teacher: the frozen teacher.
        tokenizer: the tokenizer of teacher and student.
        every: evaluate after every ``every``-th optimizer step (and after the last step when ``at_end``).
        config: the subset (default: every domain at 8 blocks, no tasks; tasks are slower -- add them with
            ``SuiteConfig(tasks=("kd_wiki_cloze",), task_limit=50, max_blocks=8)``).
        blocks: token blocks per domain overriding :func:`domain_blocks`.
        trainer: the trainer whose ``log`` receives the metrics (or call :meth:`attach`). Without one, the metrics
            are appended to ``state.log_history`` only, with a warning that loggers such as TensorBoard miss them.
        prefix: key prefix.
        at_end: also evaluate after the last step.
        progress: progress bars for the evaluations (default: only for a long subset -- with tasks, or more than
            16 blocks per domain).
    """

    def __init__(self, teacher: nn.Module, tokenizer, *, every: int = 50, config: SuiteConfig | None = None,
                 blocks: Mapping[str, Sequence[Sequence[int]]] | None = None, trainer=None,
                 prefix: str = "retention/", at_end: bool = True, progress: bool | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RetentionCallback: every={every!r} is invalid; expected an integer >= 1")
        self.teacher, self.tokenizer, self.every = teacher, tokenizer, every
        self.config = config if config is not None else SuiteConfig(tasks=(), max_blocks=8)
        if progress is None:  # progress bars only for a long subset: tasks, or many blocks per domain
            progress = bool(self.config.tasks) or self.config.max_blocks > 16
        self.blocks, self.trainer, self.prefix, self.at_end, self.progress = blocks, trainer, prefix, at_end, progress
        self.reference: TeacherReference | None = None
        self.reports: list[tuple[int, dict]] = []
        self._warned = False

    def attach(self, trainer) -> "RetentionCallback":
        """Log through ``trainer.log`` from now on; returns ``self`` (for ``trainer.add_callback``)."""
        self.trainer = trainer
        return self

    def metrics(self, report: Mapping[str, Any]) -> dict[str, float]:
        """The flat ``{key: value}`` logged for one :func:`run_suite` report."""
        out: dict[str, float] = {}
        for name, d in report["domains"].items():
            s, r = d["student"], d["retention"]
            out.update({f"{self.prefix}{name}/top1": s["accuracy"], f"{self.prefix}{name}/perplexity": s["perplexity"],
                        f"{self.prefix}{name}/agreement": s["agreement"], f"{self.prefix}{name}/kl": s["kl_teacher_student"],
                        f"{self.prefix}{name}/top1_retention": r["accuracy"],
                        f"{self.prefix}{name}/perplexity_retention": r["perplexity"]})
        for name, k in report["tasks"].items():
            out.update({f"{self.prefix}{name}/acc": k["student"]["acc"],
                        f"{self.prefix}{name}/acc_above_chance": k["retention"]["acc_above_chance"]})
        out[f"{self.prefix}seconds"] = report["seconds"]["suite_wall"]
        return out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.max_steps and state.global_step >= state.max_steps
        if state.global_step % self.every and not (self.at_end and last):
            return control
        if self.reports and self.reports[-1][0] == state.global_step:
            return control
        if self.reference is None:
            self.reference = TeacherReference(self.teacher, self.tokenizer, self.config, blocks=self.blocks,
                                              progress=self.progress)
        report = run_suite(model, self.reference, progress=self.progress)
        self.reports.append((state.global_step, report))
        values = self.metrics(report)
        if self.trainer is not None:
            from transformers import Trainer

            # Trainer.log itself, not a subclass's override: TRL's SFTTrainer.log would move its accumulated
            # training metrics (token accuracy, entropy) into this entry and clear them from the next training log
            log = Trainer.log.__get__(self.trainer) if isinstance(self.trainer, Trainer) else self.trainer.log
            log(values)
        else:
            state.log_history.append({**values, "step": state.global_step})
            if not self._warned:
                import warnings

                warnings.warn("RetentionCallback has no trainer (pass trainer= or call attach(trainer)): its metrics "
                              "go to state.log_history only; TensorBoard and other loggers do not see them")
                self._warned = True
        return control


# --- helpers ------------------------------------------------------------------------------------------------


class _StoredTeacher(nn.Module):
    def __init__(self, hidden: dict[bytes, Tensor], head: nn.Module, scale: float, softcap: float | None):
        super().__init__()
        self.hidden, self.head, self.scale, self.softcap = hidden, head, scale, softcap
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # evaluate_lm reads a parameter's device

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        hidden = torch.stack([self.hidden[row.cpu().numpy().tobytes()] for row in input_ids])
        weight = self.head.weight
        logits = self.head(hidden.to(device=weight.device, dtype=weight.dtype))
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return SimpleNamespace(logits=logits)


def _materialise_task(yaml_path: Path, include: Path) -> None:
    """Copy one task YAML into ``include`` with its relative ``data_files`` made absolute (lm-eval resolves them
    against the working directory)."""
    import yaml

    if not yaml_path.is_file():
        raise FileNotFoundError(f"task file {yaml_path} is missing (the shipped tasks live in {TASKS_DIR})")
    config = yaml.safe_load(yaml_path.read_text())
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, rel in list(files.items()):
        path = Path(rel)
        files[split] = str(path if path.is_absolute() else (yaml_path.parent / path).resolve())
        if not Path(files[split]).is_file():
            raise FileNotFoundError(f"{yaml_path.name}: data file {files[split]} is missing "
                                    "(rebuild with python -m kd_plugins.recipes.tasks.build_tasks)")
    (include / yaml_path.name).write_text(yaml.safe_dump(config, sort_keys=False))


def _task_digest(name: str) -> str:
    import yaml

    yaml_path = TASKS_DIR / f"{name}.yaml"
    digest = hashlib.sha256(yaml_path.read_bytes())
    config = yaml.safe_load(yaml_path.read_text())
    for rel in ((config.get("dataset_kwargs") or {}).get("data_files") or {}).values():
        digest.update((yaml_path.parent / rel).read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _atomic_save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _ratio(numerator: float, denominator: float) -> float:
    return float("nan") if denominator == 0 else float(numerator) / float(denominator)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(values) if values else None


def _finite(value: float) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _pct(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (Path, set, tuple)):
        return list(value) if not isinstance(value, Path) else str(value)
    return str(value)
