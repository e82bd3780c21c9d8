import bz2
import gzip
import lzma
import os
import zipfile

import numpy as np
import pytest

from pipeline.base.errors import PipelineError
from pipeline.evaluate import read_history
from pipeline.faces import kaggle
from pipeline.faces.data import load_split
from pipeline.faces.kaggle import (
    COLUMNS, FLIP_PAIRS, KAGGLE_MEANS, KEYPOINT_COLUMNS, KaggleFormatError, check_csv_text, read_training_csv,
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


def training_csv_bytes(tmp_path, n=3):
    write_training_csv(tmp_path / "plain.csv", *make_rows(n))
    return (tmp_path / "plain.csv").read_bytes()


@pytest.mark.parametrize("compress, what", [
    (gzip.compress, "is gzip-compressed, not a CSV text file (decompress it first: gunzip)"),
    (bz2.compress, "is bzip2-compressed, not a CSV text file (decompress it first: bunzip2)"),
    (lzma.compress, "is xz-compressed, not a CSV text file (decompress it first: unxz)"),
])
def test_rejects_a_compressed_file(tmp_path, compress, what):
    path = tmp_path / "training.csv"
    path.write_bytes(compress(training_csv_bytes(tmp_path)))
    assert expect_error(path) == f"{path}: {what}"


def test_rejects_a_zip_archive(tmp_path):
    path = tmp_path / "training.csv"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("training.csv", training_csv_bytes(tmp_path))
    expect_error(path, "is a zip archive", "unzip")


def test_rejects_utf16_text(tmp_path):
    path = tmp_path / "training.csv"
    path.write_text(training_csv_bytes(tmp_path).decode(), encoding="utf-16")
    expect_error(path, "is UTF-16 text, not UTF-8")


def test_rejects_a_binary_file_naming_the_line_of_its_nul_byte(tmp_path):
    path = tmp_path / "training.csv"
    path.write_bytes(training_csv_bytes(tmp_path).replace(b"\n", b"\n\x00", 1))
    expect_error(path, "is a binary file (a NUL byte in line 2), not a CSV")


def test_rejects_text_that_is_not_utf8_naming_line_and_column(tmp_path):
    fields = valid_fields()
    fields[1] = "37.7\xe9"  # a Latin-1 "é" in line 4, after the 11 characters "66.400,37.7"
    path = tmp_path / "t.csv"
    lines = [",".join(COLUMNS), ",".join(valid_fields()), ",".join(valid_fields()), ",".join(fields)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    assert expect_error(path).endswith("line 4: not UTF-8 text (byte 0xe9 at column 12)")


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 4096])
def test_the_place_of_a_bad_byte_is_right_whatever_the_chunks(tmp_path, monkeypatch, chunk_bytes):
    # Two-byte "é"s are cut between chunks of every size; the Latin-1 byte is in line 1234, column 18.
    monkeypatch.setattr(kaggle, "CHECK_CHUNK_BYTES", chunk_bytes)
    lines = [f"{row},é{row}".encode() for row in range(2000)]
    lines[1233] = "1233,é12345678901".encode() + b"\xe9,"
    path = tmp_path / "t.csv"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(KaggleFormatError, match=r"line 1234: not UTF-8 text \(byte 0xe9 at column 18\)$"):
        check_csv_text(path)


def test_rejects_a_file_that_ends_inside_a_character(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"a,b\n1,\xc3")
    with pytest.raises(KaggleFormatError, match=r"line 2: not UTF-8 text \(byte 0xc3 at column 3\)$"):
        check_csv_text(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    images, keypoints = make_rows()
    write_training_csv(tmp_path / "plain.csv", images, keypoints)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    read_images, read_keypoints = read_training_csv(path)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_allclose(read_keypoints, keypoints, atol=1e-6)


def test_the_training_history_is_checked_as_text_too(tmp_path):
    path = tmp_path / "history.csv"
    history = b"epoch,train_loss,valid_loss,learning_rate,momentum\n1,0.5,0.6,0.01,0.9\n"
    path.write_bytes(gzip.compress(history))
    with pytest.raises(PipelineError, match="is gzip-compressed"):
        read_history(path)
    path.write_bytes(b"\xef\xbb\xbf" + history)
    assert read_history(path)["epoch"].tolist() == [1]


def test_a_named_pipe_given_as_the_csv_is_named_as_such_not_as_missing(tmp_path):
    """It was "no such file". A CSV is read twice (checked, then parsed), which a pipe cannot be."""
    os.mkfifo(tmp_path / "training.csv")
    with pytest.raises(KaggleFormatError) as caught:
        load_split(tmp_path / "training.csv", 0, 0.15, "prepare.test_fraction")  # as prepare reads it
    assert str(caught.value) == (f"{tmp_path / 'training.csv'}: not a regular file (a named pipe, a device or a "
                                 "directory), which cannot be read twice as the CSV is (checked, then parsed): save it "
                                 "to a file first")
