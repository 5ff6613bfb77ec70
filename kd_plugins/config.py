"""Configuration: flat dataclasses validated on construction, with a dict/YAML round-trip.

Example (YAML)::

    ce_weight: 1.0
    terms:
      - {name: dkd, weight: 1.0, alpha: 1.0, beta: 2.0, temperature: 1.0}
      - {name: contrastive, weight: 0.5, layers: uniform, proj_dim: 256, temperature: 0.07, max_tokens: 1024}
      - {name: attention_relation, weight: 0.5, teacher_layer: -2, student_layer: -1, relation_heads: 8}
    scheduler: {name: linear, warmup_steps: 100}

A term entry is flat: ``name``, ``weight`` and ``label`` are read by kd_plugins; every other key is passed to
the term's builder. ``label`` (default: the name) is the key used in logs; use it to configure one term twice.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from kd_plugins.errors import ConfigError

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_NONFINITE = ("raise", "skip")


def _check_number(owner: str, key: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{owner}: {key}={value!r} is invalid; expected a finite number {bound}")


@dataclass
class TermConfig:
    """One transfer term.

    Attributes:
        name: registered component name (``kd-plugins list`` shows them).
        weight: base weight (>= 0); the scheduler scales it per step.
        label: key in logs and state; defaults to ``name``. Must be unique within a config.
        options: keyword arguments for the term's builder (``temperature``, ``layers``, ...).
    """

    name: str
    weight: float = 1.0
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"terms: name={self.name!r} is invalid; expected a registered term name")
        owner = f"terms[{self.label or self.name}]"
        _check_number(owner, "weight", self.weight)
        if self.label is None:
            self.label = self.name
        if "temperature" in self.options:
            _check_number(owner, "temperature", self.options["temperature"], strict=True)
        for key in ("alpha", "beta"):
            if key in self.options:
                _check_number(owner, key, self.options[key])
        if self.name in ("generalized_jsd",) and "beta" in self.options and self.options["beta"] > 1:
            raise ConfigError(f"{owner}: beta={self.options['beta']!r} is invalid; expected 0 <= beta <= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> "TermConfig":
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"terms: each entry must be a mapping with a 'name' key, got {data!r}")
        data = dict(data)
        if "name" not in data:
            raise ConfigError(f"terms: entry {data!r} has no 'name' key")
        options = dict(data.pop("options", {}) or {})
        name, weight, label = data.pop("name"), data.pop("weight", 1.0), data.pop("label", None)
        options.update(data)
        return cls(name=name, weight=weight, label=label, options=options)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "weight": self.weight}
        if self.label != self.name:
            out["label"] = self.label
        out.update(self.options)
        return out


@dataclass
class SchedulerConfig:
    """The transfer-weight scheduler: a registered name plus its builder's options."""

    name: str = "constant"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"scheduler: name={self.name!r} is invalid; expected a registered scheduler name")
        for key in ("warmup_steps", "every"):
            if key in self.options:
                value = self.options[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(f"scheduler: {key}={value!r} is invalid; expected an integer >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> "SchedulerConfig":
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"scheduler: expected a mapping like {{name: linear, warmup_steps: 100}}, got {data!r}")
        data = dict(data)
        options = dict(data.pop("options", {}) or {})
        name = data.pop("name", "constant")
        options.update(data)
        return cls(name=name, options=options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@dataclass
class KDConfig:
    """Everything kd_plugins needs to know about one distillation run.

    Attributes:
        ce_weight: weight of the host trainer's own task (cross-entropy) loss; 0 gives pure distillation.
        terms: transfer terms, each a :class:`TermConfig` (dicts are converted).
        scheduler: :class:`SchedulerConfig` deciding each term's weight per step.
        teacher_dtype: dtype the teacher is loaded or cast to: ``auto`` (the student's), ``float32``,
            ``bfloat16`` or ``float16``.
        projector_lr: learning rate for projectors and other trainable Distiller parameters; None uses the
            trainer's learning rate.
        on_nonfinite_teacher: ``raise`` (default) or ``skip`` the transfer terms of a step whose teacher outputs
            contain NaN/inf.
        shared_params: for gradient-aware schedulers, the student parameters on which per-term gradients are
            compared: ``last_layer`` (default; reached by logit terms, the task loss and alignment terms on the
            last block), ``final_norm`` (reached by logit terms and the task loss only), or a parameter-name substring.
        fuse_task_loss: let the trainer integrations run the student's LM head once per training step (default
            True; same loss and gradients to float rounding). With ``ce_weight: 0`` (and a scheduler that does
            not read the task loss: ``reads_task_loss = False``, every built-in except ``conflict``) the student runs
            its backbone only: no host loss, no LM head, no CE. With ``ce_weight > 0`` and a term that carries the
            task loss (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``dkd``) the host's causal-LM
            cross-entropy is computed by that term's chunked pass over the student's head instead of a second pass,
            in one process and under DDP alike. Steps the optimisation cannot reproduce exactly (another host loss,
            label smoothing, ``return_outputs``, FSDP/DeepSpeed students, ...) run the host's ``compute_loss`` as
            before (see :mod:`kd_plugins.plan`). False: always run the host's ``compute_loss`` (its own metrics, e.g.
            TRL's ``entropy`` and ``mean_token_accuracy``, are logged only then).
        teacher_cache: directory of an offline teacher cache (``kd-plugins cache-teacher``) used as the teacher when
            the trainer is given no ``teacher=``; in a YAML file a relative path resolves from the file's folder.
        allow_config_change_on_resume: resume from a checkpoint whose KD state was saved with another KD
            configuration (default False: such a resume is refused, naming the fields that differ). When True the
            differences are logged, tensors whose name and shape still match are restored and the rest start fresh.
    """

    ce_weight: float = 1.0
    terms: list[TermConfig] = field(default_factory=list)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    teacher_dtype: str = "auto"
    projector_lr: float | None = None
    on_nonfinite_teacher: str = "raise"
    shared_params: str = "last_layer"
    fuse_task_loss: bool = True
    teacher_cache: str | None = None
    allow_config_change_on_resume: bool = False

    def __post_init__(self) -> None:
        _check_terms_is_a_list(self.terms)
        self.terms = [t if isinstance(t, TermConfig) else TermConfig.from_dict(t) for t in (self.terms or [])]
        if not isinstance(self.scheduler, SchedulerConfig):
            self.scheduler = SchedulerConfig.from_dict(self.scheduler)
        _check_number("KDConfig", "ce_weight", self.ce_weight)
        if self.teacher_dtype not in _DTYPES:
            raise ConfigError(f"KDConfig: teacher_dtype={self.teacher_dtype!r} is invalid; expected one of {_DTYPES}")
        if self.on_nonfinite_teacher not in _NONFINITE:
            raise ConfigError(
                f"KDConfig: on_nonfinite_teacher={self.on_nonfinite_teacher!r} is invalid; expected one of {_NONFINITE}"
            )
        if self.projector_lr is not None:
            _check_number("KDConfig", "projector_lr", self.projector_lr, strict=True)
        if not isinstance(self.fuse_task_loss, bool):
            raise ConfigError(
                f"KDConfig: fuse_task_loss={self.fuse_task_loss!r} is invalid; expected true (default: run the "
                "student's LM head once per step) or false (always run the host trainer's own loss)"
            )
        labels = [t.label for t in self.terms]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(
                f"KDConfig: terms {duplicates} appear more than once; give each copy a distinct 'label'"
            )
        if not self.terms and self.ce_weight == 0:
            raise ConfigError("KDConfig: no terms and ce_weight=0 leaves nothing to train; add a term or set ce_weight")
        if self.ce_weight == 0 and all(t.weight == 0 for t in self.terms):
            raise ConfigError(
                f"KDConfig: every term weight is 0 ({', '.join(f'{t.label}: {t.weight!r}' for t in self.terms)}) and "
                "ce_weight=0, so nothing would be trained (loss 0, gradient 0 at every step); give a term a weight > 0 "
                "or set ce_weight > 0"
            )
        if self.teacher_cache is not None and not (isinstance(self.teacher_cache, (str, os.PathLike))
                                                   and str(self.teacher_cache)):
            raise ConfigError(f"KDConfig: teacher_cache={self.teacher_cache!r} is invalid; expected the path of a "
                              "teacher cache directory (built with `kd-plugins cache-teacher`) or null")
        if self.teacher_cache is not None:
            self.teacher_cache = os.fspath(self.teacher_cache)
        if not isinstance(self.allow_config_change_on_resume, bool):
            raise ConfigError(f"KDConfig: allow_config_change_on_resume={self.allow_config_change_on_resume!r} is "
                              "invalid; expected true or false")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KDConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"KDConfig: expected a mapping of KD settings (ce_weight, terms, scheduler, ...), got "
                              f"{type(data).__name__} {data!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed), key=str)
        if unknown:
            hints = [f"{key!r} -> did you mean {close[0]!r}?" for key in unknown
                     if (close := difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6))]
            raise ConfigError(f"KDConfig: unknown keys {unknown}{' (' + '; '.join(hints) + ')' if hints else ''}; "
                              f"allowed keys: {sorted(allowed)}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, source: str | Path) -> "KDConfig":
        """Load from a YAML file path or a YAML string (safe loading only).

        A ``Path``, or a one-line string naming an existing file or ending in ``.yaml`` / ``.yml``, is a file: a missing
        file, a directory, a YAML syntax error (with its line and column) or a file that holds no mapping is a
        :class:`~kd_plugins.ConfigError` naming the file. A relative ``teacher_cache`` in a file resolves from the
        file's folder.

        Raises:
            ConfigError: the file does not exist or cannot be parsed, or the settings are invalid.
        """
        path = _as_path(source)
        if path is not None:
            where = f"KD config file {str(source)!r}"
            if path.is_dir():
                raise ConfigError(f"{where} is a directory ({path.resolve()}); pass the YAML file inside it")
            if not path.is_file():
                raise ConfigError(f"{where} does not exist (looked for {path.resolve()}); check the path (relative "
                                  f"paths resolve from {Path.cwd()})")
            data = _parse_yaml(path.read_text(), where)
            if data is None:
                data = {}
            if not isinstance(data, Mapping):
                raise ConfigError(f"{where}: expected a mapping of KD settings (ce_weight, terms, scheduler, ...), got "
                                  f"{type(data).__name__} {data!r}")
            cache = data.get("teacher_cache")
            if isinstance(cache, str) and cache and not os.path.isabs(cache):
                data = {**data, "teacher_cache": str(path.resolve().parent / cache)}
            return cls.from_dict(data)
        text = str(source)
        data = _parse_yaml(text, "KD config text")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            if "\n" not in text.strip():
                raise ConfigError(
                    f"kd_config={text!r} is neither an existing file (no such file: {Path(text).resolve()}) nor YAML "
                    f"text for a mapping of KD settings (it parses as {type(data).__name__}); check the path"
                )
            raise ConfigError(f"KD config text: expected a mapping of KD settings (ce_weight, terms, scheduler, ...), "
                              f"got {type(data).__name__} {data!r}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "terms":
                value = [t.to_dict() for t in value]
            elif f.name == "scheduler":
                value = value.to_dict()
            out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _as_path(source: str | Path) -> Path | None:
    """``source`` as a file path, or None when it is YAML text."""
    if isinstance(source, os.PathLike):
        return Path(source)
    text = str(source)
    if "\n" in text.strip() or not text.strip():
        return None
    if text.strip().endswith((".yaml", ".yml")) or Path(text).is_file():
        return Path(text.strip())
    return None


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{position}: {problem}") from exc


def _check_terms_is_a_list(terms: Any) -> None:
    """``terms`` must be a list: a string or one mapping would be read character by character or key by key."""
    if terms is None or isinstance(terms, (list, tuple)):
        return
    if isinstance(terms, str):
        raise ConfigError(
            f"KDConfig: terms={terms!r} is a single string, but terms is a list of terms; write "
            f"`terms: [{terms}]` or `terms: [{{name: {terms}, weight: 1.0}}]`"
        )
    if isinstance(terms, Mapping):
        if "name" in terms:
            entries = [dict(terms)]
            what = "one term's mapping"
        else:  # {dkd: {weight: 1}} -- a mapping of names to options
            entries = [{"name": key, **(value if isinstance(value, Mapping) else {})} for key, value in terms.items()]
            what = "a mapping of names"
        form = yaml.safe_dump(entries, default_flow_style=True, sort_keys=False).strip()
        raise ConfigError(
            f"KDConfig: terms={dict(terms)!r} is {what}, but terms is a list of terms; write `terms: {form}` (in block "
            "YAML, start each entry with '- ')"
        )
    raise ConfigError(f"KDConfig: terms={terms!r} is invalid; expected a list like `terms: [{{name: dkd, weight: 1.0}}]`")
