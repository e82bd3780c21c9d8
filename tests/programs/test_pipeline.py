"""The whole pipeline, as users run it: `dvc repro` and `mlflow run .`."""

import json
import re
import shutil
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.base.config import load_config
from pipeline.base.weights import load_model
from pipeline.evaluation.colours import BASELINE_COLOUR, net_colour
from pipeline.faces.data import load_faces, read_summary
from pipeline.faces.kaggle import read_training_csv, write_training_csv
from pipeline.tracking.store import EXPERIMENT
from tests.support.project import REPRODUCED_EPOCHS, copy_project, make_project, run, set_params
from tests.support.trainings import start

# Real stages in processes of their own, through DVC and MLflow: the slow half of the suite.
pytestmark = pytest.mark.slow

TERMINAL_COLUMNS = 200


def net_runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return {run.data.tags["net"]: run for run in runs}


def store_of(project, monkeypatch):
    """The project's own MLflow store, as users have it, for the stages run from here on."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(uri)


def test_dvc_repro_trains_both_nets_and_logs_every_epoch(reproduced, tmp_path, monkeypatch):
    project = copy_project(reproduced, tmp_path / "project")  # `dvc repro` with 3 epochs, committed
    client = store_of(project, monkeypatch)
    runs = net_runs(client)
    assert set(runs) == {"net4", "net5"}
    for name, logged in runs.items():
        assert logged.info.status == "FINISHED"
        keys = pd.read_csv(project / f"metrics/history/{name}.csv").columns.drop("epoch")
        assert set(keys) <= set(logged.data.metrics)  # every figure of the history (and evaluation's)
        for key in keys:
            assert sorted(p.step for p in client.get_metric_history(logged.info.run_id, key)) == [1, 2, 3], key
        learning_rate = {p.step: p.value for p in client.get_metric_history(logged.info.run_id, "learning_rate")}
        momentum = {p.step: p.value for p in client.get_metric_history(logged.info.run_id, "momentum")}
        assert [learning_rate[s] for s in (1, 2, 3)] == pytest.approx([0.03, 0.01505, 0.0001])
        assert [momentum[s] for s in (1, 2, 3)] == pytest.approx([0.9, 0.9495, 0.999])
        assert logged.data.params["flip"] == str(name == "net5")
        assert logged.data.tags["dvc_stage"] == f"train@{name}"
        # A plain `dvc repro` is the workspace's experiment, in the name the UI shows.
        assert logged.data.tags["dvc_experiment"] == "workspace" and logged.info.run_name == f"{name} (workspace)"
        assert logged.data.tags["git_dirty"] == "false"
        load_model(project / f"models/{name}.pt")

    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    for key in ("net4", "net5", "baseline"):
        assert evaluation[key]["test_rmse_px"] > 0
    assert sorted(path.name for path in (project / "plots").glob("*.png")) == [
        "keypoint_errors.png", "learning_curves.png", "samples.png", "schedules.png", "test_predictions.png"]
    assert "| net5 |" in (project / "reports/comparison.md").read_text()
    shown = run(project, "dvc", "metrics", "show").stdout
    assert "net5.test_rmse_px" in shown and "best_valid_rmse_px" in shown
    assert max(len(line) for line in shown.splitlines()) <= TERMINAL_COLUMNS, shown
    assert_plots_show_offline(project)
    for name, logged in net_runs(client).items():
        assert client.get_run(logged.info.run_id).data.metrics["test_rmse_px"] == pytest.approx(
            evaluation[name]["test_rmse_px"])
        artifacts = {info.path for info in client.list_artifacts(logged.info.run_id, "evaluation")}
        assert "evaluation/learning_curves.png" in artifacts and "evaluation/comparison.md" in artifacts

    again = run(project, "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout
    assert len(net_runs(client)) == 2


def assert_plots_show_offline(project, nets=("net4", "net5")):
    """`dvc plots show` writes a page that carries its scripts and a chart of each net's loss curves."""
    run(project, "dvc", "plots", "show")
    page = (project / "dvc_plots" / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) and not re.findall(r"<script[^>]*\bsrc\b", page)
    assert "vegaEmbed" in page
    specs = {spec["title"]["text"]: spec for spec in map(json.loads, re.findall(r"var spec = (\{.*\});", page))}
    overlay = specs.pop("valid RMSE per epoch, every net")
    charts = {title: spec["data"]["values"] for title, spec in specs.items()}
    assert set(charts) == {f"metrics/history/{net}.csv" for net in nets}
    # One chart of every net's valid RMSE, each in its colour of the pictures, the baseline in its own
    # (.dvc/plots/valid_rmse.json draws each row in its `colour`).
    assert overlay["encoding"]["color"] == {"field": "colour", "type": "nominal", "scale": None}
    drawn = pd.DataFrame(overlay["data"]["values"])
    assert drawn.groupby("model")["colour"].unique().map(list).to_dict() == {
        **{net: [net_colour(index)] for index, net in enumerate(nets)}, "mean-shape baseline (test)": [BASELINE_COLOUR]}
    for net in nets:
        history = pd.read_csv(project / f"metrics/history/{net}.csv")
        assert drawn[drawn["model"] == net]["rmse_px"].astype(float).tolist() == pytest.approx(
            list(history["valid_rmse_px"]), rel=1e-12)
    for spec in specs.values():  # .dvc/plots/losses.json: as plots/learning_curves.png draws them
        assert spec["encoding"]["y"]["scale"]["type"] == "log"
        dashes = spec["encoding"]["strokeDash"]["scale"]
        assert dict(zip(dashes["domain"], dashes["range"])) == {"valid_loss": [1, 0], "train_loss": [6, 4]}
    for net in nets:
        history = pd.read_csv(project / f"metrics/history/{net}.csv", dtype=str)
        for loss in ("train_loss", "valid_loss"):
            drawn = [row[loss] for row in charts[f"metrics/history/{net}.csv"] if row["field"] == loss]
            assert drawn == list(history[loss]), (net, loss)
    assert "dvc_plots" not in run(project, "git", "status", "--porcelain").stdout  # git-ignored


