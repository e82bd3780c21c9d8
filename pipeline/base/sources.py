"""The project's own source as a graph of imports: which modules a stage runs, and their hash.

Read from the import statements, without importing anything, so that dvc.yaml's deps, a
checkpoint's fingerprint and the layout's test all see the same graph.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the package


def module_file(module: str) -> Path:
    """pipeline.training.loop -> <root>/pipeline/training/loop.py"""
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def modules() -> list[str]:
    """Every module of the package, dotted; the wings' __init__.py files hold only their docstrings."""
    return sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                  for path in (ROOT / PACKAGE).rglob("*.py") if path.name != "__init__.py")


def imports_of(module: str) -> list[str]:
    """The package's modules that `module` runs when imported; imports for type checkers only (under
    `if TYPE_CHECKING:`) are not run and do not count."""
    return sorted(set(_imported(ast.parse(module_file(module).read_text()))))


def import_chains(module: str) -> dict[str, list[str]]:
    """Every module of the package that `module` runs, directly or not, itself included, with a
    shortest chain of imports that runs it (["pipeline.training.loop", "pipeline.faces.data", ...]):
    what a rule on everything a module loads names when it is broken."""
    chains, pending = {module: [module]}, [module]
    while pending:
        name = pending.pop(0)  # breadth first: the first chain found to a module is a shortest one
        for imported in imports_of(name):
            if imported not in chains:
                chains[imported] = [*chains[name], imported]
                pending.append(imported)
    return chains


def stage_code(module: str) -> list[Path]:
    """The files of `module` and of every module of the package it runs, directly or not."""
    return sorted(module_file(name) for name in import_chains(module))


def code_hash(module: str) -> str:
    """The source a stage runs: a checkpoint saved by other code is not resumed, while an edit to a
    module the stage does not run (predict's, say) keeps it."""
    return hashlib.sha256(b"".join(path.read_bytes() for path in stage_code(module))).hexdigest()


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return _imported_of(node.orelse)
    if isinstance(node, ast.ImportFrom) and _ours(node.module or ""):
        # `from pipeline.evaluation import plots` names a module; `from pipeline.base.files import x`, a name in one.
        submodules = [f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}").is_file()]
        return submodules or [node.module]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if _ours(alias.name)]
    return _imported_of(ast.iter_child_nodes(node))


def _imported_of(nodes) -> list[str]:
    return [name for child in nodes for name in _imported(child)]


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")
