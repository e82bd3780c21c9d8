"""The one-line ending of every program (pipeline/base/reporting.py): Ctrl-C and SIGTERM, in the wrapper
and in every stage and `predict` run as a user runs them; and no library's noise on stderr."""

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.faults import read_only, run_with
from pipeline.base.errors import Interrupted, PipelineError
from pipeline.base.files import write_text
from pipeline.base.reporting import reports_errors
from tests.support.project import copy_project, make_project, run
from tests.support.trainings import start

# What a run may change besides its outputs: the store, the checkpoints, git's and DVC's own files.
NOT_OUTPUTS = ("mlflow.db", "mlruns", "checkpoints", ".git", ".dvc")


def interrupted_line(capsys, main) -> str:
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    return error


def test_ctrl_c_in_a_program_is_one_line_saying_nothing_was_written(capsys):
    @reports_errors
    def main():
        raise KeyboardInterrupt

    assert interrupted_line(capsys, main) == "error: test_reporting interrupted; nothing of this run was written: run it again\n"


def test_sigterm_in_a_program_is_ctrl_c_and_names_what_it_had_written(tmp_path, capsys):
    @reports_errors
    def main():
        write_text(tmp_path / "first.txt", "whole")
        write_text(tmp_path / "second.txt", "whole")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal interrupts this
        write_text(tmp_path / "third.txt", "never")

    before = signal.getsignal(signal.SIGTERM)
    error = interrupted_line(capsys, main)
    assert error == (f"error: test_reporting interrupted; of this run it kept {tmp_path / 'first.txt'}, "
                     f"{tmp_path / 'second.txt'} (each written whole) and wrote nothing else: run it again for the rest\n")
    assert not (tmp_path / "third.txt").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the program's only while main() runs


class SignalledWhileCollected:
    """An object whose finalizer gets SIGTERM: the KeyboardInterrupt raised there is one Python ignores."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # bytecode, where the handler runs


@pytest.fixture
def ignored(monkeypatch):
    """The types of the exceptions Python ignores in the test ("Exception ignored in ...")."""
    types = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: types.append(unraisable.exc_type))
    return types


def test_an_interrupt_that_python_ignored_still_ends_the_program_as_interrupted(tmp_path, capsys, ignored):

    @reports_errors
    def main():
        SignalledWhileCollected()  # collected at once, SIGTERM and all
        write_text(tmp_path / "first.txt", "whole")

    error = interrupted_line(capsys, main)
    assert ignored == [KeyboardInterrupt]  # the signal did land where Python ignores exceptions
    assert error == (f"error: test_reporting interrupted; of this run it kept {tmp_path / 'first.txt'} (each written "
                     "whole) and wrote nothing else: run it again for the rest\n")


def test_a_program_that_says_its_own_interrupt_keeps_its_line(capsys):
    """As the train stage does, naming the epochs its checkpoint keeps."""
    @reports_errors
    def main():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise Interrupted("train net4 interrupted in epoch 3; its checkpoint keeps epochs 1-2") from None

    assert interrupted_line(capsys, main) == "error: train net4 interrupted in epoch 3; its checkpoint keeps epochs 1-2\n"


@pytest.mark.parametrize("allocate", [
    lambda: np.empty((10**7, 10**7)),  # numpy's _ArrayMemoryError: 800 TB
    lambda: __import__("torch").empty(10**13),  # torch's "DefaultCPUAllocator: can't allocate memory"
    lambda: bytearray(2**62),  # Python's MemoryError
])
def test_an_allocation_that_fails_is_one_line_naming_memory_and_the_knob(capsys, allocate):
    @reports_errors(memory_knobs="lower train.batch_size")
    def main():
        allocate()

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: test_reporting: out of memory: lower train.batch_size, or free memory "
                                       "(other programs, ulimit -v)\n")


def test_a_runtime_error_that_is_not_memory_stays_a_bug(capsys):
    @reports_errors
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project with both nets trained, and a face image to predict."""
    project = make_project(tmp_path_factory.mktemp("interrupts") / "project", git=False)
    for command in (["synthesize"], ["prepare"], ["train", "net4"], ["train", "net5"]):
        run(project, sys.executable, "-m", f"pipeline.{command[0]}", *command[1:])
    # Large faces: reading them is work enough for a signal to find the command under way.
    face = np.random.default_rng(0).integers(0, 256, (2000, 2000), dtype=np.uint8)
    for index in range(8):
        Image.fromarray(face).save(project / f"face{index}.png")
    return project


