"""The commands behind MLproject's entry points, and the links from the project run to the net runs.

`mlflow run .` itself, twice, runs in tests/programs/test_pipeline.py; here the store is the test's own.
"""

import time

import mlflow
import pytest
import torch

from pipeline.base.errors import PipelineError
from pipeline.base.model import KeypointNet
from pipeline.base.weights import weights_checksum
from pipeline.mlproject import dvc_command, link_net_runs, overrides_from
from pipeline.tracking.trained_by import WEIGHTS_TAG, run_of_weights


def test_overrides_become_dvc_settings_and_unknown_keys_a_guess():
    keys = ["train.max_epochs", "train.seeds"]
    assert overrides_from(["--train.max_epochs", "3"], keys) == ["train.max_epochs=3"]
    assert dvc_command("train", ["train.max_epochs=3"]) == ["dvc", "exp", "run", "-S", "train.max_epochs=3", "train"]
    assert dvc_command("main", []) == ["dvc", "repro"]
    with pytest.raises(PipelineError, match="did you mean train.max_epochs"):
        overrides_from(["--train.max_epoch", "3"], keys)
    # A net, or a net's option, that params.yaml lacks is added as DVC adds keys.
    assert overrides_from(["--nets.net6.flip", "true", "--nets.net5.dropout", "[0.1, 0.2, 0.3, 0.5]"],
                          [*keys, "nets.net5.flip"]) == ["+nets.net6.flip=true", "+nets.net5.dropout=[0.1, 0.2, 0.3, 0.5]"]


def finished_run(client, experiment_id, name, tags=None):
    run_id = client.create_run(experiment_id, run_name=name, tags={"net": name, **(tags or {})}).info.run_id
    client.set_terminated(run_id)
    return run_id


def net(seed):
    torch.manual_seed(seed)
    return KeypointNet()


def test_a_net_finds_the_latest_run_that_trained_its_weights():
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("facial-keypoints")
    model = net(0)
    tag = {WEIGHTS_TAG: weights_checksum(model)}
    assert run_of_weights("net4", model) is None
    first = finished_run(client, experiment_id, "net4", tag)
    time.sleep(0.01)
    second = finished_run(client, experiment_id, "net4", tag)  # the same code trained again: the same weights
    finished_run(client, experiment_id, "net5", tag)  # another net is never taken for this one
    finished_run(client, experiment_id, "net4", {WEIGHTS_TAG: weights_checksum(net(1))})
    client.delete_run(finished_run(client, experiment_id, "net4", tag))

    assert run_of_weights("net4", model).info.run_id == second != first
    assert run_of_weights("net4", net(2)) is None


def test_the_project_run_names_the_net_runs_it_trained_and_those_it_did_not(capsys):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("facial-keypoints")
    earlier = finished_run(client, experiment_id, "net4")  # DVC skipped train@net4: an earlier run's results
    time.sleep(0.01)  # the project run begins after that run ended, as in `mlflow run`
    project_run = client.create_run(experiment_id).info.run_id
    trained = finished_run(client, experiment_id, "net5", {"mlflow.parentRunId": project_run})
    runs = {"net4": client.get_run(earlier), "net5": client.get_run(trained), "net6": None}

    link_net_runs(project_run, runs)

    tags = client.get_run(project_run).data.tags
    assert (tags["net4_run_id"], tags["net5_run_id"], "net6_run_id" in tags) == (earlier, trained, False)
    page = f"#/experiments/{experiment_id}/runs"
    assert tags["mlflow.note.content"].splitlines() == [
        f"- net4: MLflow run [{earlier}]({page}/{earlier}), trained earlier",
        f"- net5: MLflow run [{trained}]({page}/{trained}), trained by this run",
        "- net6: its weights were trained by no run of this tracking store",
    ]
    assert capsys.readouterr().out.splitlines() == [
        f"train@net4 was not run again: its results are those of MLflow run {earlier}",
        f"train@net6 was not run again: no run of {mlflow.get_tracking_uri()} trained its weights",
    ]


def test_a_project_run_outside_the_project_experiment_is_told_how_to_keep_them_together(capsys):
    """`mlflow run .` without --experiment-name puts its run in MLflow's Default experiment."""
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("facial-keypoints")
    trained = finished_run(client, experiment_id, "net4")
    project_run = client.create_run("0").info.run_id  # Default

    link_net_runs(project_run, {"net4": client.get_run(trained)})

    assert capsys.readouterr().out.splitlines()[0] == (
        "note: this project run is in the experiment 'Default', its net runs in 'facial-keypoints': "
        "`mlflow run . --env-manager local --experiment-name facial-keypoints` keeps them together")
