import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import matplotlib
import mlflow
import pytest
import torch
from matplotlib.colors import to_hex

from pipeline.base.errors import PipelineError
from pipeline.base.model import KeypointNet
from pipeline.evaluation.colours import NET_COLOURS, net_colour
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from pipeline.tracking.datasets import faces_inputs
from pipeline.tracking.export import example_faces
from pipeline.tracking.git import git_state
from pipeline.tracking.logger import MlflowLogger
from pipeline.tracking.runs import COLOUR_TAG, training_run
from pipeline.tracking.store import EXPERIMENT, TrackingError, connect
from pipeline.training.loop import Callback, fit
from tests.support.project import free_port, make_project, run, set_params
from tests.support.loops import data, make_trainer
from tests.support.trainings import RaiseIn, logged, metric_keys, runs, saved_epochs, start, train

# Trainings logged into real MLflow stores and servers.
pytestmark = pytest.mark.slow
# The faces a model is logged with (the train stage's are its first training faces).
FACES = example_faces(data(2).images)


def train_logged(net_name="net4", epochs=3):
    trainer = make_trainer(epochs, schedules={"lr": (0.03, 0.0001), "momentum": (0.9, 0.999)})
    training = data(32)
    with training_run(net_name, {"train.max_epochs": epochs, "n_train": 32}, {"data_hash": "abc123"}, []) as run:
        logger = MlflowLogger()
        with logger:
            history = fit(trainer, training, data(16, seed=1), logger)
        logger.log_model(trainer.network, example_faces(training.images))
    return run.info.run_id, history


def test_every_epoch_is_logged_at_its_step():
    run_id, history = train_logged()
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    # Outside a DVC experiment, the workspace's (a plain `dvc repro`), in the name the runs list shows.
    assert run.info.run_name == "net4 (workspace)" and run.data.tags["dvc_experiment"] == "workspace"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    keys = [key for key in history[0] if key != "epoch"]
    assert set(keys) == set(run.data.metrics)
    for key in keys:
        points = client.get_metric_history(run_id, key)
        assert sorted(point.step for point in points) == [1, 2, 3], key
        by_step = {point.step: point.value for point in points}
        for row in history:
            assert by_step[row["epoch"]] == pytest.approx(row[key])
    learning_rates = {p.step: p.value for p in client.get_metric_history(run_id, "learning_rate")}
    assert [learning_rates[s] for s in (1, 2, 3)] == pytest.approx([0.03, 0.01505, 0.0001])
    assert run.data.params["train.max_epochs"] == "3"
    assert run.data.tags["data_hash"] == "abc123"
    assert {"git_commit", "git_dirty", "dvc_stage"} <= set(run.data.tags)
    # What the UI shows as the run's "Created by" and "Source": the user and the command's file.
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"] == sys.argv[0]


class DivergeIn(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, trainer, epoch):
        if epoch == self.epoch:
            trainer.optimizer.param_groups[0]["lr"] = 1e6