COMMANDS = {
    "synthesize": ["synthesize"],
    "prepare": ["prepare"],
    "train": ["train", "net4"],
    "evaluate": ["evaluate"],
    "predict": ["predict", *(f"face{index}.png" for index in range(8))],
}


def snapshot(project: Path) -> dict[str, str]:
    """Every file of the project but NOT_OUTPUTS, by its content's hash."""
    return {str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in project.rglob("*")
            if path.is_file() and path.relative_to(project).parts[0] not in NOT_OUTPUTS}


def catches_sigterm(pid: int) -> bool:
    """The process has a handler of its own for SIGTERM: the program's main() has begun (Python catches
    SIGINT from its start, so the wrapper's SIGTERM handler is the sign for both)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def wait_until(condition, process, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} within 2 minutes"
        time.sleep(0.005)


def stop(process, signum) -> tuple[str, str]:
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    return out, err


def kept_outputs(line: str) -> set[str]:
    listed = re.search(r"of this run it kept (.*) \(each written whole\)", line)
    return set(listed.group(1).split(", ")) if listed else set()


@pytest.mark.slow  # each program in a process of its own, stopped by a real signal
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("program", list(COMMANDS))
def test_every_program_stopped_by_ctrl_c_or_sigterm_says_in_one_line_what_it_kept(trained, tmp_path, program,
                                                                                   signum):
    project = copy_project(trained, tmp_path / "project")
    before = snapshot(project)
    process = start(project, sys.executable, "-m", f"pipeline.{COMMANDS[program][0]}", *COMMANDS[program][1:])
    wait_until(lambda: catches_sigterm(process.pid), process, "the program's main() did not begin")
    time.sleep(0.1)  # into its work
    _, err = stop(process, signum)
    [line] = err.splitlines()
    assert re.match(f"error: {program}( net4)? interrupted", line), line  # train names its net
    changed = {path for path, digest in snapshot(project).items() if before.get(path) != digest}
    # What changed is what the line says was kept, whole; nothing is left half-written.
    assert changed <= kept_outputs(line), line
    assert not [path for path in changed if path.endswith(".tmp")]


@pytest.mark.slow  # the evaluate stage in a process of its own
def test_evaluate_stopped_after_its_first_files_names_them_as_kept(trained, tmp_path):
    project = copy_project(trained, tmp_path / "project")
    metrics = project / "metrics" / "evaluate.json"  # its first output; the pictures and the report follow
    process = start(project, sys.executable, "-m", "pipeline.evaluate")
    wait_until(metrics.exists, process, "evaluate wrote no metrics/evaluate.json")
    _, err = stop(process, signal.SIGTERM)
    [line] = err.splitlines()
    assert "metrics/evaluate.json" in kept_outputs(line), line


@pytest.mark.slow  # a stage in a process of its own, with HOME mounted read-only for it
def test_a_home_that_cannot_be_written_gives_no_matplotlib_warnings(tmp_path):
    project = make_project(tmp_path / "project", git=False)
    run(project, sys.executable, "-m", "pipeline.synthesize")
    home = tmp_path / "home"
    home.mkdir()
    result = run_with(project, [read_only(home)], sys.executable, "-m", "pipeline.prepare",
                      HOME=str(home), XDG_CONFIG_HOME="", XDG_CACHE_HOME="", MPLCONFIGDIR="")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_an_error_after_an_interrupt_a_library_swallowed_is_reported_as_the_interrupt(capsys, ignored):
    @reports_errors
    def main():
        SignalledWhileCollected()
        raise PipelineError("MLflow tracking store is not usable: Can't reconnect until invalid transaction is rolled back")

    assert interrupted_line(capsys, main) == "error: test_reporting interrupted; nothing of this run was written: run it again\n"
    assert ignored == [KeyboardInterrupt]
