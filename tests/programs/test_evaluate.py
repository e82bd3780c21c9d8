import json
import math
import re
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import evaluate
from pipeline.base.weights import load_model, weights_checksum
from pipeline.evaluation.metrics import mean_shape, predict, rmse_px
from pipeline.faces.data import load_faces, load_incomplete_faces, read_summary
from pipeline.faces.kaggle import KEYPOINTS, write_training_csv
from pipeline.tracking.trained_by import WEIGHTS_TAG
from tests.support.project import REPRODUCED_EPOCHS, copy_project, default_config, make_project, run, set_params
from tests.support.trainings import trained_run_of

# Every test reads a project that trained both nets through `dvc repro`.
pytestmark = pytest.mark.slow

PICTURE_SIZES = {  # pixels at the plots' 80 dpi
    "learning_curves.png": (560, 360),
    "schedules.png": (720, 280),
    "test_predictions.png": (704, 736),
    "keypoint_errors.png": (560, 588),
}


def tracking_uri(project):
    return f"sqlite:///{project / 'mlflow.db'}"


EVALUATE_OUTPUTS = ("metrics/evaluate.json", "metrics/keypoint_errors.csv", "reports/comparison.md",
                    *(f"plots/{name}" for name in PICTURE_SIZES))


def all_runs(project):
    client = mlflow.MlflowClient(tracking_uri(project))
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client, client.search_runs(experiments, run_view_type=mlflow.entities.ViewType.ALL)


@pytest.fixture(scope="module")
def evaluated(reproduced, tmp_path_factory):
    """A copy of the reproduced project (tiny nets trained and logged into its own MLflow store, as
    users have it), evaluate's stdout, and the runs before; evaluate runs again, once per module."""
    project = copy_project(reproduced, tmp_path_factory.mktemp("evaluate") / "project")
    for output in EVALUATE_OUTPUTS:  # what the tests read is what this evaluation writes
        (project / output).unlink()
    _, runs_before = all_runs(project)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
        result = run(project, "python", "-m", "pipeline.evaluate")
    return project, result, runs_before


def test_the_metrics_files_hold_the_headline_figures_and_the_keypoints_have_their_own_file(evaluated):
    project, _, _ = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(results) == ["net4", "net5", "baseline", "net4_vs_baseline", "net5_vs_baseline", "net5_vs_net4"]
    assert all(list(results[label]) == ["test_rmse_px"] for label in ("net4", "net5", "baseline"))
    net4, net5 = results["net4"]["test_rmse_px"], results["net5"]["test_rmse_px"]
    assert results["net5_vs_net4"]["improvement_percent"] == pytest.approx(100 * (net4 - net5) / net4)
    assert list(results["net5_vs_net4"]) == ["improvement_percent", "ci95"]
    low, high = results["net5_vs_net4"]["ci95"]
    assert low <= results["net5_vs_net4"]["improvement_percent"] <= high
    baseline = results["baseline"]["test_rmse_px"]
    for net in ("net4", "net5"):
        assert list(results[f"{net}_vs_baseline"]) == ["ci95"]
        low, high = results[f"{net}_vs_baseline"]["ci95"]
        assert low <= 100 * (baseline - results[net]["test_rmse_px"]) / baseline <= high
    # The report's first line states the interval that evaluate.json keeps.
    headline = (project / "reports" / "comparison.md").read_text().splitlines()[0]
    # As a signed change of RMSE: the improvement and its interval negated.
    stated = re.search(r"net5 (beats it|trails|is not significantly different) \(([-+][\d.]+)%, 95% interval "
                       r"([-+][\d.]+) to ([-+][\d.]+), 1 seed x (\d+) test faces\)", headline)
    low, high = results["net5_vs_net4"]["ci95"]
    expected = (-results["net5_vs_net4"]["improvement_percent"], -high, -low)
    assert [float(figure) for figure in stated.groups()[1:4]] == pytest.approx(expected, abs=0.05)
    assert int(stated.group(5)) == len(load_faces(project / "data/prepared/test.npz",
                                                  read_summary(project / "data/prepared/summary.json")))
    assert (stated.group(1) == "is not significantly different") == (low <= 0 <= high)
    keypoints = pd.read_csv(project / "metrics" / "keypoint_errors.csv", index_col="keypoint")
    labels = ["net4", "net5", "baseline"]
    assert list(keypoints.index) == list(KEYPOINTS) and list(keypoints.columns) == [
        *labels, "labelled_faces", *(f"{label}_every_labelled" for label in labels)]
    for label in labels:
        assert results[label]["test_rmse_px"] == pytest.approx(math.sqrt(np.mean(np.square(keypoints[label]))))
    for net in ("net4", "net5"):
        trained = json.loads((project / "metrics" / "train" / f"{net}.json").read_text())
        history = pd.read_csv(project / "metrics" / "history" / f"{net}.csv")
        best = history.loc[history["valid_loss"].idxmin()]
        n_train = json.loads((project / "data/prepared/summary.json").read_text())["n_train"]
        assert trained == {"train_faces": n_train - round(n_train * 0.2), "epochs": REPRODUCED_EPOCHS,
                           "best_epoch": best["epoch"], "best_valid_rmse_px": best["valid_rmse_px"]}


