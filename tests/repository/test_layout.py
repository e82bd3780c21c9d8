"""The package's layout, read from its imports (base/sources.py): the wings import only downward."""

import ast

from pipeline.base.sources import ROOT, imports_of, modules, module_file

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


def test_the_training_wing_imports_no_mlflow_and_reads_no_params():
    """The train stage hands the loop what params.yaml says; the loop runs anywhere without MLflow."""
    for module in modules():
        if wing(module) == "training":
            imported = {alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                        for node in ast.walk(ast.parse(module_file(module).read_text()))
                        if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
            assert "mlflow" not in imported and "pipeline.base.config" not in imports_of(module), module


def test_the_wings_packages_hold_only_their_docstrings():
    """The import graph counts modules, not packages: an __init__.py that ran code would escape it."""
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        [statement] = ast.parse(init.read_text()).body
        assert isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant), init
