"""Projection heads that map features between widths for alignment terms.

Projectors are owned by the transfer terms (hence by the ``Distiller``), never by the student, so they are
optimised with the terms and never saved into the exported student checkpoint.
"""

from __future__ import annotations

from torch import nn

from kd_plugins.errors import ConfigError

__all__ = ["PROJECTOR_KINDS", "build_projector"]

PROJECTOR_KINDS = ("linear", "mlp", "identity")
INIT_KINDS = ("auto", "identity", "default")


def build_projector(
    in_dim: int,
    out_dim: int,
    kind: str = "linear",
    hidden_dim: int | None = None,
    bias: bool = True,
    init: str = "auto",
) -> nn.Module:
    """Build a ``(…, in_dim) -> (…, out_dim)`` projector.

    Args:
        in_dim, out_dim: feature widths.
        kind: ``"linear"``; ``"mlp"`` (Linear-GELU-Linear, hidden width ``hidden_dim``, default
            ``max(in_dim, out_dim)``); ``"identity"`` (only when ``in_dim == out_dim``; no parameters).
        bias: whether the linear layers have a bias.
        init: for ``"linear"``: ``"identity"`` starts as the identity (a rectangular identity when widths
            differ: the first ``min(in_dim, out_dim)`` features are copied) with zero bias, so training starts
            from the raw features; ``"default"`` keeps PyTorch's initialisation; ``"auto"`` (default) is
            ``"identity"`` when the widths are equal, else ``"default"``. ``"mlp"`` always uses the default.
    """
    for field, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field}: must be a positive int, got {value!r}")
    if init not in INIT_KINDS:
        raise ConfigError(f"init: unknown projector init {init!r}; allowed: {INIT_KINDS}")
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(
                f"projector: kind='identity' needs equal widths, got {in_dim} -> {out_dim}; use 'linear' or 'mlp'"
            )
        return nn.Identity()
    if kind == "linear":
        layer = nn.Linear(in_dim, out_dim, bias=bias)
        if init == "identity" or (init == "auto" and in_dim == out_dim):
            nn.init.eye_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        return layer
    if kind == "mlp":
        if init == "identity":
            raise ConfigError("init: 'identity' is only available for kind='linear'")
        hidden = hidden_dim if hidden_dim is not None else max(in_dim, out_dim)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"hidden_dim: must be a positive int, got {hidden_dim!r}")
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_dim, bias=bias))
    raise ConfigError(f"projector: unknown kind {kind!r}; allowed: {PROJECTOR_KINDS}")
