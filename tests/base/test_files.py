import concurrent.futures
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.faults import full_disk, read_only, run_with
from pipeline.base.errors import PipelineError
from pipeline.base.files import atomic_folder, atomic_write, exclusive_lock, write_json, write_text
from tests.support.project import ROOT


def test_write_text_leaves_no_scratch_file(tmp_path):
    path = tmp_path / "reports" / "comparison.md"
    write_text(path, "first")
    write_text(path, "second")
    assert path.read_text() == "second"
    assert [child.name for child in path.parent.iterdir()] == ["comparison.md"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as temporary:
            temporary.write_text("{half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert [child.name for child in tmp_path.iterdir()] == ["metrics.json"]


def test_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    path = tmp_path / "predictions.csv"
    texts = [f"writer {index}\n" * 20000 for index in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda text: write_text(path, text), texts))
    assert path.read_text() in texts
    assert [child.name for child in tmp_path.iterdir()] == ["predictions.csv"]


def test_the_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = tmp_path / f".net4.pt.{dead.pid}-0a1b2c3d.tmp"
    in_progress = tmp_path / f".net4.pt.{os.getpid()}-0a1b2c3d.tmp"
    for temporary in (abandoned, in_progress):
        temporary.write_bytes(b"half a checkpoint")
    write_text(tmp_path / "net4.pt", "whole")
    assert sorted(child.name for child in tmp_path.iterdir()) == sorted(["net4.pt", in_progress.name])


def test_a_folder_where_the_file_belongs_is_one_line(tmp_path):
    (tmp_path / "models" / "net4.pt").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"models/net4.pt: not written: Is a directory$"):
        write_text(tmp_path / "models" / "net4.pt", "weights")
    (tmp_path / "plots").write_text("a file")
    with pytest.raises(PipelineError, match=r"plots/a.png: not written: .*/plots is a file, not a folder$"):
        write_text(tmp_path / "plots" / "a.png", "picture")



def publish(folder, text):
    """Two files that are only right together, published as one unit."""
    with atomic_folder(folder) as temporary:
        (temporary / "a.txt").write_text(text)
        (temporary / "b.txt").write_text(text)


def contents(folder):
    return {child.name: child.read_text() for child in folder.iterdir()}


@pytest.fixture(params=["swapped", "renamed"])
def swap(request, monkeypatch):
    """Linux swaps the two folders in one step; elsewhere (no renameat2) two renames do it."""
    if request.param == "renamed":
        monkeypatch.setattr("pipeline.base.files.ctypes.CDLL", lambda *args, **kwargs: object())
    return request.param


def test_a_published_folder_replaces_the_old_one_whole(tmp_path, swap):
    folder = tmp_path / "data" / "prepared"
    publish(folder, "first")
    (folder / "stale.txt").write_text("of an older set")
    publish(folder, "second")
    assert contents(folder) == {"a.txt": "second", "b.txt": "second"}
    assert [child.name for child in folder.parent.iterdir()] == ["prepared"]


def test_an_interrupted_publication_keeps_the_old_folder_whole(tmp_path):
    folder = tmp_path / "prepared"
    publish(folder, "old")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as temporary:
            (temporary / "a.txt").write_text("new")
            raise RuntimeError("killed")
    assert contents(folder) == {"a.txt": "old", "b.txt": "old"}
    assert [child.name for child in tmp_path.iterdir()] == ["prepared"]


KILLED_WHILE_PUBLISHING = """
import os, signal, sys
from pipeline.base.files import atomic_folder
with atomic_folder(sys.argv[1]) as temporary:
    (temporary / "a.txt").write_text("new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_9_while_publishing_keeps_the_old_folder_and_the_next_publication_cleans_up(tmp_path):
    folder = tmp_path / "prepared"
    publish(folder, "old")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_PUBLISHING, str(folder)], cwd=ROOT)
    assert killed.wait() == -signal.SIGKILL
    assert contents(folder) == {"a.txt": "old", "b.txt": "old"}
    [abandoned] = [child for child in tmp_path.iterdir() if child.name != "prepared"]
    assert abandoned.name.startswith(f".prepared.{killed.pid}-") and abandoned.name.endswith(".tmp")
    publish(folder, "new")
    assert contents(folder) == {"a.txt": "new", "b.txt": "new"}
    assert [child.name for child in tmp_path.iterdir()] == ["prepared"]


PUBLISH_AND_REPORT = """
import os
from pipeline.base.errors import PipelineError
from pipeline.base.files import atomic_folder
try:
    with atomic_folder("data/prepared") as temporary:
        (temporary / "big.bin").write_bytes(bytes(1 << 20))
except PipelineError as error:
    print(error)
print(sorted(os.listdir("data")), sorted(os.listdir("data/prepared")))
"""


def test_a_full_disk_while_publishing_is_one_line_naming_the_folder_and_the_old_one_stays(tmp_path):
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "kept.txt").write_text("old")
    result = run_with(tmp_path, [full_disk(tmp_path / "data")], sys.executable, "-c", PUBLISH_AND_REPORT,
                      PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["data/prepared: not written: No space left on device",
                                          "['prepared'] ['kept.txt']"]


WRITE_AND_REPORT = """
import json
import os
from pipeline.base.errors import PipelineError
from pipeline.base.files import write_bytes
try:
    write_bytes("data/big.bin", bytes(1 << 20))
except PipelineError as error:
    print(error)
print(json.load(open("data/kept.json")), sorted(os.listdir("data")))
"""


@pytest.mark.parametrize("fault, cause", [(full_disk, "No space left on device"),
                                          (read_only, "Read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_and_the_old_file_stays(tmp_path, fault, cause):
    (tmp_path / "data").mkdir()
    write_json(tmp_path / "data" / "kept.json", {"kept": True})
    result = run_with(tmp_path, [fault(tmp_path / "data")], sys.executable, "-c", WRITE_AND_REPORT,
                      PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"data/big.bin: not written: {cause}", "{'kept': True} ['kept.json']"]


def test_a_second_holder_of_a_lock_is_told_who_holds_it_and_a_dead_holder_blocks_nothing(tmp_path):
    lock = tmp_path / "net4.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(PipelineError, match=rf"^training net4 is already running: process {holder.pid} "
                                                rf"\(started .*\) holds .*net4.lock$"):
            with exclusive_lock(lock, "training net4"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "training net4"):
        assert f"process {os.getpid()} " in lock.read_text()


HOLD_LOCK = """
import sys, time
from pipeline.base.files import exclusive_lock
with exclusive_lock(sys.argv[1], "training net4"):
    print("held", flush=True)
    time.sleep(600)
"""
