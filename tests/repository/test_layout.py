"""The package's layout, read from its imports (base/sources.py): the wings import only downward."""

import ast

from pipeline.base.sources import PACKAGE, ROOT, import_chains, imports_of, module_file, modules

# Each wing may import its own modules and those of lower wings; training and evaluation are peers,
# so neither imports the other. The programs (the stages, predict, promote, mlproject) sit above them all.
WING_LEVELS = {"base": 0, "faces": 1, "training": 2, "evaluation": 2, "tracking": 3}
PROGRAMS = 4


def wing(module: str) -> str | None:
    """pipeline.training.loop -> training; None for a program (pipeline.train)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def level(module: str) -> int:
    return PROGRAMS if wing(module) is None else WING_LEVELS[wing(module)]


def test_every_module_lies_in_a_known_wing_or_is_a_program():
    assert {wing(module) for module in modules()} == {*WING_LEVELS, None}
    assert {module for module in modules() if wing(module) is None} == {
        "pipeline.synthesize", "pipeline.prepare", "pipeline.train", "pipeline.evaluate", "pipeline.predict",
        "pipeline.mlproject", "pipeline.promote"}


def test_no_module_imports_a_program_or_a_wing_above_or_beside_its_own():
    upward = [(module, imported) for module in modules() for imported in imports_of(module)
              if wing(imported) != wing(module) and level(imported) >= level(module)]
    assert upward == []


def test_the_modules_import_one_another_in_no_cycle():
    graph = {module: imports_of(module) for module in modules()}
    state: dict[str, str] = {}

    def cycle_from(module, path):
        state[module] = "open"
        for imported in graph[module]:
            if state.get(imported) == "open":
                return [*path, module, imported]
            if imported not in state and (found := cycle_from(imported, [*path, module])):
                return found
        state[module] = "done"
        return None

    cycles = [found for module in graph if module not in state and (found := cycle_from(module, []))]
    assert cycles == []


def libraries_of(module: str) -> set[str]:
    """The top-level packages besides this one that `module` imports, anywhere in it (mlflow, torch, ...)."""
    tree = ast.parse(module_file(module).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
    return {name.split(".")[0] for name in names} - {PACKAGE}


def test_the_training_wing_loads_no_mlflow_and_no_params_not_even_through_another_module():
    """The train stage hands the loop what params.yaml says; the loop runs anywhere without MLflow.
    Every module a training module runs counts, whatever its wing: faces.data, which the loop
    imports, loads no config either."""
    loaded = [" -> ".join(chain) + (" -> mlflow" if "mlflow" in libraries_of(reached) else "")
              for module in modules() if wing(module) == "training"
              for reached, chain in import_chains(module).items()
              if reached == "pipeline.base.config" or "mlflow" in libraries_of(reached)]
    assert not loaded, "\n".join(["the training wing loads what it must not:", *loaded])


def test_the_wings_packages_hold_only_their_docstrings():
    """The import graph counts modules, not packages: an __init__.py that ran code would escape it."""
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        [statement] = ast.parse(init.read_text()).body
        assert isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant), init
