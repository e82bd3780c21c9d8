"""A scratch copy of the project in a temporary git repository, for running real stages; and the
params every test starts from: the committed params.yaml, never the work tree's, which `dvc exp run -S`
and `mlflow run . -P` rewrite."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from pipeline.base.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
# params.yaml is not copied: make_project writes DEFAULT_PARAMS.
PROJECT_FILES = ("pipeline", "dvc.yaml", "MLproject", "python_env.yaml", "requirements.txt",
                 ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore", "data/raw/.gitkeep", "dvc_plots_template")


def committed_params() -> str:
    """params.yaml as the checkout's last commit has it; the work tree's where the project is no git
    repository (an unpacked archive) or git is missing (a GPU machine may lack it)."""
    try:
        shown = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:  # no git
        shown = None
    if shown is not None and shown.returncode == 0:
        return shown.stdout
    return (ROOT / "params.yaml").read_text()


# The one home of the defaults the tests start from: each test sets what it needs on top of them.
DEFAULT_PARAMS = committed_params()


def default_params() -> dict:
    """DEFAULT_PARAMS as a fresh dictionary, for a test to change."""
    return yaml.safe_load(DEFAULT_PARAMS)


def default_config() -> Config:
    """DEFAULT_PARAMS as the stages load them."""
    with tempfile.TemporaryDirectory() as directory:
        return load_config(write_params(Path(directory)))


def write_params(directory: Path, changes: dict | None = None) -> Path:
    """DEFAULT_PARAMS with `changes` (dotted keys) as `directory`/params.yaml."""
    path = directory / "params.yaml"
    path.write_text(DEFAULT_PARAMS)
    if changes:
        set_params(directory, changes)
    return path


# Small enough for seconds per stage, large enough for every split to be non-empty.
TINY_PARAMS = {"synthetic.n_faces": 120, "train.max_epochs": 2}
# Three epochs: the annealed learning rate and momentum have a middle value.
REPRODUCED_EPOCHS = 3


def set_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(directory: Path, params: dict | None = None, git: bool = True) -> Path:
    """The project's files, DEFAULT_PARAMS with TINY_PARAMS and `params` in `directory`, committed to a
    new git repository unless `git` is false (a GPU machine may have no git, and runs the stages without DVC)."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    write_params(directory, {**TINY_PARAMS, **(params or {})})
    if not git:
        return directory
    run(directory, "git", "init", "-q")
    run(directory, "git", "add", "-A")
    run(directory, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "scratch")
    return directory


def copy_project(source: Path, target: Path) -> Path:
    """A copy that works where it lands: DVC's cache and the git repository are inside the project."""
    return Path(shutil.copytree(source, target, symlinks=True))


def reproduce_once(root: Path) -> Path:
    """The project after `dvc repro` with TINY_PARAMS and REPRODUCED_EPOCHS, its results committed
    and its runs in its own store (mlflow.db, as users have it): built once under `root`, however
    many processes ask. Tests copy it before they change anything."""
    project = root / "reproduced" / "project"
    with FileLock(str(root / "reproduced.lock")):
        if not (root / "reproduced" / "done").exists():
            shutil.rmtree(root / "reproduced", ignore_errors=True)  # a build that failed half-way
            make_project(project, {"train.max_epochs": REPRODUCED_EPOCHS})
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
                patch.delenv("MLFLOW_RUN_ID", raising=False)
                patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
                run(project, "dvc", "repro")
            run(project, "git", "add", "-A")
            run(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "results")
            (root / "reproduced" / "done").touch()
    return project


def tool_env() -> dict[str, str]:
    """The environment with this interpreter's tools (dvc, mlflow, torchrun) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on once the probe is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(project: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the project as a user would, with this interpreter's tools on PATH."""
    result = subprocess.run(command, cwd=project, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
