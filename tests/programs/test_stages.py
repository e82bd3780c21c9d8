"""The stages run through real `dvc` in a scratch git repository."""

import json

import numpy as np
import pytest
import yaml

from pipeline.faces.data import load_incomplete_faces, read_summary
from pipeline.faces.kaggle import COLUMNS, KAGGLE_MEANS, KEYPOINT_COLUMNS, write_training_csv
from pipeline.base.sources import stage_code
from tests.support.project import ROOT, make_project, run, set_params

# Stages run as their commands, in processes of their own.
pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project")


def kaggle_like_csv(path, n=60):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    keypoints = np.clip(KAGGLE_MEANS + rng.normal(0, 2, (n, 30)), 0, 96)
    keypoints[:10, 4:20] = np.nan
    write_training_csv(path, images, keypoints)
    return path


def test_prepare_builds_the_synthetic_set_offline(project):
    run(project, "dvc", "repro", "prepare")
    csv = project / "data/synthetic/training.csv"
    lines = csv.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert len(lines) == 1 + 120
    summary = json.loads((project / "data/prepared/summary.json").read_text())
    assert summary["source"] == "data/synthetic/training.csv" and summary["n_rows"] == 120
    # Every row once: in a portion, complete or not, or dropped (without a keypoint, or a repeated image).
    assert sum(summary[key] for key in ("n_train", "n_test", "n_train_incomplete", "n_test_incomplete",
                                        "n_dropped_unlabelled", "n_dropped_repeated")) == 120
    assert summary["n_train_incomplete"] + summary["n_test_incomplete"] == 36  # synthetic.missing_fraction: 0.3
    assert len(summary["data_hash"]) == 16 and len(summary["incomplete_hash"]) == 16
    assert sorted(summary["sha256"]) == ["test.npz", "test_incomplete.npz", "train.npz", "train_incomplete.npz"]
    assert all((project / "data/prepared" / name).is_file() for name in summary["sha256"])
    assert (project / "plots/samples.png").stat().st_size > 10_000


def test_the_kaggle_pattern_of_missing_keypoints_reaches_the_incomplete_portions(project):
    """synthetic.missing_fraction 0.7 and missing_pattern kaggle: the real file's share of partial rows, each
    with only the eye centres, the nose tip and the bottom lip."""
    set_params(project, {"synthetic.missing_fraction": 0.7, "synthetic.missing_pattern": "kaggle"})
    result = run(project, "dvc", "repro", "prepare")
    assert "31 train + 5 test, and 71 + 13 lacking some keypoints" in result.stdout  # 36 complete rows, 84 partial
    summary = read_summary(project / "data/prepared/summary.json")
    central = [KEYPOINT_COLUMNS.index(f"{name}_{axis}") for name in ("left_eye_center", "right_eye_center",
                                                                      "nose_tip", "mouth_center_bottom_lip")
               for axis in "xy"]
    for portion in ("train_incomplete", "test_incomplete"):
        faces = load_incomplete_faces(project / f"data/prepared/{portion}.npz", summary)
        assert (np.isnan(faces.y) == ~np.isin(np.arange(30), central)).all()


def test_prepare_reads_a_users_kaggle_csv(project):
    kaggle_like_csv(project / "data/raw/training.csv")
    set_params(project, {"data.source": "csv"})
    result = run(project, "dvc", "repro", "prepare")
    summary = json.loads((project / "data/prepared/summary.json").read_text())
    assert summary["source"] == "data/raw/training.csv"
    assert summary["n_rows"] == 60 and summary["n_dropped_unlabelled"] == 0
    assert (summary["n_train_incomplete"], summary["n_test_incomplete"]) == (8, 2)  # rows lacking 8 keypoints, kept
    assert "0 dropped for lacking every keypoint" in result.stdout and "and 8 + 2 lacking some keypoints" in result.stdout


def test_changing_the_users_csv_reruns_prepare(project):
    kaggle_like_csv(project / "data/raw/training.csv", n=60)
    set_params(project, {"data.source": "csv"})
    run(project, "dvc", "repro", "prepare")
    kaggle_like_csv(project / "data/raw/training.csv", n=70)
    run(project, "dvc", "repro", "prepare")
    assert json.loads((project / "data/prepared/summary.json").read_text())["n_rows"] == 70


@pytest.mark.parametrize("corrupt, message", [
    (lambda lines: lines[:1] + ["abc" + lines[1][lines[1].index(","):]] + lines[2:], "line 2: left_eye_center_x is 'abc', not a number"),
    (lambda lines: [lines[0].replace("nose_tip_x", "nose_x")] + lines[1:], "line 1"),
    (lambda lines: lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:], "line 4: Image has 9215 values"),
    (lambda lines: lines[:2] + ["200" + lines[2][lines[2].index(","):]] + lines[3:], "line 3: left_eye_center_x is 200"),
    (lambda lines: lines[:1], "no rows"),
    (lambda lines: [], "empty"),
])
def test_prepare_rejects_a_malformed_csv_in_one_line(project, corrupt, message):
    lines = kaggle_like_csv(project / "data/raw/training.csv", n=5).read_text().splitlines()
    (project / "data/raw/training.csv").write_text("\n".join(corrupt(lines)) + ("\n" if corrupt(lines) else ""))
    set_params(project, {"data.source": "csv"})
    result = run(project, "dvc", "repro", "prepare", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data/raw/training.csv" in errors[0]
    assert message in errors[0]


def test_prepare_without_complete_rows_fails_clearly(project):
    rng = np.random.default_rng(0)
    keypoints = np.full((4, 30), np.nan)
    keypoints[:, :4] = 40
    write_training_csv(project / "data/raw/training.csv", rng.integers(0, 256, (4, 96, 96), dtype=np.uint8), keypoints)
    set_params(project, {"data.source": "csv"})
    result = run(project, "dvc", "repro", "prepare", check=False)
    assert result.returncode != 0 and "no row has all 30 keypoints" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_users_csv_is_named(project):
    set_params(project, {"data.source": "csv", "data.csv": "data/raw/absent.csv"})
    result = run(project, "python", "-m", "pipeline.prepare", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: data/raw/absent.csv: no such file"


def test_every_stage_lists_exactly_the_pipeline_modules_its_command_runs():
    """A module missing from a stage's deps would leave its outputs stale when it changes; one too many reruns it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage's body
        module = stage["cmd"].split()[2]
        listed = sorted(dep for dep in stage["deps"] if dep.startswith("pipeline/"))
        assert listed == [str(path.relative_to(ROOT)) for path in stage_code(module)], name


def test_a_training_runs_no_code_of_the_synthetic_faces():
    """The logged model's input example is a face the net trained on: the renderer reaches a training
    only through the faces it renders, so that an edit to it that renders the same faces reruns no
    training and leaves a checkpoint resumable (its code hash)."""
    assert ROOT / "pipeline/faces/synthetic.py" not in stage_code("pipeline.train")