def test_the_errors_are_those_of_the_held_out_test_faces(evaluated):
    project, _, _ = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    summary = read_summary(project / "data/prepared/summary.json")
    train, test = (load_faces(project / f"data/prepared/{portion}.npz", summary) for portion in ("train", "test"))
    net5 = predict(load_model(project / "models" / "net5.pt"), test.X)
    assert results["net5"]["test_rmse_px"] == pytest.approx(rmse_px(net5, test.y), rel=1e-6)
    assert results["baseline"]["test_rmse_px"] == pytest.approx(
        rmse_px(mean_shape(train.y, len(test)), test.y), rel=1e-6)


def test_each_keypoint_is_also_scored_on_every_test_face_labelled_for_it(evaluated):
    project, _, _ = evaluated
    summary = read_summary(project / "data/prepared/summary.json")
    test = load_faces(project / "data/prepared/test.npz", summary)
    incomplete = load_incomplete_faces(project / "data/prepared/test_incomplete.npz", summary)
    assert len(incomplete) > 0  # the tiny synthetic set has incomplete rows in its test portion
    net4 = load_model(project / "models" / "net4.pt")
    predicted = np.concatenate([predict(net4, test.X), predict(net4, incomplete.X)])
    true = np.concatenate([test.y, incomplete.y])
    keypoints = pd.read_csv(project / "metrics" / "keypoint_errors.csv", index_col="keypoint")
    for index, name in enumerate(KEYPOINTS):
        labelled = ~np.isnan(true[:, 2 * index])
        assert keypoints.at[name, "labelled_faces"] == labelled.sum() >= len(test)
        expected = rmse_px(predicted[labelled, 2 * index:2 * index + 2], true[labelled, 2 * index:2 * index + 2])
        assert keypoints.at[name, "net4_every_labelled"] == pytest.approx(expected, rel=1e-6)
    # The four central keypoints are labelled on every face, complete or not; the outer ones on fewer.
    assert keypoints.at["nose_tip", "labelled_faces"] == len(test) + len(incomplete)
    assert keypoints["labelled_faces"].min() < len(test) + len(incomplete)
    report = (project / "reports/comparison.md").read_text()
    assert f"| nose_tip | {len(test) + len(incomplete)} | " in report


def test_the_pictures_are_drawn(evaluated):
    project, _, _ = evaluated
    for name, size in PICTURE_SIZES.items():
        with Image.open(project / "plots" / name) as picture:
            picture.load()
            assert picture.size == size, name


def test_each_training_run_gets_its_test_figures_and_no_run_is_added(evaluated):
    project, _, runs_before = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    keypoints = pd.read_csv(project / "metrics" / "keypoint_errors.csv", index_col="keypoint")
    client, runs = all_runs(project)
    assert sorted(r.info.run_id for r in runs) == sorted(r.info.run_id for r in runs_before)
    assert len(runs) == 2
    for net in ("net4", "net5"):
        run_id = next(r.info.run_id for r in runs if r.data.tags["net"] == net)
        # The run is the one that trained the weights models/ holds, which name it by their checksum.
        assert client.get_run(run_id).data.tags[WEIGHTS_TAG] == weights_checksum(load_model(project / "models" / f"{net}.pt"))
        metrics = client.get_run(run_id).data.metrics
        assert metrics["test_rmse_px"] == pytest.approx(results[net]["test_rmse_px"])
        assert metrics["baseline_test_rmse_px"] == pytest.approx(results["baseline"]["test_rmse_px"])
        # The per-keypoint errors are one table of the run, not 15 metrics.
        assert not [key for key in metrics if key.startswith("test_rmse_px.")]
        table = pd.read_csv(client.download_artifacts(run_id, "evaluation/keypoint_errors.csv"), index_col="keypoint")
        assert table.equals(keypoints)
        artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "evaluation")}
        assert {f"evaluation/{name}" for name in PICTURE_SIZES} <= artifacts


