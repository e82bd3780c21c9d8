"""The commands behind MLproject's entry points, and the links from the project run to the net runs.

`mlflow run .` itself, twice, runs in tests/test_pipeline.py; here the store is the test's own.
"""

import json
import time

import mlflow
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.mlproject import dvc_command, link_net_runs, overrides_from, recorded_run_ids
from project import make_project


def test_overrides_become_dvc_settings_and_unknown_keys_a_guess():
    keys = ["train.max_epochs", "train.seed"]
    assert overrides_from(["--train.max_epochs", "3"], keys) == ["train.max_epochs=3"]
    assert dvc_command("train", ["train.max_epochs=3"]) == ["dvc", "exp", "run", "-S", "train.max_epochs=3", "train"]
    assert dvc_command("main", []) == ["dvc", "repro"]
    with pytest.raises(PipelineError, match="did you mean train.max_epochs"):
        overrides_from(["--train.max_epoch", "3"], keys)


def finished_run(client, experiment_id, name, tags=None):
    run_id = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
    client.set_terminated(run_id)
    return run_id


def test_the_project_run_names_the_net_runs_it_trained_and_those_it_did_not(capsys):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("facial-keypoints")
    earlier = finished_run(client, experiment_id, "net4")  # DVC skipped train@net4: an earlier run's results
    time.sleep(0.01)  # the project run begins after that run ended, as in `mlflow run`
    project_run = client.create_run(experiment_id).info.run_id
    trained = finished_run(client, experiment_id, "net5", {"mlflow.parentRunId": project_run})
    absent = "0" * 32

    link_net_runs(project_run, {"net4": earlier, "net5": trained, "net6": absent})

    tags = client.get_run(project_run).data.tags
    assert (tags["net4_run_id"], tags["net5_run_id"], tags["net6_run_id"]) == (earlier, trained, absent)
    page = f"#/experiments/{experiment_id}/runs"
    assert tags["mlflow.note.content"].splitlines() == [
        f"- net4: MLflow run [{earlier}]({page}/{earlier}), trained earlier",
        f"- net5: MLflow run [{trained}]({page}/{trained}), trained by this run",
        f"- net6: MLflow run {absent}, not in this tracking store",
    ]
    assert capsys.readouterr().out.splitlines() == [
        f"train@net4 was not run again: its results are those of MLflow run {earlier}",
        f"train@net6 was not run again: its results are those of MLflow run {absent}, "
        f"which {mlflow.get_tracking_uri()} does not have",
    ]


def test_a_model_description_without_a_run_id_is_one_line(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project", git=False)
    monkeypatch.chdir(project)
    config = load_config()
    (project / "models").mkdir()
    (project / "models/net4.json").write_text(json.dumps({"net": "net4", "mlflow_run_id": "abc"}))
    (project / "models/net5.json").write_text(json.dumps({"net": "net5"}))
    with pytest.raises(PipelineError, match=r"^models/net5.json: records no MLflow run id; train the net again"):
        recorded_run_ids(config)
    (project / "models/net5.json").write_text("{")
    with pytest.raises(PipelineError, match=r"^models/net5.json: damaged: not valid JSON"):
        recorded_run_ids(config)
    (project / "models/net5.json").write_text(json.dumps({"net": "net5", "mlflow_run_id": "def"}))
    assert recorded_run_ids(config) == {"net4": "abc", "net5": "def"}
