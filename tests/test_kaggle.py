import numpy as np
import pytest

from pipeline.kaggle import (
    COLUMNS, FLIP_PAIRS, KAGGLE_MEANS, KEYPOINT_COLUMNS, KaggleFormatError, read_training_csv,
    write_training_csv,
)


def make_rows(n=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    keypoints = np.clip(KAGGLE_MEANS + rng.normal(0, 2, (n, 30)), 0, 96)
    return images, keypoints


def write_lines(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(row) for row in rows]) + "\n")
    return path


def valid_fields(keypoints=None, image=None):
    keypoints = [f"{value:.3f}" for value in (KAGGLE_MEANS if keypoints is None else keypoints)]
    return keypoints + [image if image is not None else " ".join(["128"] * 9216)]


def test_layout_constants_follow_the_kaggle_file():
    assert len(COLUMNS) == 31 and COLUMNS[-1] == "Image"
    assert KEYPOINT_COLUMNS[:4] == ("left_eye_center_x", "left_eye_center_y", "right_eye_center_x", "right_eye_center_y")
    for left, right in FLIP_PAIRS:
        assert KEYPOINT_COLUMNS[left].replace("left", "right") == KEYPOINT_COLUMNS[right]
    # the subject's left is on the image's right
    assert KAGGLE_MEANS[0] > KAGGLE_MEANS[2]


def test_round_trip_keeps_images_and_keypoints(tmp_path):
    images, keypoints = make_rows()
    keypoints[1, 4:8] = np.nan
    write_training_csv(tmp_path / "t.csv", images, keypoints)
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    read_images, read_keypoints = read_training_csv(tmp_path / "t.csv")
    assert read_images.dtype == np.uint8 and read_images.shape == (5, 96, 96)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_allclose(read_keypoints, keypoints, atol=1e-6)
    assert np.isnan(read_keypoints[1, 4:8]).all() and not np.isnan(read_keypoints[0]).any()


def test_missing_values_are_nan_not_errors(tmp_path):
    fields = valid_fields()
    fields[6] = ""
    fields[7] = ""
    path = write_lines(tmp_path / "t.csv", COLUMNS, [fields, valid_fields()])
    _, keypoints = read_training_csv(path)
    assert np.isnan(keypoints[0, 6:8]).all() and not np.isnan(keypoints[1]).any()


def expect_error(path, *fragments):
    with pytest.raises(KaggleFormatError) as caught:
        read_training_csv(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_rejects_missing_file(tmp_path):
    expect_error(tmp_path / "absent.csv", "no such file")


def test_rejects_empty_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("")
    expect_error(path, "empty")


def test_rejects_header_without_rows(tmp_path):
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, []), "no rows")


def test_rejects_missing_column(tmp_path):
    header = [c for c in COLUMNS if c != "nose_tip_y"]
    path = write_lines(tmp_path / "t.csv", header, [valid_fields()[:20] + valid_fields()[21:]])
    expect_error(path, "line 1", "nose_tip_y")


def test_rejects_misordered_columns(tmp_path):
    header = list(COLUMNS)
    header[0], header[2] = header[2], header[0]
    expect_error(write_lines(tmp_path / "t.csv", header, [valid_fields()]), "line 1", "misordered", "right_eye_center_x")


def test_rejects_extra_column(tmp_path):
    path = write_lines(tmp_path / "t.csv", list(COLUMNS) + ["extra"], [valid_fields() + ["1"]])
    expect_error(path, "extra")


def test_rejects_image_with_wrong_count(tmp_path):
    rows = [valid_fields(), valid_fields(image=" ".join(["7"] * 9215))]
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, rows), "line 3", "9215", "9216")


def test_rejects_image_with_text(tmp_path):
    rows = [valid_fields(image="1 2 x " + " ".join(["7"] * 9213))]
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, rows), "line 2", "Image")


@pytest.mark.parametrize("bad", ["256", "-1", "3.5"])
def test_rejects_pixel_out_of_range_or_fractional(tmp_path, bad):
    rows = [valid_fields(), valid_fields(), valid_fields(image=" ".join(["7"] * 9000 + [bad] + ["7"] * 215))]
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, rows), "line 4", "0..255")


def test_rejects_keypoint_that_is_not_a_number(tmp_path):
    fields = valid_fields()
    fields[21] = "abc"
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, [valid_fields(), fields]), "line 3", "nose_tip_y", "not a number")


@pytest.mark.parametrize("bad", ["96.5", "-0.1", "inf"])
def test_rejects_keypoint_outside_the_image(tmp_path, bad):
    fields = valid_fields()
    fields[0] = bad
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, [fields]), "line 2", "left_eye_center_x", "outside 0..96")


def test_rejects_row_with_too_many_fields(tmp_path):
    rows = [valid_fields(), valid_fields() + ["9"]]
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, rows), "line 3")


def test_rejects_row_with_too_few_fields(tmp_path):
    rows = [valid_fields(), valid_fields()[:10]]
    expect_error(write_lines(tmp_path / "t.csv", COLUMNS, rows), "line 3", "Image is empty")
