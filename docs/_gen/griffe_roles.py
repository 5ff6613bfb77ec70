"""Griffe extension: render Sphinx cross-reference roles in docstrings as inline code.

The code's docstrings use ``:class:`~kd_plugins.Distiller``` style roles (read by Python tooling and IDEs);
mkdocstrings' Google-style parser would print them verbatim. ``~`` keeps only the last dotted component, as
Sphinx does.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):`(~?)([^`]+)`")


def _replace(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class RolesToCode(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
