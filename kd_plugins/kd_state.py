"""The KD-state file (``kd_state.safetensors``): the Distiller's tensors, and in the safetensors metadata what they
belong to -- the resolved KD configuration (:meth:`Distiller.resolved_config <kd_plugins.Distiller.resolved_config>`)
and one SHA-256 checksum over every other metadata entry and every tensor's name, dtype, shape and bytes.

On resume the file is verified before anything is loaded: a flipped byte anywhere (a tensor, a name, the
configuration) fails a checksum and the file is refused as corrupt; a file saved with another configuration is
refused with the fields that differ (``allow_config_change_on_resume`` lets it through); tensors that do not fit the
Distiller (a changed ``proj_dim``, a dropped term) are refused by name and shape. Pure functions over tensors and
strings: the transformers callback (:class:`~kd_plugins.integrations.transformers.DistillationCallback`) does the
file I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from kd_plugins.errors import ConfigError, KDError

if TYPE_CHECKING:  # pragma: no cover
    from kd_plugins.distiller import Distiller

__all__ = ["KD_STATE_FORMAT", "config_differences", "state_checksum", "state_metadata", "verify_kd_state"]

KD_STATE_FORMAT = "1"


CHECKSUM_KEY = "kd_state_sha256"


def state_checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata entries (but the checksum itself) and every tensor's name, dtype, shape and bytes,
    in name order: any changed byte of a KD-state file's content changes it."""
    digest = hashlib.sha256()
    entries = sorted((k, v) for k, v in metadata.items() if k != CHECKSUM_KEY)
    digest.update(json.dumps(entries).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_metadata(distiller: "Distiller", tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """The safetensors metadata written beside ``tensors`` (all values strings, as safetensors requires)."""
    from kd_plugins import __version__

    metadata = {
        "format": "pt",
        "producer": "kd_plugins",
        "kd_state_format": KD_STATE_FORMAT,
        "kd_plugins_version": __version__,
        "kd_config": json.dumps(distiller.resolved_config(), sort_keys=True),
    }
    metadata[CHECKSUM_KEY] = state_checksum(tensors, metadata)
    return metadata


def verify_kd_state(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, distiller: "Distiller", *,
                    where: str, allow_config_change: bool = False) -> list[str]:
    """Check a KD-state file read from ``where`` against ``distiller``; change nothing.

    Returns the configuration differences (field by field) that ``allow_config_change`` let through -- empty when
    the file was saved with this configuration. A file without kd_plugins metadata (written before checksums were
    stored) returns ``["<no configuration stored>"]`` and is checked by tensor names and shapes only.

    Raises:
        KDError: the checksum does not match (the file is corrupt).
        ConfigError: the file was saved with another configuration (the message names every differing field) and
            ``allow_config_change`` is False; or, without a stored configuration, tensors that do not fit.
    """
    metadata = dict(metadata or {})
    if CHECKSUM_KEY not in metadata and "kd_config" not in metadata:
        distiller.check_kd_state_dict(tensors)
        return ["<no configuration stored>"]
    if state_checksum(tensors, metadata) != metadata.get(CHECKSUM_KEY):
        raise KDError(f"{where} is corrupt: its content does not match the SHA-256 checksum stored with it (a damaged "
                      "copy or disk?), so it is not loaded; resume from an earlier checkpoint")
    try:
        saved = json.loads(metadata["kd_config"])
    except (KeyError, ValueError) as exc:  # pragma: no cover - guarded by the checksum above
        raise KDError(f"{where} is corrupt: its stored KD configuration cannot be read") from exc
    differences = config_differences(saved, distiller.resolved_config())
    if differences and not allow_config_change:
        listed = "\n  ".join(differences)
        raise ConfigError(
            f"{where} was saved with another KD configuration; resuming would restore projectors and scheduler state "
            f"into terms they do not belong to. Differences (checkpoint -> this run):\n  {listed}\nResume with the "
            "configuration the checkpoint was saved with, or set allow_config_change_on_resume: true in the KD config "
            "to restore only the tensors that still fit"
        )
    if not differences:
        distiller.check_kd_state_dict(tensors)
    return differences


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["field: checkpoint value -> this run's value", ...]`` between two :meth:`Distiller.resolved_config` dicts;
    terms are compared by label (a term on one side only is one line) and by order, which position-indexed scheduler
    state depends on."""
    saved_terms = {str(t.get("label")): t for t in saved.get("terms", [])}
    current_terms = {str(t.get("label")): t for t in current.get("terms", [])}
    out = []
    for label in saved_terms.keys() - current_terms.keys():
        out.append(f"terms[{label}]: {_term(saved_terms[label])} -> (absent)")
    for label in current_terms.keys() - saved_terms.keys():
        out.append(f"terms[{label}]: (absent) -> {_term(current_terms[label])}")
    a, b = {}, {}
    for label in saved_terms.keys() & current_terms.keys():
        _flatten({k: v for k, v in saved_terms[label].items() if k != "label"}, f"terms[{label}]", a)
        _flatten({k: v for k, v in current_terms[label].items() if k != "label"}, f"terms[{label}]", b)
    for source, target in ((saved, a), (current, b)):
        for key, value in source.items():
            if key != "terms":
                _flatten(value, key, target)
    for key in sorted(set(a) | set(b)):
        if key not in b:
            out.append(f"{key}: {_show(a[key])} -> (absent)")
        elif key not in a:
            out.append(f"{key}: (absent) -> {_show(b[key])}")
        elif a[key] != b[key]:
            out.append(f"{key}: {_show(a[key])} -> {_show(b[key])}")
    order_a = [label for label in saved_terms if label in current_terms]
    order_b = [label for label in current_terms if label in saved_terms]
    if order_a != order_b:
        out.append(f"terms (order): {order_a} -> {order_b}")
    return sorted(out)


# --- helpers ----------------------------------------------------------------------------------------------------


def _term(term: Mapping[str, Any]) -> str:
    return f"{term.get('name')!r} (weight {term.get('weight')})"


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