@pytest.mark.parametrize("failure, error, message", [
    (RaiseIn("on_epoch_begin", 4, RuntimeError("CUDA error: out of memory")), RuntimeError, "out of memory"),
    (DivergeIn(4), PipelineError, "diverged in epoch 4"),
])
def test_every_epoch_before_a_failure_is_logged_once(failure, error, message):
    trainer = make_trainer(5, [failure])
    with pytest.raises(error, match=message):
        with training_run("net4", {}, {}, []) as run:
            logger = MlflowLogger()
            with logger:
                fit(trainer, data(32), data(16, seed=1), logger)
    client = mlflow.MlflowClient()
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert set(finished.data.metrics) == {key for key in trainer.history[0] if key != "epoch"}
    for key in finished.data.metrics:
        assert [point.step for point in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key


class StoreRefusesTheRun(Callback):
    """A real refusal: the run deleted in the store after epoch `after`, so that it takes no rows, and
    restored before epoch `until`, once the logger has warned on stdout (read through `capfd`)."""

    def __init__(self, run_id, after, until, capfd):
        self.client, self.run_id, self.capfd = mlflow.MlflowClient(), run_id, capfd
        self.after, self.until = after, until
        self.stdout = ""

    def on_epoch_finished(self, trainer, history):
        if len(history) == self.after:
            self.client.delete_run(self.run_id)

    def on_epoch_begin(self, trainer, epoch):
        if epoch != self.until:
            return
        deadline = time.monotonic() + 30
        while " failed " not in self.stdout:
            assert time.monotonic() < deadline, "no warning within 30 s"
            time.sleep(0.05)
            self.stdout += self.capfd.readouterr().out
        self.client.restore_run(self.run_id)


def test_rows_the_store_refuses_are_kept_and_logged_once_when_it_takes_them_again(capfd):
    trainer = make_trainer(5)
    with training_run("net4", {}, {}, []) as run:
        logger = MlflowLogger()
        outage = StoreRefusesTheRun(run.info.run_id, after=2, until=4, capfd=capfd)
        trainer.callbacks.append(outage)
        with logger:
            fit(trainer, data(32), data(16, seed=1), logger)
    store = f"warning: MLflow tracking store {mlflow.get_tracking_uri()}"
    # One line when the store failed, one when it took the rows again.
    stdout = outage.stdout + capfd.readouterr().out
    failed, back = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert failed.startswith(f"{store} failed (The run {run.info.run_id} must be in the 'active' state")
    assert failed.endswith("the training goes on, its metrics kept to be sent again")
    assert back == f"{store} answers again: the metrics kept are logged"
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for key in client.get_run(run.info.run_id).data.metrics:
        assert [point.step for point in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5], key


def test_an_epoch_stopped_before_the_logger_saw_it_is_still_logged():
    trainer = make_trainer(4)
    with pytest.raises(KeyboardInterrupt):
        with training_run("net4", {}, {}, []) as run:
            logger = MlflowLogger()
            # Ctrl-C while a callback handles the end of epoch 2: the logger had its row before any callback.
            trainer.callbacks.append(RaiseIn("on_epoch_finished", 2, KeyboardInterrupt()))
            with logger:
                fit(trainer, data(32), data(16, seed=1), logger)
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "valid_loss")] == [1, 2]


def test_under_mlflow_run_the_training_is_a_child_run(monkeypatch):
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="project") as parent:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-002")  # as `dvc exp run`, which `mlflow run -P` runs, sets it
    run_id, _ = train_logged("net5", epochs=1)
    client = mlflow.MlflowClient()
    assert run_id != parent.info.run_id
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(run_id).info.run_name == "net5 (lr-002)"
    assert client.get_run(run_id).data.tags["dvc_experiment"] == "lr-002"
    assert not client.get_metric_history(parent.info.run_id, "train_loss")


def test_a_failed_training_marks_the_run_failed():
    trainer = make_trainer(2, lr=1e6)
    with pytest.raises(Exception, match="diverged"):
        with training_run("net4", {}, {}, []) as run:
            logger = MlflowLogger()
            with logger:
                fit(trainer, data(32), data(16, seed=1), logger)
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_git_state_ignores_the_pipelines_own_outputs(tmp_path, monkeypatch):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/net4.json").write_text("{}")
    (tmp_path / "dvc.lock").write_text("old")
    (tmp_path / "train.py").write_text("print(1)")
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "git", "add", "-A")
    run(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    commit, dirty = git_state(["metrics"])
    assert len(commit) == 40 and not dirty
    (tmp_path / "metrics/net4.json").write_text('{"loss": 1}')
    (tmp_path / "dvc.lock").write_text("new")
    (tmp_path / "untracked.txt").write_text("x")
    assert git_state(["metrics"]) == (commit, False)
    (tmp_path / "train.py").write_text("print(2)")
    assert git_state(["metrics"]) == (commit, True)


def test_a_git_that_fails_says_nothing_of_the_files(tmp_path, monkeypatch):
    """It recorded git_dirty: true (a failing git: no repository here, or too few file descriptors)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert git_state(["metrics"]) == ("unknown", None)


class Server:
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts served from a local folder.
    Started again after a kill, it serves the same store at the same address."""

    def __init__(self, directory):
        self.directory, self.port = directory, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = directory / "server-artifacts"
        self.process = None

    def start(self):
        command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.directory / 'server.db'}",
                   "--artifacts-destination", str(self.artifacts)]
        log = self.directory / "server.log"
        # Without its job runner, the server is two processes instead of nine and leaves nothing in /dev/shm.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log.open("a") as output:  # a file, not a pipe nobody reads, which could fill and stall the server
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer within 90 s"
            time.sleep(0.5)

    def kill(self):
        """As a crash or an OOM kill would: no chance to answer the requests in flight."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    """A server, and the stages and this test's MLflow client pointed at it."""
    server = Server(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        yield server
    finally:
        stop_process_group(server.process)


def stop_process_group(process):
    """SIGTERM, then SIGKILL; a server that already died must not hide the test's own failure."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def project(tmp_path):
    """A scratch project with its data prepared by the stages' own commands, without git or DVC."""
    project = make_project(tmp_path / "project", git=False)
    for stage in ("synthesize", "prepare"):
        run(project, sys.executable, "-m", f"pipeline.{stage}")
    return project


def models_of(run_id):
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                       output_format="list")


