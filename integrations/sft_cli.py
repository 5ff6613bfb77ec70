"""``kd-plugins sft``: TRL's ``trl sft`` script with distillation.

Every ``trl sft`` argument and YAML key is parsed by TRL's own parser (``trl.scripts.sft.make_parser``) and the
run is TRL's own ``trl.scripts.sft.main``, with :class:`~kd_plugins.integrations.trl.KDSFTTrainer` standing in
for ``SFTTrainer`` while it runs. The distillation keys are removed before TRL's parser sees them:

* ``kd_config: path/to/kd.yaml`` or an inline ``kd:`` mapping (a :class:`~kd_plugins.KDConfig`), in the
  ``--config`` YAML or as ``--kd_config PATH``;
* ``teacher_model_name_or_path: PATH`` (or ``self`` with ``use_peft: true``), in the YAML or as
  ``--teacher_model_name_or_path PATH``;
* ``teacher_cache: DIR`` (or ``--teacher_cache DIR``): train from an offline teacher cache instead (``kd-plugins
  cache-teacher``); also accepted as the KD config's ``teacher_cache``;
* ``teacher_tokenizer: PATH`` (or ``--teacher_tokenizer PATH``): the teacher's tokenizer, when it is not saved beside
  the teacher.

**Relative paths in the ``--config`` YAML resolve from the YAML's folder** (like ``kd_config`` always did):
``model_name_or_path``, ``teacher_model_name_or_path``, ``teacher_tokenizer``, ``teacher_cache``, ``kd_config``,
``dataset_name``, ``datasets[].path``, ``chat_template_path``, ``output_dir``, ``logging_dir``,
``resume_from_checkpoint``, ``deepspeed`` and ``fsdp_config``. A value that does not exist there and has the form of a
hub id (``name`` or ``owner/name``) is kept as a hub id; any other missing path is refused, naming it. Paths given as
command-line flags resolve from the working directory, as in any shell command. Unknown YAML keys (``max_stpes``) are
refused, naming the closest known key.

Example::

    kd-plugins sft --config run.yaml
    # run.yaml
    model_name_or_path: ./student
    teacher_model_name_or_path: ./teacher
    dataset_name: ./data
    output_dir: ./out
    kd_config: kd.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from kd_plugins.config import KDConfig
from kd_plugins.errors import ConfigError

_KD_FLAGS = ("--kd_config", "--teacher_model_name_or_path", "--teacher_tokenizer", "--teacher_cache")
_KD_KEYS = ("kd", "kd_config", "teacher_model_name_or_path", "teacher_tokenizer", "teacher_cache")

# how a relative path of each YAML key resolves (from the YAML's folder); see the module docstring
_HUB_OR_PATH = ("model_name_or_path", "teacher_model_name_or_path", "teacher_tokenizer", "dataset_name",
                "chat_template_path")
_OUTPUT_PATH = ("output_dir", "logging_dir")
_EXISTING_PATH = ("kd_config", "teacher_cache", "resume_from_checkpoint", "deepspeed", "fsdp_config")

last_trainer = None  # the most recent trainer built by :func:`main` (for tests and notebooks)


_KD_HELP = """distillation arguments (kd-plugins):
  --kd_config KD_CONFIG  KD configuration YAML (or `kd_config:` / an inline `kd:` block in the --config YAML)
  --teacher_model_name_or_path TEACHER
                        teacher model path or hub id, or `self` (a PEFT student's base, adapters disabled)
  --teacher_cache DIR   train from an offline teacher cache (kd-plugins cache-teacher) instead of a teacher model
  --teacher_tokenizer PATH
                        the teacher's tokenizer, compared with the student's (default: the one beside the teacher)
Relative paths in the --config YAML resolve from the YAML's folder; paths given as flags from the working directory.
"""


def split_kd_arguments(
    argv: Sequence[str], *, require: bool = True
) -> tuple[list[str], dict[str, Any], str | None]:
    """Remove the KD keys from ``argv`` and from the ``--config`` YAML.

    Returns ``(trl_argv, kd_settings, temporary_yaml_path)``: ``trl_argv`` is what TRL's parser gets (its
    ``--config`` points at a copy of the YAML without the KD keys, relative paths resolved from the YAML's folder),
    ``kd_settings`` has ``kd_config`` (a :class:`KDConfig`), ``teacher`` and ``teacher_tokenizer``.

    Raises:
        ConfigError: an unknown YAML key, a path that does not exist, a KD config that cannot be read, no teacher.
    """
    argv = list(argv)
    settings: dict[str, Any] = {}
    for flag in _KD_FLAGS:
        for form in (flag, flag.replace("_", "-")):
            if form in argv:
                index = argv.index(form)
                if index + 1 >= len(argv):
                    raise ConfigError(f"{form} needs a value")
                settings[flag[2:]] = argv[index + 1]
                del argv[index : index + 2]
            prefixed = [a for a in argv if a.startswith(form + "=")]
            for arg in prefixed:
                settings[flag[2:]] = arg.split("=", 1)[1]
                argv.remove(arg)
    if isinstance(settings.get("kd_config"), str):
        settings["kd_config"] = _read_kd_config(settings["kd_config"])
    temporary = None
    if "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1]
        data = _read_run_yaml(path)
        base = os.path.dirname(os.path.abspath(path))
        _refuse_unknown_keys(data, path)
        data = _resolve_paths(data, base, path)
        if "kd" in data and "kd_config" in data:
            raise ConfigError(f"{path}: give either an inline 'kd:' block or 'kd_config: <path>', not both")
        if "kd" in data:
            block = data.pop("kd") or {}
            if isinstance(block, dict) and isinstance(block.get("teacher_cache"), str):
                block = {**block, "teacher_cache": os.path.join(base, os.path.expanduser(block["teacher_cache"]))}
            settings.setdefault("kd_config", KDConfig.from_dict(block))
        if "kd_config" in data:
            value = data.pop("kd_config")
            settings.setdefault("kd_config", KDConfig.from_dict(value) if isinstance(value, dict)
                                else _read_kd_config(value))
        for key in ("teacher_model_name_or_path", "teacher_tokenizer", "teacher_cache"):
            if key in data:
                settings.setdefault(key, data.pop(key))
        fd, temporary = tempfile.mkstemp(prefix="kd_plugins_trl_", suffix=".yaml")
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(data, handle)
        argv[index + 1] = temporary
    try:
        resolved = _kd_settings(settings, require=require)
    except BaseException:
        if temporary is not None:
            os.remove(temporary)
        raise
    return argv, resolved, temporary


def _kd_settings(settings: dict[str, Any], *, require: bool) -> dict[str, Any]:
    if not require:
        return settings
    kd_config = settings.get("kd_config")
    if kd_config is None:
        raise ConfigError("kd-plugins sft needs a KD config: 'kd_config: kd.yaml' or an inline 'kd:' block")
    teacher = settings.get("teacher_model_name_or_path")
    cache = settings.get("teacher_cache")
    if teacher and cache:
        raise ConfigError(f"both teacher_model_name_or_path={teacher!r} and teacher_cache={cache!r} are given; name "
                          "one teacher: the model (run live) or its cache")
    if cache:
        from kd_plugins.integrations.teachers import is_teacher_cache

        if not is_teacher_cache(cache):
            raise ConfigError(f"teacher_cache={cache!r} is not a teacher cache (no manifest.json / index.json in "
                              f"{os.path.abspath(cache)}); build one with `kd-plugins cache-teacher --out DIR`")
        teacher = cache
    if not teacher and kd_config.teacher_cache is None:
        raise ConfigError("kd-plugins sft needs teacher_model_name_or_path (a model path, hub id, or 'self') or "
                          "teacher_cache (a teacher cache folder)")
    return {"kd_config": kd_config, "teacher": teacher or None, "teacher_tokenizer": settings.get("teacher_tokenizer")}


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from trl.scripts import sft as trl_sft

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_KD_HELP)
        trl_sft.make_parser(prog="kd-plugins sft").parse_args_and_config(["--help"])  # prints TRL's help, exits
    trl_argv, settings, temporary = split_kd_arguments(argv)
    try:
        _refuse_unknown_flags(trl_argv)
        parser = trl_sft.make_parser(prog="kd-plugins sft")
        try:
            script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
                trl_argv, fail_with_unknown_args=False
            )
        except ValueError as exc:  # TRL's / transformers' own argument checks: a message, not a traceback
            raise ConfigError(f"invalid `trl sft` arguments: {exc}") from exc
    finally:
        if temporary is not None:
            os.remove(temporary)
    _check_locations(script_args, model_args, dataset_args)
    with _sft_trainer_with_kd(**settings):
        trl_sft.main(script_args, training_args, model_args, dataset_args)
    return 0


@contextlib.contextmanager
def _sft_trainer_with_kd(*, teacher: Any, kd_config: KDConfig, teacher_tokenizer: Any = None) -> Iterator[None]:
    """While active, ``from trl import SFTTrainer`` (as TRL's script does) gives a KD trainer bound to the
    teacher and KD config."""
    import trl

    from kd_plugins.integrations.trl import KDSFTTrainer

    class CLIKDSFTTrainer(KDSFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            global last_trainer
            kwargs.setdefault("teacher", teacher)
            kwargs.setdefault("kd_config", kd_config)
            kwargs.setdefault("teacher_tokenizer", teacher_tokenizer)
            super().__init__(*args, **kwargs)
            last_trainer = self

    CLIKDSFTTrainer.__name__ = CLIKDSFTTrainer.__qualname__ = "KDSFTTrainer"
    original = trl.SFTTrainer
    trl.SFTTrainer = CLIKDSFTTrainer
    try:
        yield
    finally:
        trl.SFTTrainer = original


# --- helpers ----------------------------------------------------------------------------------------------------


def _read_run_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist (looked for {os.path.abspath(path)})")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping of `trl sft` arguments and KD keys, got "
                          f"{type(data).__name__}")
    return data


def _read_kd_config(value: Any) -> KDConfig:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"kd_config={value!r} is invalid; expected the path of a KD config YAML or an inline 'kd:' "
                          "mapping")
    return KDConfig.from_yaml(Path(value))  # a path: a missing file says so


@functools.lru_cache(maxsize=1)
def _trl_keys() -> frozenset[str]:
    """Every key TRL's ``trl sft`` parser reads from a ``--config`` YAML."""
    from trl.scripts import sft as trl_sft

    parser = trl_sft.make_parser(prog="kd-plugins sft")
    return frozenset({f.name for t in parser.dataclass_types for f in dataclasses.fields(t)} | {"env"})


def _refuse_unknown_keys(data: dict[str, Any], path: str) -> None:
    known = set(_trl_keys()) | set(_KD_KEYS)
    unknown = sorted((k for k in data if k not in known), key=str)
    if not unknown:
        return
    hints = [f"{key!r} -> did you mean {close[0]!r}?" for key in unknown
             if (close := difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6))]
    raise ConfigError(
        f"{path}: unknown keys {unknown}{' (' + '; '.join(hints) + ')' if hints else ''}: they are neither `trl sft` "
        f"arguments (`kd-plugins sft --help` lists them) nor kd-plugins keys ({', '.join(_KD_KEYS)}); the run would "
        "ignore them"
    )


def _refuse_unknown_flags(argv: Sequence[str]) -> None:
    """Command-line flags that no `trl sft` argument takes (``--max_stpes``), with the closest known one."""
    known = sorted(_trl_keys())
    unknown = []
    for token in argv:
        if not token.startswith("--") or token == "--config":
            continue
        key = token[2:].split("=", 1)[0].replace("-", "_")
        bare = key[3:] if key.startswith("no_") else key
        if key in known or bare in known or any(k.startswith(key) for k in known):  # argparse takes unique prefixes
            continue
        unknown.append(token.split("=", 1)[0])
    if unknown:
        hints = [f"{flag!r} -> did you mean '--{close[0]}'?" for flag in unknown
                 if (close := difflib.get_close_matches(flag[2:].replace("-", "_"), known, n=1, cutoff=0.6))]
        raise ConfigError(f"unknown arguments {unknown}{' (' + '; '.join(hints) + ')' if hints else ''}: neither "
                          "`trl sft` arguments (`kd-plugins sft --help` lists them) nor kd-plugins flags "
                          f"({', '.join(_KD_FLAGS)})")


def _resolve_paths(data: dict[str, Any], base: str, path: str) -> dict[str, Any]:
    """Relative paths of the YAML resolved from its folder ``base`` (see the module docstring)."""
    out = dict(data)
    for key in (*_HUB_OR_PATH, *_OUTPUT_PATH, *_EXISTING_PATH):
        if key in out:
            out[key] = _resolve(out[key], key, base, path)
    if isinstance(out.get("datasets"), list):
        out["datasets"] = [
            {**entry, "path": _resolve(entry["path"], "datasets[].path", base, path)}
            if isinstance(entry, dict) and "path" in entry else entry
            for entry in out["datasets"]
        ]
    return out


def _resolve(value: Any, key: str, base: str, path: str) -> Any:
    from kd_plugins.integrations.teachers import looks_like_hub_id

    if not isinstance(value, str) or not value or (key == "teacher_model_name_or_path" and value == "self"):
        return value
    if key == "resume_from_checkpoint" and value.lower() in ("true", "false"):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        candidate = expanded
    else:
        candidate = os.path.normpath(os.path.join(base, expanded))
    if key in _OUTPUT_PATH or os.path.exists(candidate):
        return candidate
    if key in _HUB_OR_PATH and looks_like_hub_id(value) and not os.path.exists(value):
        return value  # a hub id
    elsewhere = (f"; {value!r} exists relative to the working directory ({os.getcwd()}): write it relative to the "
                 "YAML's folder, or absolute") if os.path.exists(value) else ""
    raise ConfigError(f"{path}: {key}: {value!r} does not exist (looked for {candidate}; relative paths in the YAML "
                      f"resolve from its folder {base}){elsewhere}")


def _check_locations(script_args: Any, model_args: Any, dataset_args: Any) -> None:
    """The student and the data: an existing path or a hub id (a typo in a local path is refused by name, not by
    the hub's ``HFValidationError``)."""
    from kd_plugins.integrations.teachers import check_model_location

    if not getattr(script_args, "dataset_name", None) and not getattr(dataset_args, "datasets", None):
        raise ConfigError("no training data: give dataset_name (a folder, data file or hub id) or a datasets: list")
    for what, value in (("model_name_or_path", getattr(model_args, "model_name_or_path", None)),
                        ("dataset_name", getattr(script_args, "dataset_name", None))):
        if isinstance(value, str) and value:
            check_model_location(value, what)
