import json
import math
import shutil

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import evaluate
from pipeline.weights import load_model
from pipeline.data import load_faces
from pipeline.kaggle import KEYPOINTS
from pipeline.metrics import mean_shape, predict, rmse_px
from project import make_project, run

PICTURE_SIZES = {  # pixels at the plots' 80 dpi
    "learning_curves.png": (560, 360),
    "schedules.png": (720, 280),
    "test_predictions.png": (704, 736),
    "keypoint_errors.png": (560, 588),
}


def tracking_uri(project):
    return f"sqlite:///{project / 'mlflow.db'}"


def trained_project(directory):
    """A scratch project whose tiny nets were really trained and logged into its own MLflow store."""
    project = make_project(directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        for stage in (["synthesize"], ["prepare"], ["train", "net4"], ["train", "net5"]):
            run(project, "python", "-m", f"pipeline.{stage[0]}", *stage[1:])
    return project


def all_runs(project):
    client = mlflow.MlflowClient(tracking_uri(project))
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client, client.search_runs(experiments, run_view_type=mlflow.entities.ViewType.ALL)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The project, evaluate's stdout, and the runs before evaluation; evaluate runs once per module."""
    project = trained_project(tmp_path_factory.mktemp("evaluate") / "project")
    _, runs_before = all_runs(project)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
        result = run(project, "python", "-m", "pipeline.evaluate")
    return project, result, runs_before


def test_the_metrics_file_has_every_net_the_baseline_and_the_comparison(evaluated):
    project, _, _ = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(results) == ["net4", "net5", "baseline", "comparison"]
    for label in ("net4", "net5", "baseline"):
        per_keypoint = results[label]["per_keypoint_rmse_px"]
        assert list(per_keypoint) == list(KEYPOINTS)
        assert results[label]["test_rmse_px"] == pytest.approx(
            math.sqrt(np.mean(np.square(list(per_keypoint.values())))))
    for net in ("net4", "net5"):
        trained = json.loads((project / "metrics" / "train" / f"{net}.json").read_text())
        assert results[net]["best_valid_loss"] == pytest.approx(trained["best_valid_loss"])
        assert results[net]["best_epoch"] == trained["best_epoch"]
        assert results[net]["epoch_reaching_target"] in (1, 2)
    assert set(results["comparison"]) == {"target_valid_loss", "target_valid_rmse_px", "net4_vs_baseline",
                                          "net5_vs_baseline", "net5_vs_net4"}


def test_the_errors_are_those_of_the_held_out_test_faces(evaluated):
    project, _, _ = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    train, test = load_faces(project / "data/prepared/train.npz"), load_faces(project / "data/prepared/test.npz")
    net5 = predict(load_model(project / "models" / "net5.pt"), test.X)
    assert results["net5"]["test_rmse_px"] == pytest.approx(rmse_px(net5, test.y), rel=1e-6)
    assert results["baseline"]["test_rmse_px"] == pytest.approx(
        rmse_px(mean_shape(train.y, len(test)), test.y), rel=1e-6)


def test_the_pictures_are_drawn(evaluated):
    project, _, _ = evaluated
    for name, size in PICTURE_SIZES.items():
        with Image.open(project / "plots" / name) as picture:
            picture.load()
            assert picture.size == size, name


def test_each_training_run_gets_its_test_figures_and_no_run_is_added(evaluated):
    project, _, runs_before = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    client, runs = all_runs(project)
    assert sorted(r.info.run_id for r in runs) == sorted(r.info.run_id for r in runs_before)
    assert len(runs) == 2
    for net in ("net4", "net5"):
        run_id = json.loads((project / "models" / f"{net}.json").read_text())["mlflow_run_id"]
        metrics = client.get_run(run_id).data.metrics
        assert metrics["test_rmse_px"] == pytest.approx(results[net]["test_rmse_px"])
        assert metrics["baseline_test_rmse_px"] == pytest.approx(results["baseline"]["test_rmse_px"])
        assert metrics["test_rmse_px.nose_tip"] == pytest.approx(results[net]["per_keypoint_rmse_px"]["nose_tip"])
        assert sum(key.startswith("test_rmse_px.") for key in metrics) == len(KEYPOINTS)
        artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "evaluation")}
        assert {f"evaluation/{name}" for name in PICTURE_SIZES} <= artifacts


def test_the_report_links_the_pictures_and_names_the_runs(evaluated):
    project, _, _ = evaluated
    report = (project / "reports" / "comparison.md").read_text()
    data_hash = json.loads((project / "data/prepared/summary.json").read_text())["data_hash"]
    assert data_hash in report
    for net in ("net4", "net5"):
        assert json.loads((project / "models" / f"{net}.json").read_text())["mlflow_run_id"] in report
    for name in PICTURE_SIZES:
        assert f"(../plots/{name})" in report
        assert (project / "reports" / ".." / "plots" / name).is_file()


def test_a_summary_is_printed(evaluated):
    _, result, _ = evaluated
    lines = result.stdout.splitlines()
    assert lines[0].startswith("evaluate: ")
    assert [line.split()[0] for line in lines[1:5]] == ["model", "net4", "net5", "mean-shape"]
    assert any(line.startswith("net5 against net4: test RMSE") for line in lines)
    assert "warning" not in result.stderr


@pytest.fixture
def copy_of(evaluated, tmp_path, monkeypatch):
    """A copy of the evaluated project as the current directory, its outputs removed."""
    project = shutil.copytree(evaluated[0], tmp_path / "copy")
    for output in ("metrics/evaluate.json", "reports/comparison.md", "plots/learning_curves.png"):
        (project / output).unlink()
    monkeypatch.chdir(project)
    return project


def edit_model_info(project, net, **changes):
    path = project / "models" / f"{net}.json"
    info = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({key: value for key, value in info.items() if value is not None}))


def test_without_a_run_the_files_are_written_with_a_warning(copy_of, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(copy_of))
    edit_model_info(copy_of, "net4", mlflow_run_id=None)
    edit_model_info(copy_of, "net5", mlflow_run_id="0" * 32)
    evaluate.main()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert warnings[0] == "warning: net4 has no MLflow run id: its test figures are not logged to MLflow"
    assert warnings[1].startswith(f"warning: net5: test figures not logged to MLflow run {'0' * 32} (")
    for output in ("metrics/evaluate.json", "reports/comparison.md", "plots/learning_curves.png"):
        assert (copy_of / output).is_file()
    assert "net4 `not logged`" in (copy_of / "reports" / "comparison.md").read_text()


def test_a_net_trained_on_other_data_is_refused(copy_of, capsys):
    edit_model_info(copy_of, "net5", data_hash="0123456789abcdef")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main()
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: models/net5.json: the net was trained on data 0123456789abcdef")
    assert not (copy_of / "metrics" / "evaluate.json").exists()
