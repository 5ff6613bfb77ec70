"""``kd-plugins sft``: TRL's ``trl sft`` script with distillation.

Every ``trl sft`` argument and YAML key is parsed by TRL's own parser (``trl.scripts.sft.make_parser``) and the
run is TRL's own ``trl.scripts.sft.main``, with :class:`~kd_plugins.integrations.trl.KDSFTTrainer` standing in
for ``SFTTrainer`` while it runs. The distillation keys are removed before TRL's parser sees them:

* ``kd_config: path/to/kd.yaml`` or an inline ``kd:`` mapping (a :class:`~kd_plugins.KDConfig`), in the
  ``--config`` YAML or as ``--kd_config PATH``;
* ``teacher_model_name_or_path: PATH`` (or ``self`` with ``use_peft: true``), in the YAML or as
  ``--teacher_model_name_or_path PATH``.

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
import os
import tempfile
from typing import Any, Iterator, Sequence

import yaml

from kd_plugins.config import KDConfig
from kd_plugins.errors import ConfigError

_KD_FLAGS = ("--kd_config", "--teacher_model_name_or_path")

last_trainer = None  # the most recent trainer built by :func:`main` (for tests and notebooks)


_KD_HELP = """distillation arguments (kd-plugins):
  --kd_config KD_CONFIG  KD configuration YAML (or `kd_config:` / an inline `kd:` block in the --config YAML)
  --teacher_model_name_or_path TEACHER
                        teacher model path or hub id, or `self` (a PEFT student's base, adapters disabled)
"""


def split_kd_arguments(
    argv: Sequence[str], *, require: bool = True
) -> tuple[list[str], dict[str, Any], str | None]:
    """Remove the KD keys from ``argv`` and from the ``--config`` YAML.

    Returns ``(trl_argv, kd_settings, temporary_yaml_path)``: ``trl_argv`` is what TRL's parser gets (its
    ``--config`` points at a copy of the YAML without the KD keys), ``kd_settings`` has ``kd_config`` (a
    :class:`KDConfig`) and ``teacher``.
    """
    argv = list(argv)
    settings: dict[str, Any] = {}
    for flag in _KD_FLAGS:
        for form in (flag, flag.replace("_", "-")):
            if form in argv:
                index = argv.index(form)
                settings[flag[2:]] = argv[index + 1]
                del argv[index : index + 2]
            prefixed = [a for a in argv if a.startswith(form + "=")]
            for arg in prefixed:
                settings[flag[2:]] = arg.split("=", 1)[1]
                argv.remove(arg)
    temporary = None
    if "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1]
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must contain a YAML mapping")
        base = os.path.dirname(os.path.abspath(path))
        if "kd" in data and "kd_config" in data:
            raise ConfigError(f"{path}: give either an inline 'kd:' block or 'kd_config: <path>', not both")
        if "kd" in data:
            settings.setdefault("kd_config", KDConfig.from_dict(data.pop("kd") or {}))
        if "kd_config" in data:
            value = data.pop("kd_config")
            if isinstance(value, dict):
                value = KDConfig.from_dict(value)
            elif not os.path.isabs(value) and os.path.exists(os.path.join(base, value)):
                value = os.path.join(base, value)
            settings.setdefault("kd_config", value)
        if "teacher_model_name_or_path" in data:
            settings.setdefault("teacher_model_name_or_path", data.pop("teacher_model_name_or_path"))
        fd, temporary = tempfile.mkstemp(prefix="kd_plugins_trl_", suffix=".yaml")
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(data, handle)
        argv[index + 1] = temporary
    kd_config = settings.get("kd_config")
    if not require:
        return argv, settings, temporary
    if kd_config is None:
        raise ConfigError("kd-plugins sft needs a KD config: 'kd_config: kd.yaml' or an inline 'kd:' block")
    if not isinstance(kd_config, KDConfig):
        kd_config = KDConfig.from_yaml(kd_config) if str(kd_config).endswith((".yaml", ".yml")) else None
        if kd_config is None:
            raise ConfigError(f"kd_config={settings['kd_config']!r} is invalid; expected a .yaml/.yml path")
    teacher = settings.get("teacher_model_name_or_path")
    if not teacher:
        raise ConfigError("kd-plugins sft needs teacher_model_name_or_path (a model path, hub id, or 'self')")
    return argv, {"kd_config": kd_config, "teacher": teacher}, temporary


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from trl.scripts import sft as trl_sft

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_KD_HELP)
        trl_sft.make_parser(prog="kd-plugins sft").parse_args_and_config(["--help"])  # prints TRL's help, exits
    trl_argv, settings, temporary = split_kd_arguments(argv)
    try:
        parser = trl_sft.make_parser(prog="kd-plugins sft")
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
            trl_argv, fail_with_unknown_args=False
        )
    finally:
        if temporary is not None:
            os.remove(temporary)
    with _sft_trainer_with_kd(**settings):
        trl_sft.main(script_args, training_args, model_args, dataset_args)
    return 0


@contextlib.contextmanager
def _sft_trainer_with_kd(*, teacher: Any, kd_config: KDConfig) -> Iterator[None]:
    """While active, ``from trl import SFTTrainer`` (as TRL's script does) gives a KD trainer bound to the
    teacher and KD config."""
    import trl

    from kd_plugins.integrations.trl import KDSFTTrainer

    class CLIKDSFTTrainer(KDSFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            global last_trainer
            kwargs.setdefault("teacher", teacher)
            kwargs.setdefault("kd_config", kd_config)
            super().__init__(*args, **kwargs)
            last_trainer = self

    CLIKDSFTTrainer.__name__ = CLIKDSFTTrainer.__qualname__ = "KDSFTTrainer"
    original = trl.SFTTrainer
    trl.SFTTrainer = CLIKDSFTTrainer
    try:
        yield
    finally:
        trl.SFTTrainer = original
