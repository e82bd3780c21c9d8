import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.weights import load_model, save_model
from pipeline.kaggle import KEYPOINT_COLUMNS
from pipeline.model import KeypointNet
from pipeline.predict import NamedFaces, main, predict_pixels, read_image, read_images, submission_table
from project import make_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project with an untrained net5: prediction only needs weights, not good ones."""
    directory = make_project(tmp_path_factory.mktemp("predict") / "project")
    torch.manual_seed(0)
    save_model(directory / "models" / "net5.pt", KeypointNet())
    return directory


@pytest.fixture
def workdir(project, tmp_path, monkeypatch):
    """The project's params.yaml and net5 in an empty folder, the current directory for in-process runs."""
    shutil.copy(project / "params.yaml", tmp_path)
    shutil.copytree(project / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def random_pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_test_csv(path, image_ids, images):
    pd.DataFrame({"ImageId": image_ids, "Image": [" ".join(map(str, image.ravel())) for image in images]}).to_csv(
        path, index=False)
    return path


def write_lookup(path, rows):
    """rows: (ImageId, FeatureName); Location is empty, as in Kaggle's IdLookupTable.csv."""
    table = pd.DataFrame(rows, columns=["ImageId", "FeatureName"])
    table.insert(0, "RowId", range(1, len(rows) + 1))
    table["Location"] = ""
    table.to_csv(path, index=False)
    return path


def test_the_command_predicts_a_png_and_draws_it(project, tmp_path):
    Image.fromarray(random_pixels((120, 100, 3))).save(tmp_path / "face.png")
    result = run(project, "python", "-m", "pipeline.predict", str(tmp_path / "face.png"),
                 "--output", str(tmp_path / "keypoints.csv"), "--draw", str(tmp_path / "drawn"))
    assert "Traceback" not in result.stderr
    table = pd.read_csv(tmp_path / "keypoints.csv")
    assert list(table.columns) == ["ImageId", *KEYPOINT_COLUMNS]
    assert table["ImageId"].tolist() == [str(tmp_path / "face.png")]
    expected = predict_pixels(load_model(project / "models" / "net5.pt"), read_images([tmp_path / "face.png"]))
    np.testing.assert_allclose(table[list(KEYPOINT_COLUMNS)].to_numpy(), expected, atol=1e-3)
    with Image.open(tmp_path / "drawn" / "face.png") as drawn:
        assert drawn.size == (384, 384)


def test_images_become_96_pixel_grayscale(tmp_path):
    Image.new("RGB", (200, 150), (200, 100, 50)).save(tmp_path / "orange.jpg", quality=100)
    pixels = read_image(tmp_path / "orange.jpg")
    assert pixels.shape == (96, 96) and pixels.dtype == np.uint8
    # ITU-R 601 luma, as Pillow's "L" conversion: 0.299 R + 0.587 G + 0.114 B.
    assert np.all(np.abs(pixels.astype(int) - 124) <= 1)


def test_a_kaggle_submission(workdir):
    write_test_csv(workdir / "test.csv", [7, 3], random_pixels((2, 96, 96)))
    write_lookup(workdir / "IdLookupTable.csv",
                 [(3, "left_eye_center_x"), (7, "nose_tip_y"), (3, "mouth_center_bottom_lip_y")])
    main(["test.csv", "--lookup", "IdLookupTable.csv", "--output", "keypoints.csv"])
    submission = pd.read_csv(workdir / "submission.csv")
    assert list(submission.columns) == ["RowId", "Location"]
    assert submission["RowId"].tolist() == [1, 2, 3]
    keypoints = pd.read_csv(workdir / "keypoints.csv").set_index("ImageId")
    assert keypoints.index.tolist() == [7, 3]
    expected = [keypoints.at[3, "left_eye_center_x"], keypoints.at[7, "nose_tip_y"],
                keypoints.at[3, "mouth_center_bottom_lip_y"]]
    assert submission["Location"].tolist() == pytest.approx(expected, abs=1e-3)


def test_submission_locations_are_clipped_to_the_image(tmp_path):
    faces = NamedFaces(["1"], random_pixels((1, 96, 96)))
    keypoints = np.full((1, 30), 50.0)
    keypoints[0, :2] = [-5.0, 100.0]
    lookup = pd.DataFrame({"RowId": ["1", "2", "3"], "ImageId": ["1", "1", "1"],
                           "FeatureName": ["left_eye_center_x", "left_eye_center_y", "nose_tip_x"]})
    submission = submission_table(tmp_path / "lookup.csv", lookup, tmp_path / "test.csv", faces, keypoints)
    assert submission["Location"].tolist() == [0.0, 96.0, 50.0]


def bad_image(tmp_path):
    (tmp_path / "broken.png").write_text("not a picture")
    return ["broken.png"], "broken.png: not a readable image"


def wrong_test_columns(tmp_path):
    pd.DataFrame({"Id": [1], "Image": ["1 2"]}).to_csv(tmp_path / "test.csv", index=False)
    return ["test.csv"], "test.csv: line 1: column 'ImageId' is missing"


def bad_image_row(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1, 2], random_pixels((2, 96, 96)))
    lines = (tmp_path / "test.csv").read_text().splitlines()
    lines[2] = "2,1 2 3 4 5"
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    return ["test.csv"], "test.csv: line 3: Image has 5 values, expected 9216"


def image_missing_from_test_csv(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1, 2], random_pixels((2, 96, 96)))
    write_lookup(tmp_path / "lookup.csv", [(1, "nose_tip_x"), (99, "nose_tip_y")])
    return ["test.csv", "--lookup", "lookup.csv"], "lookup.csv: line 3: ImageId 99 is not in test.csv"


def unknown_feature(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1], random_pixels((1, 96, 96)))
    write_lookup(tmp_path / "lookup.csv", [(1, "nose_x")])
    return ["test.csv", "--lookup", "lookup.csv"], "lookup.csv: line 2: unknown FeatureName 'nose_x'"


def wrong_lookup_columns(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1], random_pixels((1, 96, 96)))
    pd.DataFrame({"RowId": [1], "ImageId": [1], "Feature": ["nose_tip_x"]}).to_csv(tmp_path / "lookup.csv",
                                                                                    index=False)
    return ["test.csv", "--lookup", "lookup.csv"], "lookup.csv: line 1: column 'FeatureName' is missing"


def unknown_net(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    return ["face.png", "--net", "net9"], "unknown net 'net9'"


def untrained_net(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    return ["face.png", "--net", "net4"], "models/net4.pt: no such model file"


@pytest.mark.parametrize("make_input", [
    bad_image, wrong_test_columns, bad_image_row, image_missing_from_test_csv, unknown_feature,
    wrong_lookup_columns, unknown_net, untrained_net,
])
def test_bad_input_is_one_line_naming_the_file_and_row(workdir, capsys, make_input):
    arguments, message = make_input(workdir)
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert message in error
    # Every input is checked before anything is written.
    assert not (workdir / "predictions.csv").exists() and not (workdir / "submission.csv").exists()
