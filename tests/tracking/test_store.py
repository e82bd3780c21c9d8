"""The tracking store's preflight (pipeline/tracking/store.py, connect): a store that cannot be used is
one line saying what to do, before any work; real SQLite files, real read-only mounts."""

import shutil
import sys

import mlflow
import pytest

from tests.support.faults import read_only, run_with
from pipeline.tracking.store import EXPERIMENT, TrackingError, connect
from tests.support.project import make_project


def one_line_failure(project, *mounts, uri):
    """`python -m pipeline.train net4` with MLFLOW_TRACKING_URI=uri and `mounts`: its stderr's one line."""
    result = run_with(project, list(mounts), sys.executable, "-m", "pipeline.train", "net4", MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 2, result.stderr
    assert "epoch" not in result.stdout  # before any training
    [line] = result.stderr.splitlines()
    return line


def connect_failure(monkeypatch, uri) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError) as caught:
        connect()
    message = str(caught.value)
    assert "\n" not in message
    return message


def new_store(folder) -> str:
    """A SQLite store in `folder` with the project's experiment, as a first stage leaves it."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        connect()
    mlflow.set_tracking_uri(None)
    return uri


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose train stage fails at its preflight: it has no prepared data, which it reads later."""
    return make_project(tmp_path_factory.mktemp("store") / "project", git=False)


def read_only_file(path) -> str:
    """A mount (faults.run_with) that makes the file `path` read-only."""
    return f"mount --bind {path} {path} && mount -o remount,bind,ro {path}"


@pytest.mark.slow  # the train stage in a process of its own, the store mounted read-only for it
@pytest.mark.parametrize("read_only_part, cause", [
    ("file", "attempt to write a readonly database"),
    ("folder", "Read-only file system: {database}.lock"),
])
def test_a_read_only_store_is_one_line_before_training(project, tmp_path, read_only_part, cause):
    uri = new_store(tmp_path / "store")
    database = tmp_path / "store" / "mlflow.db"
    mount = read_only_file(database) if read_only_part == "file" else read_only(database.parent)
    line = one_line_failure(project, mount, uri=uri)
    assert line == (f"error: MLflow tracking store {uri} is not usable: {cause.format(database=database)}; "
                    f"make {database} and its folder writable, or set MLFLOW_TRACKING_URI to a store you can write")


def test_a_damaged_store_says_so_and_how_to_start_afresh(monkeypatch, tmp_path):
    (tmp_path / "mlflow.db").write_bytes(bytes(range(256)) * 100)
    message = connect_failure(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert message.endswith(f"is not usable: file is not a database; {tmp_path / 'mlflow.db'} is damaged or not an "
                            f"MLflow store: move it aside (`mv {tmp_path / 'mlflow.db'} {tmp_path / 'mlflow.db'}.damaged`)"
                            " to start a new store, or restore it from a backup"), message


@pytest.mark.parametrize("uri, meant", [
    ("{tmp}/store", "sqlite:///{tmp}/store/mlflow.db"),
    ("mlflow.db", "sqlite:///mlflow.db"),
    ("file://{tmp}/store", "sqlite:///{tmp}/store/mlflow.db"),
])
def test_a_plain_path_is_one_line_naming_the_uri_meant(monkeypatch, tmp_path, uri, meant):
    uri, meant = uri.format(tmp=tmp_path), meant.format(tmp=tmp_path)
    message = connect_failure(monkeypatch, uri)
    assert message == (f"MLFLOW_TRACKING_URI={uri} is a path, which MLflow 3 takes for its file store and refuses: "
                       f"set MLFLOW_TRACKING_URI={meant} for a SQLite store (or http://host:port for a server)")


def test_a_store_moved_away_from_its_artifacts_is_refused_before_they_go_to_the_old_folder(monkeypatch, tmp_path):
    new_store(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    message = connect_failure(monkeypatch, f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert message.startswith(f"MLflow tracking store sqlite:///{tmp_path / 'new' / 'mlflow.db'} keeps its artifacts "
                              f"in {tmp_path / 'old' / 'mlruns' / EXPERIMENT}, which is gone"), message
    assert "mv " in message
    assert not (tmp_path / "old").exists()


@pytest.mark.slow  # the train stage in a process of its own, the old project mounted read-only for it
def test_a_copied_store_whose_artifacts_cannot_be_written_fails_before_training(project, tmp_path):
    new_store(tmp_path / "old")
    (tmp_path / "old" / "mlruns" / EXPERIMENT).mkdir(parents=True)
    (tmp_path / "new").mkdir()
    shutil.copy(tmp_path / "old" / "mlflow.db", tmp_path / "new")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    line = one_line_failure(project, read_only(tmp_path / "old"), uri=uri)
    assert line.startswith(f"error: MLflow tracking store {uri} keeps its artifacts in "
                           f"{tmp_path / 'old' / 'mlruns' / EXPERIMENT}, which cannot be written"), line


def test_a_store_that_answers_passes_the_preflight_with_its_write(monkeypatch, tmp_path):
    uri = new_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert connect() == uri
    experiment = mlflow.MlflowClient().get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == str(tmp_path / "mlruns" / EXPERIMENT)