def test_mlflow_run_nests_the_net_runs_under_the_project_run(reproduced, tmp_path):
    project = copy_project(reproduced, tmp_path / "project")  # its data prepared; its runs in its own store
    result = run(project, "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT,
                 "-P", "train.max_epochs=1")
    assert "dvc exp run -S train.max_epochs=1" in result.stdout + result.stderr
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["net"] for r in children) == ["net4", "net5"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(len(client.get_metric_history(r.info.run_id, "train_loss")) == 1 for r in children)
    trained = {r.data.tags["net"]: r.info.run_id for r in children}
    assert {net: parents[0].data.tags[f"{net}_run_id"] for net in trained} == trained

    # The same again: DVC skips every stage, and the new project run names the runs holding the results.
    again = run(project, "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT,
                "-P", "train.max_epochs=1")
    assert "Stage 'train@net4' didn't change, skipping" in again.stdout + again.stderr
    for net, run_id in trained.items():
        assert f"train@{net} was not run again: its results are those of MLflow run {run_id}\n" in again.stdout
    runs = client.search_runs([experiment.experiment_id])
    second = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != parents[0].info.run_id]
    assert len(runs) == 4 and len(second) == 1 and second[0].info.status == "FINISHED"
    assert {net: second[0].data.tags[f"{net}_run_id"] for net in trained} == trained
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in trained.values())


def test_mlflow_run_rejects_an_unknown_parameter(tmp_path):
    project = make_project(tmp_path / "project")
    result = run(project, "mlflow", "run", ".", "--env-manager", "local", "-P", "train.max_epoch=1", check=False)
    assert result.returncode != 0
    assert "did you mean train.max_epochs?" in result.stderr