def test_the_report_opens_with_the_answer_and_links_the_pictures(evaluated):
    project, result, _ = evaluated
    report = (project / "reports" / "comparison.md").read_text()
    answer = result.stdout.splitlines()[-1].removesuffix(".")
    assert report.startswith(f"# {answer}\n") and "against net4 in test rmse, net5 " in answer.lower()
    data_hash = json.loads((project / "data/prepared/summary.json").read_text())["data_hash"]
    assert data_hash in report and "experiment `facial-keypoints`" in report
    for run_ in all_runs(project)[1]:  # a run id would change the committed report at every run
        assert run_.info.run_id not in report
    for name in PICTURE_SIZES:
        assert f"(../plots/{name})" in report
        assert (project / "reports" / ".." / "plots" / name).is_file()


def test_a_summary_is_printed(evaluated):
    _, result, _ = evaluated
    lines = result.stdout.splitlines()
    assert lines[0].startswith("evaluate: ")
    assert [line.split()[0] for line in lines[1:5]] == ["model", "net4", "net5", "mean-shape"]
    assert any(line.startswith("net5 against net4: test RMSE") for line in lines)
    assert "against net4 in test rmse, net5 " in lines[-1].lower() and "the mean-shape baseline" in lines[-1]
    assert "warning" not in result.stderr


@pytest.fixture
def copy_of(evaluated, tmp_path, monkeypatch):
    """A copy of the evaluated project as the current directory, its outputs removed, for evaluate.main()
    in this process: it has computed already, so the portable kernels, which must be set before any
    computation of a process (test_device.py), are off."""
    project = shutil.copytree(evaluated[0], tmp_path / "copy")
    for output in ("metrics/evaluate.json", "reports/comparison.md", "plots/learning_curves.png"):
        (project / output).unlink()
    set_portable_cpu(project, False)
    monkeypatch.chdir(project)
    return project


def set_portable_cpu(project, portable):
    """train.portable_cpu in params.yaml, and in the nets' records as if they had trained so: evaluate
    refuses nets trained with other params than params.yaml gives."""
    set_params(project, {"train.portable_cpu": portable})
    for net in ("net4", "net5"):
        info = json.loads((project / "models" / f"{net}.json").read_text())
        info["config"]["train"]["portable_cpu"] = portable
        (project / "models" / f"{net}.json").write_text(json.dumps(info))


