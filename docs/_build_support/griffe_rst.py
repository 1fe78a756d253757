"""Griffe extension: turns the reST markup in jcce's docstrings into Markdown.

The docstrings are Google style, but a few cross-references and links use reST syntax
(read by IDEs and Sphinx users). Before mkdocstrings renders a docstring this rewrites

* ``:func:`name```, ``:class:`name```, ``:meth:`name``` into an autorefs link to the
  public API entry (``jcce.name`` or ``jcce.calibration.name``) when that entry exists,
  and into plain code otherwise (private helpers are not in the reference);
* reST links (``text <url>`` in backquotes, then an underscore) into ``[text](url)``;
* the section title ``Example:`` into Google style's ``Examples:``, so that doctests
  render as code.

Only the text handed to mkdocstrings changes; the source files are not touched.
Configured in mkdocs.yml under the python handler's ``extensions``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
ROLE = re.compile(r":(?:func|class|meth|attr|mod|obj):`~?([A-Za-z_][\w.]*)`")
LINK = re.compile(r"`([^`<>]+?)\s*<(https?://[^>\s]+)>`__?", re.DOTALL)
# Google style's section is "Examples:"; the singular is read as an admonition, which
# would render the doctest as quoted prose instead of code.
EXAMPLE = re.compile(r"^Example:[ \t]*$", re.MULTILINE)


def public_names(module_file: Path) -> list[str]:
    """The names in a module's literal ``__all__`` (read without importing it)."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


def documented() -> set[str]:
    """Identifiers that have an entry in the API reference."""
    ids = {f"jcce.{n}" for n in public_names(ROOT / "jcce" / "__init__.py")}
    ids |= {
        f"jcce.calibration.{n}" for n in public_names(ROOT / "jcce" / "calibration.py")
    }
    return ids


class RstToMarkdown(griffe.Extension):
    """Rewrites reST roles and links in every docstring of the loaded package."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = documented()

    def _target(self, name: str, module: str) -> str | None:
        short = name.split(".")[-1]
        candidates = [name] if name.startswith("jcce.") else []
        prefixes = ["jcce.calibration", "jcce"]
        if module != "jcce.calibration":
            prefixes.reverse()
        candidates += [f"{p}.{name}" for p in prefixes]
        candidates += [f"{p}.{short}" for p in prefixes]
        return next((c for c in candidates if c in self.ids), None)

    def on_object(self, *, obj, **kwargs) -> None:  # noqa: ANN001, ARG002
        docstring = obj.docstring
        if docstring is None:
            return
        module = obj.module.path if not obj.is_module else obj.path

        def role(match: re.Match) -> str:
            name = match.group(1)
            target = self._target(name, module)
            shown = f"`{name}`"
            return f"[{shown}][{target}]" if target else shown

        def link(match: re.Match) -> str:
            text = " ".join(match.group(1).split())
            return f"[{text}]({match.group(2)})"

        text = LINK.sub(link, ROLE.sub(role, docstring.value))
        docstring.value = EXAMPLE.sub("Examples:", text)
