"""The tutorial's specialists through the train stage: a net of some keypoints trained on every face
labelled for them, started from another net's kept weights, and refused in one line when those are
missing or stale. Real stages in processes of their own, on a tiny synthetic set with Kaggle's pattern."""

import json
import sys

import pytest
import torch

from pipeline.base.config import load_config
from pipeline.base.model import OUTPUT_LAYER, KeypointNet
from pipeline.train import build_trainer
from tests.support.project import copy_project, make_project, run, set_params
from tests.support.trainings import train, weights

pytestmark = pytest.mark.slow

EYES = ["left_eye_center", "right_eye_center"]
# Most rows lack the 11 outer keypoints, as Kaggle's: the eye centres are labelled on every face.
SPECIALISTS = {
    "synthetic.missing_fraction": 0.7, "synthetic.missing_pattern": "kaggle",
    "nets": {"net5": {"flip": True}, "eyes": {"flip": True, "keypoints": EYES, "init_from": "net5"},
             "brows": {"flip": False, "keypoints": ["left_eyebrow_outer_end"], "masked": True}},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("specialists") / "project", SPECIALISTS, git=False)
    for stage in ("synthesize", "prepare"):
        run(project, sys.executable, "-m", f"pipeline.{stage}")
    return project


def refusal(project, net):
    result = train(project, net, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_specialist_starts_from_its_sources_kept_weights_but_the_output_layer_and_trains_on_more_faces(
        prepared, monkeypatch, tmp_path):
    project = copy_project(prepared, tmp_path / "project")
    assert "nets.eyes.init_from: models/net5.pt: no such file: train net5 first (`dvc repro train@net5`)" in refusal(
        project, "eyes")
    train(project, "net5")
    monkeypatch.chdir(project)
    config = load_config()
    started = build_trainer(config, "eyes", torch.device("cpu")).network.state_dict()
    source = weights(project, "net5")
    torch.manual_seed(config.train.seeds[0])
    fresh = KeypointNet(outputs=4).state_dict()
    for name, value in started.items():
        expected = fresh[name] if name.startswith(OUTPUT_LAYER) else source[name]
        assert torch.equal(value, expected), name

    train(project, "eyes")
    record = json.loads((project / "models/eyes.json").read_text())
    assert record["init_from"] == {"net": "net5",
                                   "weights_sha256": json.loads((project / "models/net5.json").read_text())[
                                       "weights_sha256"]}
    figures = {net: json.loads((project / f"metrics/train/{net}.json").read_text()) for net in ("net5", "eyes")}
    summary = json.loads((project / "data/prepared/summary.json").read_text())
    # net5 trains on the complete faces; the eyes' specialist on those and every incomplete face (its two
    # keypoints are labelled on all), each less its validation part.
    assert figures["net5"]["train_faces"] < figures["eyes"]["train_faces"]
    assert figures["eyes"]["train_faces"] == pytest.approx(
        0.8 * (summary["n_train"] + summary["n_train_incomplete"]), abs=1)
    assert weights(project, "eyes")[OUTPUT_LAYER + "weight"].shape == (4, 500)

    # net5's params changed since: its weights are not the ones params.yaml describes.
    set_params(project, {"nets.net5.max_epochs": 3})
    assert "nets.eyes.init_from: models/net5.pt was trained with other params or data than params.yaml" in refusal(
        project, "eyes")
    # net5 trained again, and the eyes' specialist not (DVC does not know it depends on net5): evaluate refuses it.
    train(project, "net5")
    train(project, "brows")
    evaluated = run(project, sys.executable, "-m", "pipeline.evaluate", check=False)
    assert evaluated.returncode != 0
    assert evaluated.stderr.strip().splitlines()[-1] == (
        f"error: models/eyes.json: eyes started from weights of net5 ({record['init_from']['weights_sha256'][:12]}...) "
        "that it no longer has: train eyes again (`dvc repro --force train@eyes`)")


def test_a_masked_specialist_trains_on_every_face_labelled_for_its_keypoint(prepared, tmp_path):
    project = copy_project(prepared, tmp_path / "project")
    train(project, "brows")
    history = (project / "metrics/history/brows.csv").read_text().splitlines()
    assert len(history) == 3 and "nan" not in "".join(history).lower()
    assert weights(project, "brows")[OUTPUT_LAYER + "weight"].shape == (2, 500)