def test_weights_trained_elsewhere_are_evaluated_with_a_warning_and_no_run(copy_of, capsys, monkeypatch):
    """A fresh clone's committed weights: no training of this project noted their run, and no run is
    searched for by its tags."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(copy_of))
    shutil.rmtree(copy_of / "training-runs")
    evaluate.main()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings[:2] == [f"warning: models/{net}.pt: no training in this project noted the MLflow run of these weights (they "
                            "were trained elsewhere): its test figures are not logged to MLflow" for net in ("net4", "net5")]
    assert (copy_of / "metrics/evaluate.json").is_file()


def edit_model_info(project, net, **changes):
    path = project / "models" / f"{net}.json"
    info = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({key: value for key, value in info.items() if value is not None}))


def test_without_the_run_models_names_the_files_are_written_with_a_warning(copy_of, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(copy_of))
    client, runs = all_runs(copy_of)
    run_ids = {run_.data.tags["net"]: run_.info.run_id for run_ in runs}
    # net4's run retagged (as a planted run would be), net5's deleted: neither is the net's training.
    client.set_tag(run_ids["net4"], WEIGHTS_TAG, "0" * 64)
    client.delete_run(run_ids["net5"])
    evaluate.main()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: net4: test figures not logged to MLflow (run {run_ids['net4']} did not train these weights of net4 "
        f"(it is tagged net net4, weights {'0' * 64}))",
        f"warning: net5: test figures not logged to MLflow (run {run_ids['net5']}, which trained net5, is deleted)"]
    for output in ("metrics/evaluate.json", "reports/comparison.md", "plots/learning_curves.png"):
        assert (copy_of / output).is_file()


def test_a_planted_run_with_the_nets_tags_and_checksum_is_not_taken_for_its_training(copy_of, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(copy_of))
    client, runs = all_runs(copy_of)
    own = next(run_ for run_ in runs if run_.data.tags["net"] == "net5")
    planted = client.create_run(own.info.experiment_id, run_name=own.info.run_name, tags=own.data.tags).info.run_id
    client.set_terminated(planted)
    evaluate.main()
    assert "warning" not in capsys.readouterr().err
    assert not client.get_run(planted).data.metrics  # the test figures went to the net's own run
    model_name = default_config().registry.model_name
    version = client.get_model_version_by_alias(model_name, "net5")
    assert version.run_id == own.info.run_id == trained_run_of(copy_of, "net5")


def test_a_net_trained_on_other_data_is_refused(copy_of, capsys):
    edit_model_info(copy_of, "net5", data_hash="0123456789abcdef")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main()
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: models/net5.json: the net was trained on data 0123456789abcdef")
    assert not (copy_of / "metrics" / "evaluate.json").exists()


def test_a_net_trained_with_other_params_than_params_yaml_says_is_refused_naming_the_key(copy_of, capsys):
    # As when params.yaml is edited while `dvc repro` runs: dvc.lock records what DVC read at the start.
    set_params(copy_of, {"train.max_epochs": REPRODUCED_EPOCHS + 5})
    with pytest.raises(SystemExit) as exit_:
        evaluate.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"error: models/net4.json: net4 was trained with train.max_epochs {REPRODUCED_EPOCHS}, but params.yaml says "
        f"{REPRODUCED_EPOCHS + 5}: train it again (`dvc repro train@net4`)\n")
    assert not (copy_of / "metrics" / "evaluate.json").exists()


def context_of(dataset_input):
    return next(tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context")


def test_each_run_has_its_training_validation_and_test_faces_as_datasets_of_a_model_training_experiment(evaluated):
    project, _, _ = evaluated
    summary = json.loads((project / "data/prepared/summary.json").read_text())
    client, runs = all_runs(project)
    assert client.get_experiment_by_name("facial-keypoints").tags["mlflow.experimentKind"] == "custom_model_development"
    for run_ in runs:
        datasets = {context_of(dataset_input): dataset_input.dataset for dataset_input in run_.inputs.dataset_inputs}
        n_train, n_valid = run_.data.params["n_train"], run_.data.params["n_valid"]
        assert {context: dataset.name for context, dataset in datasets.items()} == {
            "training": f"train: {n_train} faces", "validation": f"valid: {n_valid} faces",
            "test": f"test: {summary['n_test']} faces"}
        for dataset in datasets.values():
            assert dataset.digest == summary["data_hash"]
            assert json.loads(dataset.source) == {"uri": summary["source"]}


def test_evaluating_again_logs_no_figure_twice_and_a_changed_one_as_the_latest(copy_of, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(copy_of))
    client, runs = all_runs(copy_of)
    changed = runs[0].info.run_id
    evaluated_value = runs[0].data.metrics["test_rmse_px"]
    client.log_metric(changed, "test_rmse_px", evaluated_value + 1, step=0)  # as an evaluation by other code would
    # In a process of its own, with the portable kernels the first evaluation computed with: the same figures.
    set_portable_cpu(copy_of, True)
    run(copy_of, "python", "-m", "pipeline.evaluate")
    for run_ in all_runs(copy_of)[1]:
        run_id = run_.info.run_id
        assert len(client.get_metric_history(run_id, "baseline_test_rmse_px")) == 1
        values = [point.value for point in client.get_metric_history(run_id, "test_rmse_px")]
        assert values == ([evaluated_value, evaluated_value + 1, evaluated_value] if run_id == changed
                          else [run_.data.metrics["test_rmse_px"]])
        assert run_.data.metrics["test_rmse_px"] == values[-1]
        assert sorted(map(context_of, run_.inputs.dataset_inputs)) == ["test", "training", "validation"]


def test_a_long_bootstrap_says_how_far_it_has_got(capsys):
    """A billion resamples ran silently for hours; a bootstrap past PROGRESS_SECONDS says where it is."""
    clock = iter([0.0, 1.0, evaluate.PROGRESS_SECONDS + 2.0])
    said = evaluate.bootstrap_progress(300_000, seconds=lambda: next(clock))
    said(1, 3)
    assert capsys.readouterr().err == ""
    said(2, 3)
    assert capsys.readouterr().err == "evaluate: bootstrap: 2 of 3 comparisons done (300000 resamples each, 7 s)\n"


@pytest.mark.slow  # the stages in processes of their own
def test_constant_keypoints_end_in_every_picture(tmp_path):
    """Every face labelled at the centre: the mean-shape baseline errs by 0 px, whose log crashed the
    learning curves ("math domain error")."""
    project = make_project(tmp_path / "project", {"data.source": "csv", "data.csv": "data/raw/training.csv"}, git=False)
    images = np.random.default_rng(0).integers(0, 256, (120, 96, 96), dtype=np.uint8)
    write_training_csv(project / "data/raw/training.csv", images, np.full((120, 30), 48.0))
    for stage in (["prepare"], ["train", "net4"], ["train", "net5"], ["evaluate"]):
        result = run(project, sys.executable, "-m", f"pipeline.{stage[0]}", *stage[1:])
        assert "Traceback" not in result.stderr
    assert json.loads((project / "metrics/evaluate.json").read_text())["baseline"]["test_rmse_px"] == 0.0
    for name in evaluate.PICTURE_TITLES:
        with Image.open(project / "plots" / name) as picture:
            picture.verify()
