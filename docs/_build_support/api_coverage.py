"""MkDocs hook: every public name must have an entry in the API reference.

The public names are ``jcce.__all__`` and ``jcce.calibration.__all__`` (read from the
source, without importing jax). Each must appear as a ``::: jcce.<name>`` (or
``::: jcce.calibration.<name>``) directive in a page under ``docs/api/``, or be a
member of a documented module. A missing one is logged as a warning, which fails
``mkdocs build --strict``; so does a directive for a name that is not public.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("api_coverage")
ROOT = Path(__file__).resolve().parents[2]
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def _public_names(module_file: Path) -> list[str]:
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


def on_files(files, config):  # noqa: ARG001
    public = {f"jcce.{n}" for n in _public_names(ROOT / "jcce" / "__init__.py")}
    for module in ("adaptive_softmax", "calibration", "samplers"):
        public |= {
            f"jcce.{module}.{n}"
            for n in _public_names(ROOT / "jcce" / f"{module}.py")
        }
    api_dir = Path(config["docs_dir"]) / "api"
    shown: set[str] = set()
    for page in sorted(api_dir.glob("*.md")):
        shown |= set(DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    for name in sorted(public - shown):
        log.warning("public name %s has no '::: %s' entry under docs/api/", name, name)
    for name in sorted(shown - public):
        log.warning("docs/api/ documents %s, which is not in an __all__", name)
    return files
