"""A composite of nets of groups of keypoints through the programs: evaluate scores it beside the nets
(evaluate.json, the report), registers one version for it and can make it champion; predict --net
<composite> answers as its nets side by side; evaluating again adds no version."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.base.composite import combine
from pipeline.base.config import keypoint_columns
from pipeline.base.weights import load_model
from pipeline.evaluation.metrics import predict
from pipeline.faces.data import images_of, load_faces, pixels_of, read_summary, unscale_keypoints
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from tests.support.composites import COMPOSITE, cut_into_groups
from tests.support.project import copy_project, run

pytestmark = pytest.mark.slow  # a project reproduced with `dvc repro`, then evaluated


def versions_of(project):
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.search_model_versions("name = 'facial-keypoints'")


@pytest.fixture(scope="module")
def evaluated(reproduced, tmp_path_factory):
    """The reproduced project with net4 cut into two nets of groups, composite `split` of them, evaluated."""
    project = copy_project(reproduced, tmp_path_factory.mktemp("composites") / "project")
    groups = cut_into_groups(project)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        result = run(project, "python", "-m", "pipeline.evaluate")
    return project, groups, result


def test_evaluate_scores_the_composite_beside_the_nets_and_not_its_nets(evaluated):
    project, _, result = evaluated
    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(results)[:4] == ["net4", "net5", COMPOSITE, "baseline"]
    assert f"{COMPOSITE}_vs_baseline" in results and f"{COMPOSITE}_vs_net4" in results
    assert "eyes" not in results and "rest" not in results
    # net4 cut in two and put back together: net4's figures, to the float32 rounding of a narrower output layer.
    assert results[COMPOSITE]["test_rmse_px"] == pytest.approx(results["net4"]["test_rmse_px"], rel=1e-5)
    report = (project / "reports" / "comparison.md").read_text()
    assert f"| {COMPOSITE} | " in report and "split puts eyes and rest side by side" in report
    assert COMPOSITE in report.splitlines()[0]
    errors = pd.read_csv(project / "metrics" / "keypoint_errors.csv")
    assert COMPOSITE in errors.columns and f"{COMPOSITE}_every_labelled" in errors.columns
    # The curves are the nets' that trained: the composite has none.
    assert set(pd.read_csv(project / "metrics" / "valid_rmse.csv")["model"]) == {"net4", "net5",
                                                                                 "mean-shape baseline (test)"}
    assert f"{COMPOSITE} " in result.stdout


def test_the_registry_has_one_version_of_the_composite_which_can_be_champion_and_evaluate_again_adds_none(evaluated):
    project, _, _ = evaluated
    client, versions = versions_of(project)
    [version] = [version for version in versions if version.tags["net"] == COMPOSITE]
    assert client.get_model_version_by_alias("facial-keypoints", COMPOSITE).version == version.version
    champion = client.get_model_version_by_alias("facial-keypoints", "champion")
    means = {each.tags["net"]: float(each.tags["net_mean_test_rmse_px"]) for each in versions}
    assert champion.tags["net"] == min(means, key=means.get)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        run(project, "python", "-m", "pipeline.evaluate")
        promoted = run(project, "python", "-m", "pipeline.promote")
    assert len(versions_of(project)[1]) == len(versions)
    assert f"models:/facial-keypoints@{COMPOSITE} -> version {version.version}" in promoted.stdout


def test_predict_with_the_composite_answers_as_its_nets_side_by_side_and_as_its_registered_model(evaluated):
    project, groups, _ = evaluated
    test = load_faces(project / "data" / "prepared" / "test.npz", read_summary(project / "data" / "prepared" / "summary.json"))
    faces = pixels_of(test.X[:3, 0])
    for index, face in enumerate(faces):
        Image.fromarray(face).save(project / f"face{index}.png")
    images = [f"face{index}.png" for index in range(len(faces))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        run(project, "python", "-m", "pipeline.predict", "--net", COMPOSITE, "--output", "composite.csv", *images)
        run(project, "python", "-m", "pipeline.predict", "--net", f"models:/facial-keypoints@{COMPOSITE}",
            "--output", "registered.csv", *images)
        refused = run(project, "python", "-m", "pipeline.predict", "--net", "eyes", *images, check=False)
    assert refused.returncode != 0 and "name a net of all 15 or a composite of it (split)" in refused.stderr
    predicted = pd.read_csv(project / "composite.csv")[list(KEYPOINT_COLUMNS)].to_numpy()
    side_by_side = unscale_keypoints(combine(
        [keypoint_columns(keypoints) for keypoints in groups.values()],
        [predict(load_model(project / "models" / f"{net}.pt"), images_of(faces[:, None])) for net in groups]))
    assert np.allclose(predicted, side_by_side, atol=1e-4)  # the CSV's four decimals
    registered = pd.read_csv(project / "registered.csv")[list(KEYPOINT_COLUMNS)].to_numpy()
    assert np.array_equal(registered, predicted)
