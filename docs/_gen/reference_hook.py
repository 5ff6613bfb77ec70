"""MkDocs hooks: fill docs/reference.md with one mkdocstrings block per module, found on disk; stand in for
nav pages another change has not written yet.

The module list is generated, not hand-kept, so a new module appears in the reference without an edit and a
removed one cannot break the build. ``kd_plugins.integrations`` lives in the top-level ``integrations/`` folder
(mapped by the build backend), so its modules are collected under that path and titled with their installed
name.
"""

from __future__ import annotations

import logging
from pathlib import Path

MARKER = "<!-- reference:modules -->"
ROOT = Path(__file__).resolve().parents[2]

# Pages the nav links that are written separately; until one exists, a generated stub keeps links valid.
PENDING_PAGES = {
    "schedulers.md": (
        "# Schedulers\n\nThis page is being written. Until then, the scheduler docstrings are in the "
        "[Reference](reference.md) (`kd_plugins.components.schedulers`, `kd_plugins.components.dynamic_schedulers`)"
        " and `kd-plugins list` shows the registered names.\n"
    ),
}


def on_startup(command, dirty) -> None:
    logging.getLogger("mkdocs.plugins.griffe").addFilter(_demote_docstring_style_warnings)


def _demote_docstring_style_warnings(record: logging.LogRecord) -> bool:
    """Free-text lines inside a docstring's ``Args:`` block ("Others as in ...") are fine for readers but not
    Google style; griffe's complaint about them is shown as INFO so it does not fail the strict build."""
    if record.levelno == logging.WARNING and "Failed to get 'name: description' pair" in record.getMessage():
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def on_files(files, config):
    from mkdocs.structure.files import File

    for name, content in PENDING_PAGES.items():
        if files.get_file_from_path(name) is None:
            files.append(File.generated(config, name, content=content))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "reference.md" or MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, "\n\n".join(_block(path, title) for path, title in reference_modules()))


def reference_modules() -> list[tuple[str, str]]:
    """``[(griffe path, displayed module name)]``: the package roots first, then every public module."""
    out = [("kd_plugins", "kd_plugins")]
    for package_dir, griffe_prefix, title_prefix in (
        (ROOT / "kd_plugins", "kd_plugins", "kd_plugins"),
        (ROOT / "integrations", "integrations", "kd_plugins.integrations"),
    ):
        for path in sorted(package_dir.rglob("*.py")):
            relative = path.relative_to(package_dir).with_suffix("")
            parts = list(relative.parts)
            if any(part.startswith("_") and part != "__init__" for part in parts):
                continue
            if not all((package_dir.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(len(parts))):
                continue  # not importable as a module (e.g. evaluate metric scripts shipped as data)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            griffe_path = ".".join([griffe_prefix, *parts])
            if griffe_path == "kd_plugins":
                continue
            out.append((griffe_path, ".".join([title_prefix, *parts])))
    return out


def _block(griffe_path: str, title: str) -> str:
    options = ["    options:", "      show_submodules: false"]
    if griffe_path == "kd_plugins":
        options.append("      members: false")  # the re-exported names are documented in their own modules
    if griffe_path != title:
        options += [f'      heading: "{title}"', f'      toc_label: "{title}"']
    return f"::: {griffe_path}\n" + "\n".join(options)