def assert_logged_once(run_id, keys, epochs):
    for key in keys:
        assert [step for step, _ in logged(run_id, key)] == list(range(1, epochs + 1)), key


def test_a_server_that_dies_mid_training_then_a_model_file_that_fails_lose_nothing_and_log_nothing_twice(
        tracking_server, project):
    epochs = 5
    set_params(project, {"train.max_epochs": epochs})
    training = start(project, sys.executable, "-m", "pipeline.train", "net4")
    while not training.stdout.readline().startswith("epoch 1/"):
        assert training.poll() is None, training.communicate()
    tracking_server.kill()
    killed = time.monotonic()
    out, err = training.communicate(timeout=120)
    ended = time.monotonic() - killed

    # The training went on to its last epoch and kept every one; the stage ended in seconds, with a warning
    # among the epochs' lines when the store failed and one line for the error.
    assert training.returncode == 2 and f"epoch {epochs}/{epochs}" in out
    assert ended < 60, f"{ended:.0f} s from the server's death to the end of the stage"
    store = f"MLflow tracking store {tracking_server.url} failed ([Errno 111] Connection refused)"
    [error] = err.splitlines()
    [warning] = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: {store}: the training goes on")
    assert error.startswith(f"error: {store}: epochs ") and " not logged to run " in error
    assert error.endswith(f"checkpoints/net4.pt keeps epochs 1-{epochs}: once the store answers, run the stage again"
                          " to log what the run lacks")
    assert saved_epochs(project) == epochs and not (project / "models/net4.pt").exists()

    # The store is back, but the model's file cannot be written where a directory stands: the rerun logs the
    # epochs the run lacks, then fails before it logs the model.
    tracking_server.start()
    (project / "models/net4.pt").mkdir(parents=True)
    failed = train(project, check=False)
    assert f"resuming after epoch {epochs}" in failed.stdout and "epoch 1/" not in failed.stdout
    assert failed.returncode == 2 and failed.stderr == "error: models/net4.pt: not written: Is a directory\n"
    [run_] = runs()
    assert run_.info.status == "FAILED" and not models_of(run_.info.run_id) and saved_epochs(project) == epochs

    (project / "models/net4.pt").rmdir()
    finished = train(project)
    assert f"resuming after epoch {epochs}" in finished.stdout and "Traceback" not in finished.stderr
    [run_] = runs()
    assert run_.info.status == "FINISHED"
    assert_logged_once(run_.info.run_id, metric_keys(project), epochs)
    assert len(models_of(run_.info.run_id)) == 1
    assert list(tracking_server.artifacts.rglob("MLmodel")), "the model did not reach the server's artifact store"
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert not (project / "checkpoints/net4.pt").exists() and (project / "models/net4.pt").is_file()


def test_a_resumed_run_that_has_its_model_logs_no_second_one():
    net = KeypointNet()
    with training_run("net4", {}, {}, []) as run:
        MlflowLogger().log_model(net, FACES)
    # A rerun after a failure past the logging of the model (the store failed to mark the run finished).
    with training_run("net4", {}, {}, [], resume_run_id=run.info.run_id):
        MlflowLogger().log_model(net, FACES)
    assert len(models_of(run.info.run_id)) == 1


def test_the_logger_logs_into_the_active_run_and_refuses_another():
    with pytest.raises(TrackingError, match="^MlflowLogger logs into the active MLflow run, and none is active$"):
        MlflowLogger()
    with training_run("net4", {}, {}, []) as first:
        logger = MlflowLogger()
        assert logger.run_id == first.info.run_id
    refusal = f"^the model was not logged to run {first.info.run_id}: it is no longer the active run$"
    with training_run("net4", {}, {}, []) as second, pytest.raises(TrackingError, match=refusal):
        logger.log_model(KeypointNet(), FACES)
    assert models_of(first.info.run_id) == [] and models_of(second.info.run_id) == []