def test_queued_experiments_land_in_the_projects_store_tagged_with_their_names(reproduced, tmp_path, monkeypatch):
    """`dvc exp run --queue` runs in temporary copies; the runs must outlive them, in the project's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store, as users have it
    project = copy_project(reproduced, tmp_path / "project")  # the baseline reproduced and committed
    # The store is untracked: as in a clone, the queued experiments create it.
    (project / "mlflow.db").unlink()
    shutil.rmtree(project / "mlruns")
    sweep = {"lr-002": 0.02, "lr-005": 0.05}
    for name, lr_start in sweep.items():
        run(project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.schedules.lr.start={lr_start}")
    run(project, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while True:
        status = run(project, "dvc", "queue", "status").stdout
        if status.count("Success") + status.count("Failed") == len(sweep):
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == len(sweep), status

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    for name, lr_start in sweep.items():
        tagged = [r for r in runs if r.data.tags.get("dvc_experiment") == name]
        assert sorted(r.info.run_name for r in tagged) == [f"net4 ({name})", f"net5 ({name})"]
        for logged in tagged:
            assert logged.info.status == "FINISHED"
            assert float(logged.data.params["train.schedules.lr.start"]) == lr_start
            steps = [p.step for p in client.get_metric_history(logged.info.run_id, "train_loss")]
            assert steps == list(range(1, REPRODUCED_EPOCHS + 1))
            assert "test_rmse_px" in logged.data.metrics  # evaluate, in the copy too, found the run
            assert str(project) in logged.info.artifact_uri and ".dvc/tmp" not in logged.info.artifact_uri
            assert client.list_artifacts(logged.info.run_id, "evaluation")
    assert set(sweep) <= set(run(project, "dvc", "exp", "ls", "--name-only").stdout.split())
    # Each registered its nets' models, tagged with its name, and moved none of the workspace's aliases.
    model_name = load_config(project / "params.yaml").registry.model_name
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert sorted((version.tags["dvc_experiment"], version.tags["net"]) for version in versions) == [
        (name, net) for name in sorted(sweep) for net in ("net4", "net5")]
    assert client.get_registered_model(model_name).aliases == {}


def test_a_dvc_remote_carries_data_and_models_to_a_fresh_clone(reproduced, tmp_path):
    origin = copy_project(reproduced, tmp_path / "origin")  # its results committed
    run(origin, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    run(origin, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam", "a remote")
    run(origin, "dvc", "push")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "models/net4.pt").exists()
    run(clone, "dvc", "pull")
    cached = ["models/net4.pt", "models/net5.pt", "data/prepared/train.npz", "data/prepared/test.npz",
              "data/synthetic/training.csv"]
    for path in cached:
        assert (clone / path).read_bytes() == (origin / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(clone, "dvc", "status").stdout
    again = run(clone, "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout and "Running stage" not in again.stdout

    # Every stage run again, on the same machine: the committed results come out the same bytes (no
    # time, path or MLflow run id in them; those are in MLflow and untracked files, training-runs/ among them).
    run(clone, "dvc", "repro", "--force")
    assert run(clone, "git", "status", "--porcelain").stdout == ""


def test_both_nets_trained_at_once_then_committed_are_the_nets_dvc_repro_trains(reproduced, tmp_path):
    """README, "Both nets at once on one GPU": the two stages' commands side by side, then `dvc commit`."""
    project = make_project(tmp_path / "project", {"train.max_epochs": REPRODUCED_EPOCHS})
    run(project, "dvc", "repro", "prepare")
    trainings = [start(project, sys.executable, "-m", "pipeline.train", net) for net in ("net4", "net5")]
    for training in trainings:
        _, errors = training.communicate(timeout=600)
        assert training.returncode == 0, errors
    run(project, "dvc", "commit", "--force", "train@net4", "train@net5")
    assert run(project, "dvc", "status", "train@net4", "train@net5").stdout.strip() == "Data and pipelines are up to date."
    output = run(project, "dvc", "repro").stdout
    assert "Running stage 'evaluate'" in output and "Running stage 'train" not in output

    # The same params, reproduced one net after the other by `dvc repro`.
    for output in ("models/net4.pt", "models/net5.pt", "metrics/history/net4.csv", "metrics/history/net5.csv",
                   "metrics/evaluate.json"):
        assert (project / output).read_bytes() == (reproduced / output).read_bytes(), output
    # Each of the trainings side by side logged a whole run of its own into the one store.
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert sorted(r.data.tags["net"] for r in runs if r.info.status == "FINISHED") == ["net4", "net5"]


def test_a_net_added_to_params_is_trained_evaluated_reported_and_plotted_with_no_other_edit(
        reproduced, tmp_path, monkeypatch):
    project = copy_project(reproduced, tmp_path / "project")  # net4 and net5 reproduced
    client = store_of(project, monkeypatch)
    set_params(project, {"nets.net6": {"flip": True}})
    reproduced_now = run(project, "dvc", "repro").stdout
    assert "Running stage 'train@net6'" in reproduced_now and "Running stage 'train@net4'" not in reproduced_now
    assert (project / "models/net6.pt").is_file() and (project / "metrics/history/net6.csv").is_file()
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(evaluation) == {"net4", "net5", "net6", "baseline", "net4_vs_baseline", "net5_vs_baseline",
                               "net6_vs_baseline", "net5_vs_net4", "net6_vs_net4"}
    report = (project / "reports/comparison.md").read_text()
    assert "| net6 |" in report and "net6" in report.splitlines()[0]  # in the table and in the one-line answer
    assert evaluation["net6"]["test_rmse_px"] > 0
    runs = net_runs(client)
    assert set(runs) == {"net4", "net5", "net6"}
    assert runs["net6"].data.metrics["test_rmse_px"] == pytest.approx(evaluation["net6"]["test_rmse_px"])
    # The evaluation is downstream of the new net's training: it depends on every net's model and history.
    assert '"train@net6" -> "evaluate";' in run(project, "dvc", "dag", "--dot", "evaluate").stdout.splitlines()
    # The learning curves draw a line per net: the picture of three nets is not that of two.
    assert_plots_show_offline(project, ("net4", "net5", "net6"))
    three_nets = (project / "plots/learning_curves.png").read_bytes()
    set_params(project, {"nets": {"net4": {"flip": False}, "net5": {"flip": True}}})
    run(project, sys.executable, "-m", "pipeline.evaluate")
    assert (project / "plots/learning_curves.png").read_bytes() != three_nets


# Where the stages write (dvc.yaml's outs, metrics and plots), beside DVC's own .gitignore files.
OUTPUT_FOLDERS = ("data/synthetic", "data/prepared", "models", "metrics", "plots", "reports")


