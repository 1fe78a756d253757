"""The package's layering: imports point down, and every argument check is in one place.

Read from the source (``ast``), so a function-level import that would hide a cycle
counts too.
"""

from __future__ import annotations

import ast
import pathlib

import jcce

PACKAGE = pathlib.Path(jcce.__file__).parent

# Bottom first. A module may import only from layers below its own.
LAYERS = [
    {"_validate"},  # every argument check and its message
    {"_backend"},  # the seam: implementation names, the per-platform switch
    {"_config", "samplers"},  # Spec, Params, domains, the dtype policy
    {"_xla", "_xla_cpu"},  # the strategies: how each backend lays the work out
    {"_pallas"},  # the Pallas kernels (the "xla" path around them)
    {"_kernel"},  # the one custom_vjp kernel
    {"_plumbing"},  # weights, masks, the kernel call, reductions, vocab routing
    {"_losses", "_linear", "_binary", "_divergence"},  # the public losses
    {"_sampled", "_contrastive", "adaptive_softmax"},  # on the core and linear losses
    {"_transforms"},  # Transform and Chain (a chain is called as a loss)
    {"_family", "calibration"},  # built on chains
    {"__init__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _jcce_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "jcce":
                found.update(a.name for a in node.names)
            elif node.module.startswith("jcce."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("jcce.")
            )
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), modules ^ set(LAYER)


def test_imports_point_down():
    upward = []
    for path in PACKAGE.glob("*.py"):
        for target in _jcce_imports(ast.parse(path.read_text())):
            if LAYER[target] >= LAYER[path.stem]:
                upward.append(f"{path.stem} imports {target}")
    assert not upward, upward


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "jcce."
            ):
                crossing += [
                    f"{path.stem}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not crossing, crossing


def test_argument_errors_are_raised_only_by_the_validation_module():
    raising = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "_validate":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(call, "id", getattr(call, "attr", ""))
                if name in ("TypeError", "ValueError"):
                    raising.append(f"{path.name}:{node.lineno}")
    assert not raising, raising