@pytest.mark.parametrize("tags, kind", [
    (None, "custom_model_development"),  # a new store
    ({}, "custom_model_development"),  # an experiment made by `mlflow run`, or before the stages set the tag
    ({"mlflow.experimentKind": "genai_development"}, "genai_development"),  # a user's own choice
])
def test_the_experiment_is_one_of_model_trainings_for_mlflows_ui(tags, kind):
    client = mlflow.MlflowClient()
    if tags is not None:
        client.create_experiment(EXPERIMENT, tags=tags)
    connect()
    assert client.get_experiment_by_name(EXPERIMENT).tags.get("mlflow.experimentKind") == kind


def test_the_training_and_validation_faces_are_the_runs_datasets_logged_once_however_often_it_resumes():
    summary = {"source": "data/raw/training.csv", "data_hash": "0123456789abcdef", "n_rows": 99}
    inputs = faces_inputs(summary, training=32, validation=16)
    with training_run("net4", {}, {}, [], None, inputs) as run:
        pass
    with training_run("net4", {}, {}, [], run.info.run_id, inputs):
        pass
    logged_inputs = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted((tag.value, i.dataset.name) for i in logged_inputs for tag in i.tags) == [
        ("training", "train: 32 faces"), ("validation", "valid: 16 faces")]
    for dataset in (i.dataset for i in logged_inputs):
        assert dataset.digest == "0123456789abcdef"
        assert (dataset.source_type, json.loads(dataset.source)) == ("local", {"uri": "data/raw/training.csv"})
        assert [column["name"] for column in json.loads(dataset.schema)["mlflow_colspec"]] == [*KEYPOINT_COLUMNS, "Image"]
    # What the runs table's Datasets filter asks for.
    found = mlflow.search_runs(filter_string="dataset.name = 'valid: 16 faces' AND dataset.digest = '0123456789abcdef'",
                               output_format="list")
    assert [found_run.info.run_id for found_run in found] == [run.info.run_id]


def system_metrics(run_id):
    return {key for key in mlflow.MlflowClient().get_run(run_id).data.metrics if key.startswith("system/")}


def test_a_training_on_cuda_logs_system_metrics_and_one_elsewhere_none(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    run_ids = {}
    # The device only tells the run what to monitor: the CUDA run needs no GPU here, where it has CPU figures.
    for device in ("cuda", "cpu"):
        with training_run("net4", {}, {}, [], device=torch.device(device)) as run:
            time.sleep(0.5)
        run_ids[device] = run.info.run_id
    assert "system/cpu_utilization_percentage" in system_metrics(run_ids["cuda"])
    if torch.cuda.is_available():
        assert "system/gpu_0_utilization_percentage" in system_metrics(run_ids["cuda"])
        assert "system/gpu_0_memory_usage_megabytes" in system_metrics(run_ids["cuda"])
    assert not system_metrics(run_ids["cpu"])


def test_without_the_packages_for_system_metrics_one_line_names_them(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    with training_run("net4", {}, {}, [], device=torch.device("cuda")) as run:
        pass
    assert capsys.readouterr().out == ("warning: no system metrics in MLflow: nvidia-ml-py not installed "
                                       "(pip install -r requirements.txt)\n")
    assert not system_metrics(run.info.run_id)


def test_each_nets_runs_are_drawn_in_its_colour_in_the_pictures_and_say_their_source(reproduced):
    """The UI draws a run in its mlflow.runColor: net4 blue and net5 orange, as matplotlib draws them."""
    default_cycle = matplotlib.rcParamsDefault["axes.prop_cycle"].by_key()["color"]
    assert list(NET_COLOURS) == [to_hex(colour) for colour in default_cycle]
    client = mlflow.MlflowClient(f"sqlite:///{reproduced / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    net_runs = client.search_runs([experiment.experiment_id])
    assert sorted(run_.data.tags["net"] for run_ in net_runs) == ["net4", "net5"]
    for run_ in net_runs:
        tags = run_.data.tags
        assert tags[COLOUR_TAG] == net_colour(["net4", "net5"].index(tags["net"]))
        assert tags["mlflow.source.name"].endswith("pipeline/train.py") and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"]
    assert (net_colour(0), net_colour(1)) == ("#1f77b4", "#ff7f0e")
