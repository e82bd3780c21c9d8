"""The quick start's two commands (the Makefile), the command CI runs, and what a test run leaves behind."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.project import ROOT

README = (ROOT / "README.md").read_text()


def dry_run(project, target):
    """The commands `make <target>` would run in `project`, without running them."""
    # Only PATH: under `make test` the environment carries that make's flags and variables (PYTEST_ARGS).
    result = subprocess.run(["make", "-n", target], cwd=project, env={"PATH": os.environ["PATH"]},
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


@pytest.mark.slow
def test_each_command_sets_up_the_environment_once_then_only_runs(tmp_path):
    for name in ("Makefile", "requirements.txt"):
        shutil.copy2(ROOT / name, tmp_path / name)
    setup = ["python3 -m venv .venv", "python -m pip install -r requirements.txt", "touch .venv/installed"]
    assert dry_run(tmp_path, "pipeline") == [*setup, "dvc repro"]
    assert dry_run(tmp_path, "test") == [*setup, "python -m pytest -n 2 "]
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "installed").touch()
    assert dry_run(tmp_path, "pipeline") == ["dvc repro"]
    assert dry_run(tmp_path, "test") == ["python -m pytest -n 2 "]
    # A changed requirements.txt is installed again.
    later = (tmp_path / ".venv" / "installed").stat().st_mtime + 10
    os.utime(tmp_path / "requirements.txt", (later, later))
    assert dry_run(tmp_path, "pipeline") == [*setup, "dvc repro"]


def test_the_readme_gives_the_two_commands_and_ci_runs_the_second():
    assert "make pipeline" in README and "make test" in README
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == "make test"


@pytest.mark.slow
def test_a_passing_run_leaves_no_temporary_folders_and_a_failing_test_keeps_its_own(tmp_path):
    """pytest.ini's retention: the suite's scratch projects would otherwise stay, gigabytes a run."""
    (tmp_path / "test_scratch.py").write_text(
        "import os, pytest\n"
        "@pytest.fixture(scope='session')\n"
        "def shared(tmp_path_factory):\n"
        "    return tmp_path_factory.mktemp('shared')\n"
        "@pytest.mark.parametrize('index', range(4))\n"
        "def test_writes(tmp_path, shared, index):\n"
        "    (tmp_path / 'scratch').write_bytes(os.urandom(1 << 20))\n"
        "    (shared / f'scratch{index}').write_bytes(os.urandom(1 << 20))\n"
        "    assert os.environ.get('FAIL') != str(index)\n")
    temporary = tmp_path / "tmp"
    temporary.mkdir()

    def suite(**env):
        command = [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:randomly", "-c", str(ROOT / "pytest.ini"),
                   "--rootdir", str(tmp_path), str(tmp_path / "test_scratch.py")]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "TMPDIR": str(temporary), **env})

    assert suite().returncode == 0
    assert not [path for path in temporary.rglob("*") if path.is_file()]
    assert suite(FAIL="2").returncode == 1
    kept = [path for path in temporary.rglob("scratch") if path.is_file()]
    assert [path.parent.name for path in kept] == ["test_writes_2_0"]