def outputs(project):
    """Every file the stages wrote, by path: its bytes."""
    return {str(path.relative_to(project)): path.read_bytes() for folder in OUTPUT_FOLDERS
            for path in sorted((project / folder).rglob("*")) if path.is_file() and not path.name.startswith(".")}


def one_row_csv(project):
    """The user's CSV: one face of the synthetic set, which prepare cannot split into train and test."""
    images, keypoints = read_training_csv(project / "data/synthetic/training.csv")
    complete = int(np.flatnonzero(~np.isnan(keypoints).any(axis=1))[0])
    row = slice(complete, complete + 1)
    write_training_csv(project / "data/raw/training.csv", images[row], keypoints[row])
    return {"data.source": "csv"}


@pytest.mark.parametrize("command, refused, error", [
    (["dvc", "repro"], lambda project: {"train.batch_size": "big"},
     "error: params.yaml: train.batch_size must be an integer, got 'big'"),
    (["dvc", "repro"], lambda project: {"nets": {}}, "error: params.yaml: nets must be a non-empty mapping, got {}"),
    (["dvc", "repro"], one_row_csv, "error: params.yaml: prepare.test_fraction: 0.15 of 1 face leaves 1"),
    (["dvc", "exp", "run"], lambda project: {"train.batch_size": "big"},
     "error: params.yaml: train.batch_size must be an integer, got 'big'"),
], ids=["batch_size", "no nets", "one-row csv", "exp run"])
def test_an_input_a_stage_refuses_costs_nothing_already_produced(reproduced, tmp_path, command, refused, error):
    """DVC deletes a stage's outputs before it runs it, unless they persist (dvc.yaml)."""
    project = copy_project(reproduced, tmp_path / "project")  # its results committed
    produced, params = outputs(project), (project / "params.yaml").read_text()
    set_params(project, refused(project))
    result = run(project, *command, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(error), line
    assert outputs(project) == produced
    (project / "params.yaml").write_text(params)
    (project / "data/raw/training.csv").unlink(missing_ok=True)
    assert run(project, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.parametrize("array, stages", [("train.npz", ["train", "evaluate"]), ("test.npz", ["evaluate"])])
def test_a_changed_pixel_in_the_prepared_arrays_is_refused_naming_the_file(reproduced, tmp_path, array, stages):
    project = copy_project(reproduced, tmp_path / "project")
    path = project / "data" / "prepared" / array
    original = path.read_bytes()
    with np.load(path) as stored:
        pixels, keypoints = stored["pixels"].copy(), stored["keypoints"]
    pixels[0, 0, 48, 48] ^= 1
    np.savez(path, pixels=pixels, keypoints=keypoints)
    for stage in stages:
        result = run(project, sys.executable, "-m", f"pipeline.{stage}", *(["net4"] if stage == "train" else []),
                     check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        # The train stage creates the store first, and MLflow says so.
        assert [line for line in result.stderr.splitlines() if " INFO mlflow." not in line] == [
            f"error: data/prepared/{array}: damaged: its content does not match the checksum that summary.json beside "
            "it records; run `dvc repro prepare`"]
    # What the line says to do: DVC sees the prepared data changed and prepares it again, the same.
    again = run(project, "dvc", "repro").stdout
    assert "Running stage 'prepare'" in again and "Running stage 'train" not in again
    assert path.read_bytes() == original


KILLED_AFTER_ONE_ARRAY = """
import os, signal
import numpy as np
from pipeline.prepare import main
savez = np.savez
def savez_then_die(*args, **kwargs):
    if savez_then_die.saved:
        os.kill(os.getpid(), signal.SIGKILL)
    savez_then_die.saved = True
    savez(*args, **kwargs)
savez_then_die.saved = False
np.savez = savez_then_die
main()
"""


def test_a_prepare_killed_between_its_arrays_leaves_the_old_prepared_data_whole(reproduced, tmp_path):
    """prepare publishes its arrays and summary as one unit: a kill after the first array leaves the old set."""
    project = copy_project(reproduced, tmp_path / "project")
    before = outputs(project)
    set_params(project, {"prepare.seed": 43})  # another split: other arrays
    killed = run(project, sys.executable, "-c", KILLED_AFTER_ONE_ARRAY, check=False)
    assert killed.returncode == -9, killed.stderr
    assert outputs(project) == before
    summary = read_summary(project / "data/prepared/summary.json")
    for array in ("train.npz", "test.npz"):
        load_faces(project / "data/prepared" / array, summary)
    run(project, sys.executable, "-m", "pipeline.prepare")
    assert read_summary(project / "data/prepared/summary.json")["data_hash"] != summary["data_hash"]
    assert sorted(path.name for path in (project / "data").iterdir()) == [".gitignore", "prepared", "raw", "synthetic"]

