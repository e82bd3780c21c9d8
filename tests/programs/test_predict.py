import gzip
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageCms

from pipeline.base.errors import PipelineError
from pipeline.base.model import KeypointNet
from pipeline.base.weights import load_model, save_model, weights_checksum
from pipeline.faces.kaggle import KEYPOINT_COLUMNS, LOOKUP_COLUMNS, read_table
from pipeline.predict import Frame, NamedFaces, main, predict_pixels, read_face, submission_table
from pipeline.tracking.store import connect
from pipeline.tracking.trained_by import WEIGHTS_TAG
from tests.support.project import ROOT, make_project, run

# Every 8-bit level, in a 96x96 face so that no resizing blurs the comparison.
GRADIENT = (np.arange(96 * 96) % 256).astype(np.uint8).reshape(96, 96)
ORANGE = (200, 100, 50)
ORANGE_LUMA = 124  # 0.299 * 200 + 0.587 * 100 + 0.114 * 50


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


def read_image(path):
    """The net's 96x96 face of an image file."""
    return read_face(path)[0]


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


@pytest.mark.slow  # the command in a process of its own
def test_the_command_predicts_a_png_and_draws_it(project, tmp_path):
    Image.fromarray(random_pixels((120, 100, 3))).save(tmp_path / "face.png")
    result = run(project, "python", "-m", "pipeline.predict", str(tmp_path / "face.png"),
                 "--output", str(tmp_path / "keypoints.csv"), "--draw", str(tmp_path / "drawn"))
    assert "Traceback" not in result.stderr
    table = pd.read_csv(tmp_path / "keypoints.csv")
    assert list(table.columns) == ["ImageId", *KEYPOINT_COLUMNS]
    assert table["ImageId"].tolist() == [str(tmp_path / "face.png")]
    face, frame = read_face(tmp_path / "face.png")
    assert frame == Frame(side=120, left=10, top=0)  # 100 wide, 120 high: padded on both sides
    expected = frame.to_image(predict_pixels(load_model(project / "models" / "net5.pt"), NamedFaces(["face"], face[None])))
    np.testing.assert_allclose(table[list(KEYPOINT_COLUMNS)].to_numpy(), expected, atol=1e-3)
    with Image.open(tmp_path / "drawn" / "face.png") as drawn:
        assert drawn.size == (300, 360)  # the image itself, enlarged 3 times


def test_images_become_96_pixel_grayscale(tmp_path):
    Image.new("RGB", (200, 150), (200, 100, 50)).save(tmp_path / "orange.jpg", quality=100)
    pixels = read_image(tmp_path / "orange.jpg")
    assert pixels.shape == (96, 96) and pixels.dtype == np.uint8
    # ITU-R 601 luma, as Pillow's "L" conversion: 0.299 R + 0.587 G + 0.114 B.
    assert np.all(np.abs(pixels.astype(int) - 124) <= 1)


def saved(image, path, **options):
    image.save(path, **options)
    return path


def sixteen_bit_png(tmp_path):
    pixels = (np.arange(96 * 96, dtype=np.uint32) * 65535 // (96 * 96 - 1)).astype(np.uint16).reshape(96, 96)
    # x / 257, rounded: 0..65535 onto 0..255.
    return saved(Image.fromarray(pixels), tmp_path / "face.png"), "I;16", (pixels.astype(np.uint32) + 128) // 257


def big_endian_16_bit_tiff(tmp_path):
    image = Image.new("I;16B", (96, 96))
    image.frombytes((GRADIENT.astype(">u2") * 257).tobytes())
    return saved(image, tmp_path / "face.tif"), "I;16B", GRADIENT


def sixteen_bit_png_with_a_transparent_level(tmp_path):
    path = saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), tmp_path / "face.png", transparency=0)
    return path, "I;16", np.where(GRADIENT == 0, 255, GRADIENT)


def float_tiff_in_0_1(tmp_path):
    return saved(Image.fromarray(GRADIENT / np.float32(255)), tmp_path / "face.tif"), "F", GRADIENT


def float_tiff_in_0_255(tmp_path):
    # Levels a little off, within 0..255: each rounds to the nearest.
    pixels = (GRADIENT + np.where(GRADIENT < 255, 0.3, -0.3)).astype(np.float32)
    return saved(Image.fromarray(pixels), tmp_path / "face.tif"), "F", GRADIENT


def integer_tiff_of_8_bit_levels(tmp_path):
    return saved(Image.fromarray(GRADIENT.astype(np.int32)), tmp_path / "face.tif"), "I", GRADIENT


def integer_tiff_of_16_bit_levels(tmp_path):
    return saved(Image.fromarray(GRADIENT.astype(np.int32) * 257), tmp_path / "face.tif"), "I", GRADIENT


def half_orange(mode, transparent_rest=False):
    """A palette face: the left half orange (index 1), the rest index 0, black."""
    image = Image.new(mode, (96, 96), 0 if mode == "P" else (0, 0 if transparent_rest else 255))
    image.putpalette([0, 0, 0, *ORANGE])
    image.paste(1 if mode == "P" else (1, 255), (0, 0, 48, 96))
    return image


def halves(left, right):
    return np.hstack([np.full((96, 48), left), np.full((96, 48), right)])


def palette_png(tmp_path):
    return saved(half_orange("P"), tmp_path / "face.png"), "P", halves(ORANGE_LUMA, 0)


def palette_png_with_transparency(tmp_path):
    path = saved(half_orange("P"), tmp_path / "face.png", transparency=0)
    return path, "P", halves(ORANGE_LUMA, 255)


def palette_alpha_tiff(tmp_path):
    return saved(half_orange("PA", transparent_rest=True), tmp_path / "face.tif"), "PA", halves(ORANGE_LUMA, 255)


def half_transparent_black_rgba_png(tmp_path):
    # Black at alpha 128 over white: 255 * (1 - 128 / 255) = 127.
    path = saved(Image.new("RGBA", (96, 96), (0, 0, 0, 128)), tmp_path / "face.png")
    return path, "RGBA", np.full((96, 96), 127)


def half_transparent_black_la_png(tmp_path):
    return saved(Image.new("LA", (96, 96), (0, 128)), tmp_path / "face.png"), "LA", np.full((96, 96), 127)


def bilevel_png(tmp_path):
    checks = np.indices((96, 96)).sum(axis=0) % 2 == 0
    return saved(Image.fromarray(checks), tmp_path / "face.png"), "1", np.where(checks, 255, 0)


def orange(mode, tmp_path, name):
    image = Image.new("RGB", (96, 96), ORANGE)
    if mode == "LAB":
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        image = ImageCms.applyTransform(image, ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    else:
        image = image.convert(mode)
    return saved(image, tmp_path / name), mode, np.full((96, 96), ORANGE_LUMA)


def cmyk_jpeg(tmp_path):
    return orange("CMYK", tmp_path, "face.jpg")


def ycbcr_tiff(tmp_path):
    return orange("YCbCr", tmp_path, "face.tif")


def lab_tiff(tmp_path):
    return orange("LAB", tmp_path, "face.tif")


@pytest.mark.parametrize("write_face", [
    sixteen_bit_png, big_endian_16_bit_tiff, sixteen_bit_png_with_a_transparent_level, float_tiff_in_0_1,
    float_tiff_in_0_255, integer_tiff_of_8_bit_levels, integer_tiff_of_16_bit_levels, palette_png,
    palette_png_with_transparency, palette_alpha_tiff, half_transparent_black_rgba_png,
    half_transparent_black_la_png, bilevel_png, cmyk_jpeg, ycbcr_tiff, lab_tiff,
])
def test_images_of_every_mode_become_8_bit_gray_in_their_real_range(tmp_path, write_face):
    path, mode, expected = write_face(tmp_path)
    with Image.open(path) as image:
        assert image.mode == mode
    pixels = read_image(path)
    assert pixels.dtype == np.uint8
    # Colour conversions (JPEG's, littlecms's) may round a level differently.
    tolerance = 1 if mode in ("CMYK", "YCbCr", "LAB") else 0
    np.testing.assert_allclose(pixels, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_8_bit_gray_colour_and_palette_images_decode_as_before(tmp_path, mode):
    image = Image.fromarray(random_pixels((120, 120, 3))).convert(mode)
    path = saved(image, tmp_path / "face.png")
    with Image.open(path) as reopened:
        before = reopened.convert("L").resize((96, 96), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(read_image(path), np.asarray(before))


@pytest.mark.parametrize("pixels, problem", [
    (np.full((9, 9), np.nan, dtype=np.float32), "a floating-point image with NaN or infinite values"),
    (np.linspace(-1, 3, 81, dtype=np.float32).reshape(9, 9), "values in -1..3, neither 0..1 nor 0..255"),
    (np.full((9, 9), -5, dtype=np.int32), "negative values (down to -5)"),
    (np.full((9, 9), 70000, dtype=np.int32), "values up to 70000, more than 16 bits"),
])
def test_an_image_out_of_every_known_range_is_refused_naming_the_file(tmp_path, pixels, problem):
    path = saved(Image.fromarray(pixels), tmp_path / "face.tif")
    with pytest.raises(PipelineError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)


def test_a_16_bit_face_is_predicted_as_its_8_bit_levels(workdir):
    face = random_pixels((96, 96))
    Image.fromarray(face).save(workdir / "face8.png")
    Image.fromarray(face.astype(np.uint16) * 257).save(workdir / "face16.png")
    main(["face8.png", "face16.png"])
    keypoints = pd.read_csv(workdir / "predictions.csv")[list(KEYPOINT_COLUMNS)].to_numpy()
    np.testing.assert_array_equal(keypoints[0], keypoints[1])


def test_a_table_with_a_utf8_byte_order_mark_is_read(tmp_path):
    (tmp_path / "lookup.csv").write_bytes(b"\xef\xbb\xbfRowId,ImageId,FeatureName\n1,1,nose_tip_x\n")
    table = read_table(tmp_path / "lookup.csv", LOOKUP_COLUMNS, dtype=str, keep_default_na=False)
    assert table.columns.tolist() == ["RowId", "ImageId", "FeatureName"]


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
    keypoints = np.full((1, 30), 50.0)
    keypoints[0, :2] = [-5.0, 100.0]
    lookup = pd.DataFrame({"RowId": ["1", "2", "3"], "ImageId": ["1", "1", "1"],
                           "FeatureName": ["left_eye_center_x", "left_eye_center_y", "nose_tip_x"]})
    submission = submission_table(tmp_path / "lookup.csv", lookup, tmp_path / "test.csv", ["1"], keypoints)
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


def gzipped_test_csv(tmp_path):
    write_test_csv(tmp_path / "plain.csv", [1], random_pixels((1, 96, 96)))
    (tmp_path / "test.csv").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    return ["test.csv"], "test.csv: is gzip-compressed, not a CSV text file (decompress it first: gunzip)"


def compressed_test_csv_name(tmp_path):
    write_test_csv(tmp_path / "plain.csv", [1], random_pixels((1, 96, 96)))
    (tmp_path / "test.csv.gz").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    return ["test.csv.gz"], "test.csv.gz: is gzip-compressed"


def zipped_lookup(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1], random_pixels((1, 96, 96)))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("IdLookupTable.csv", "RowId,ImageId,FeatureName\n1,1,nose_tip_x\n")
    (tmp_path / "lookup.csv").write_bytes(archive.getvalue())
    return ["test.csv", "--lookup", "lookup.csv"], "lookup.csv: is a zip archive"


def latin1_lookup(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1], random_pixels((1, 96, 96)))
    (tmp_path / "lookup.csv").write_bytes(
        "RowId,ImageId,FeatureName\n1,1,nose_tip_x\n2,1,nose_tip_y é\n".encode("latin-1"))
    return ["test.csv", "--lookup", "lookup.csv"], "lookup.csv: line 3: not UTF-8 text (byte 0xe9 at column 16)"


def binary_test_csv(tmp_path):
    (tmp_path / "test.csv").write_bytes(b"ImageId,Image\n1,\x00\x01\x02\n")
    return ["test.csv"], "test.csv: is a binary file (a NUL byte in line 2), not a CSV"


def float_image_out_of_range(tmp_path):
    Image.fromarray(np.full((96, 96), 300, dtype=np.float32)).save(tmp_path / "face.tif")
    return ["face.tif"], "face.tif: a floating-point image with values in 300..300, neither 0..1 nor 0..255"


def image_is_a_directory(tmp_path):
    (tmp_path / "faces").mkdir()
    return ["faces"], "faces: is a directory, expected an image file"


def csv_input_is_a_directory(tmp_path):
    (tmp_path / "test.csv").mkdir()
    return ["test.csv"], "test.csv: is a directory, expected a test.csv"


def image_name_not_utf8(tmp_path):
    """A Latin-1 name, as an older camera or archive leaves it: its ImageId could not be written."""
    name = os.fsdecode(b"visage-\xe9t\xe9.png")
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / name)
    return [name], "visage-\\xe9t\\xe9.png: the file name is not UTF-8, which the ImageId column of the output cannot hold"


def output_is_a_directory(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    (tmp_path / "out").mkdir()
    return ["face.png", "--output", "out"], "--output out: is a directory, expected a file name"


def output_inside_a_file(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    (tmp_path / "notes.txt").write_text("notes")
    return (["face.png", "--output", "notes.txt/predictions.csv"],
            "--output notes.txt/predictions.csv: notes.txt is a file, not a directory")


def submission_is_a_directory(tmp_path):
    write_test_csv(tmp_path / "test.csv", [1], random_pixels((1, 96, 96)))
    write_lookup(tmp_path / "lookup.csv", [(1, "nose_tip_x")])
    (tmp_path / "submission").mkdir()
    return (["test.csv", "--lookup", "lookup.csv", "--submission", "submission"],
            "--submission submission: is a directory, expected a file name")


def draw_is_a_file(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    return ["face.png", "--draw", "face.png"], "--draw face.png: is a file, expected a directory"


def unknown_net(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    return ["face.png", "--net", "net9"], "unknown net 'net9'"


def untrained_net(tmp_path):
    Image.fromarray(random_pixels((96, 96))).save(tmp_path / "face.png")
    return ["face.png", "--net", "net4"], "models/net4.pt: no such model file"


@pytest.mark.parametrize("make_input", [
    bad_image, wrong_test_columns, bad_image_row, image_missing_from_test_csv, unknown_feature,
    wrong_lookup_columns, gzipped_test_csv, compressed_test_csv_name, zipped_lookup, latin1_lookup,
    binary_test_csv, float_image_out_of_range, image_is_a_directory, csv_input_is_a_directory, image_name_not_utf8,
    output_is_a_directory, output_inside_a_file,
    submission_is_a_directory, draw_is_a_file, unknown_net, untrained_net,
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


def test_an_image_larger_than_pillow_trusts_is_one_warning_line_and_twice_that_one_error(workdir, capsys,
                                                                                         monkeypatch, recwarn):
    """Pillow's limits, lowered so that small images reach them: it warns above MAX_IMAGE_PIXELS (a
    12000x12000 photograph) and refuses above twice that."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 96)
    Image.fromarray(random_pixels((100, 96))).save(workdir / "large.png")
    main(["large.png"])
    assert capsys.readouterr().err == ("warning: large.png: 96x100 pixels, more than the 9216 Pillow trusts (it refuses "
                                       "more than 18432); read all the same\n")
    assert not [warning for warning in recwarn if issubclass(warning.category, Image.DecompressionBombWarning)]
    assert (workdir / "predictions.csv").is_file()

    Image.fromarray(random_pixels((200, 96))).save(workdir / "huge.png")
    with pytest.raises(SystemExit):
        main(["huge.png", "--output", "huge.csv"])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: huge.png: not a readable image (Image size (19200 pixels)")
    assert not (workdir / "huge.csv").exists()


def test_a_picture_that_cannot_be_written_is_one_line(workdir, capsys):
    Image.fromarray(random_pixels((96, 96))).save(workdir / "face.png")
    # A directory where the picture belongs: the check of --draw passes, the writing fails.
    (workdir / "drawn" / "face.png").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(["face.png", "--draw", "drawn"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error == "error: drawn/face.png: not written: Is a directory\n"


def describe_net5(workdir, content):
    (workdir / "models" / "net5.json").write_text(content if isinstance(content, str) else json.dumps(content))


def test_the_command_says_which_training_the_net_comes_from_before_predicting(workdir, capsys,
                                                                              temporary_tracking_store):
    """After `dvc exp run` or `dvc exp apply`, models/ holds the experiment's nets: the user is told."""
    Image.fromarray(random_pixels((96, 96))).save(workdir / "face.png")
    describe_net5(workdir, {"net": "net5", "data_hash": "3f2a", "config": {"train": {"max_epochs": 3}}})
    main(["face.png"])
    assert capsys.readouterr().out.splitlines() == [
        f"predict: net5 (3 epochs, data 3f2a, no MLflow store at {temporary_tracking_store})",
        "predict: net5 on 1 face -> predictions.csv"]
    assert not Path(temporary_tracking_store.removeprefix("sqlite:///")).exists()  # not created by predict

    describe_net5(workdir, {"net": "net5", "data_hash": "3f2a", "kept_epoch": 2, "config": {"train": {"max_epochs": 3}}})
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("facial-keypoints")
    main(["face.png"])
    assert capsys.readouterr().out.splitlines()[0] == (
        f"predict: net5 (3 epochs, weights of epoch 2, data 3f2a, trained by no run of {temporary_tracking_store})")

    weights = weights_checksum(load_model(workdir / "models" / "net5.pt"))
    run_id = client.create_run(experiment_id, tags={"net": "net5", WEIGHTS_TAG: weights}).info.run_id
    main(["face.png"])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line == f"predict: net5 (3 epochs, weights of epoch 2, data 3f2a, MLflow run {run_id})"


@pytest.mark.parametrize("content, problem", [
    (None, "models/net5.json: no such file (restore it with `git restore models/net5.json` or train the net again"),
    ("{", "models/net5.json: damaged: not valid JSON"),
    ('{"net": "net5", "config": []}', "models/net5.json: damaged: config.train.max_epochs or data_hash"
                                      " is missing; restore it with `git restore models/net5.json`"),
])
def test_a_missing_or_damaged_model_description_is_one_line_and_the_net_still_predicts(workdir, capsys, content,
                                                                                       problem):
    Image.fromarray(random_pixels((96, 96))).save(workdir / "face.png")
    if content is not None:
        describe_net5(workdir, content)
    main(["face.png"])
    captured = capsys.readouterr()
    first, *rest = captured.out.splitlines()
    assert first.startswith(f"predict: net5, of an unknown training: {problem}")
    assert rest == ["predict: net5 on 1 face -> predictions.csv"] and captured.err == ""
    assert (workdir / "predictions.csv").is_file()


@pytest.mark.parametrize("uri, store, problem", [
    ("models:/", None, "models:/: not a models:/ URI of MLflow: models:/<name>@<alias>, models:/<name>/<version> or "
                       "models:/<model id>"),
    ("models:/facial-keypoints@champion", None, "models:/facial-keypoints@champion: no MLflow store at {store}"),
    ("models:/facial-keypoints@champion", "empty", "models:/facial-keypoints@champion: not in the MLflow store {store} "
                                                   "(Registered Model with name=facial-keypoints not found)"),
])
def test_a_models_uri_that_names_no_model_is_one_line(workdir, capsys, temporary_tracking_store, uri, store, problem):
    """The served models and the registry are tested on real ones in test_registry.py."""
    Image.fromarray(random_pixels((96, 96))).save(workdir / "face.png")
    if store:
        connect()
        capsys.readouterr()  # MLflow's lines on creating the store
    with pytest.raises(SystemExit) as exit_:
        main(["face.png", "--net", uri])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {problem.format(store=temporary_tracking_store)}\n"
    assert not (workdir / "predictions.csv").exists()
    assert Path(temporary_tracking_store.removeprefix("sqlite:///")).exists() == bool(store)  # none created


def test_keypoints_come_back_in_the_pixels_of_the_image_given():
    """Issue: an eye at x=116 of a 200-pixel-wide photo came back as x=64.3, in the 96-pixel face's frame."""
    face_keypoints = np.tile([55.44, 47.5], 15)
    in_photo = Frame(side=200, left=0, top=25).to_image(face_keypoints)
    assert in_photo[0] == pytest.approx(116.04, abs=0.01)
    assert in_photo[1] == pytest.approx(99.5 - 25)  # the face's centre row is the square's, less the padding above
    np.testing.assert_array_equal(Frame(side=96).to_image(face_keypoints), face_keypoints)


def test_a_narrow_image_is_padded_to_a_square_so_its_aspect_ratio_is_kept(workdir):
    narrow = random_pixels((120, 100))  # 100 wide, 120 high
    Image.fromarray(narrow).save(workdir / "narrow.png")
    Image.fromarray(np.pad(narrow, ((0, 0), (10, 10)), mode="edge")).save(workdir / "square.png")
    assert read_face(workdir / "narrow.png")[1] == Frame(side=120, left=10, top=0)
    np.testing.assert_array_equal(read_image(workdir / "narrow.png"), read_image(workdir / "square.png"))
    main(["narrow.png", "square.png"])
    keypoints = pd.read_csv(workdir / "predictions.csv")[list(KEYPOINT_COLUMNS)].to_numpy()
    np.testing.assert_allclose(keypoints[0], keypoints[1] - np.tile([10.0, 0.0], 15), atol=1e-3)


def test_a_jpeg_turned_by_its_exif_orientation_is_read_as_viewers_show_it(workdir):
    upright = Image.fromarray(np.repeat(np.linspace(0, 255, 120, dtype=np.uint8)[None], 100, axis=0))  # 120 wide
    upright.save(workdir / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(workdir / "turned.jpg", quality=100, exif=exif)
    with Image.open(workdir / "turned.jpg") as stored:
        assert stored.size == (100, 120)  # stored sideways
    face, frame = read_face(workdir / "turned.jpg")
    assert frame == Frame(side=120, left=0, top=10)
    assert np.abs(face.astype(int) - read_image(workdir / "upright.png")).max() <= 2  # JPEG's rounding
    main(["turned.jpg", "upright.png", "--draw", "drawn"])
    keypoints = pd.read_csv(workdir / "predictions.csv")[list(KEYPOINT_COLUMNS)].to_numpy()
    np.testing.assert_allclose(keypoints[0], keypoints[1], atol=0.2)
    with Image.open(workdir / "drawn" / "turned.png") as drawn:
        assert drawn.size == (360, 300)  # the photo upright, enlarged 3 times


def test_image_ids_of_any_size_are_kept_as_written(workdir):
    """Through float64, 2^53 + 1 came back as 2^53; through int64, 2^63 + 5 as -9223372036854775808."""
    ids = [2**53 + 1, 2**63 + 5, 7]
    write_test_csv(workdir / "test.csv", ids, random_pixels((3, 96, 96)))
    write_lookup(workdir / "lookup.csv", [(2**63 + 5, "nose_tip_x"), (2**53 + 1, "nose_tip_y")])
    lines = (workdir / "lookup.csv").read_text().splitlines()
    lines[2] = lines[2].replace("2,", f"{2**70},", 1)  # a RowId beyond int64 too
    (workdir / "lookup.csv").write_text("\n".join(lines) + "\n")
    main(["test.csv", "--lookup", "lookup.csv"])
    assert pd.read_csv(workdir / "predictions.csv", dtype=str)["ImageId"].tolist() == [str(id_) for id_ in ids]
    submission = pd.read_csv(workdir / "submission.csv", dtype=str)
    assert submission["RowId"].tolist() == ["1", str(2**70)]
    keypoints = pd.read_csv(workdir / "predictions.csv", dtype={"ImageId": str}).set_index("ImageId")
    assert float(submission["Location"][0]) == pytest.approx(keypoints.at[str(2**63 + 5), "nose_tip_x"], abs=1e-3)


def photos(workdir):
    folder = workdir / "photos"
    folder.mkdir()
    for name in ("alice.png", "bob.png"):
        Image.fromarray(random_pixels((96, 96))).save(folder / name)
    os.link(folder / "bob.png", workdir / "bob-link.png")
    return folder


@pytest.mark.parametrize("arguments, message", [
    (["photos/alice.png", "photos/bob.png", "--draw", "photos"], "--draw photos/alice.png: is the input photos/alice.png"),
    (["photos/alice.png", "--output", "photos/alice.png"], "--output photos/alice.png: is the input photos/alice.png"),
    (["photos/bob.png", "--output", "bob-link.png"], "--output bob-link.png: is the input photos/bob.png"),
    (["test.csv", "--lookup", "photos/lookup.csv", "--output", "out.csv", "--submission", "out.csv"],
     "--submission out.csv: is also where --output out.csv goes"),
    (["test.csv", "--lookup", "photos/lookup.csv", "--submission", "photos/lookup.csv"],
     "--submission photos/lookup.csv: is the input photos/lookup.csv"),
])
def test_no_output_ever_replaces_an_input_or_another_output(workdir, capsys, arguments, message):
    folder = photos(workdir)
    write_test_csv(workdir / "test.csv", [1], random_pixels((1, 96, 96)))
    write_lookup(folder / "lookup.csv", [(1, "nose_tip_x")])
    before = {path: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert {path: path.read_bytes() for path in folder.iterdir()} == before
    assert not (workdir / "predictions.csv").exists() and not (workdir / "out.csv").exists()


def test_the_batch_size_changes_only_memory_and_the_last_bits_of_a_sum(workdir):
    for index in range(5):
        Image.fromarray(random_pixels((96 + index, 90), seed=index)).save(workdir / f"face{index}.png")
    names = [f"face{index}.png" for index in range(5)]
    main([*names, "--batch-size", "2", "--output", "small.csv"])
    main([*names, "--output", "large.csv"])
    small, large = (pd.read_csv(workdir / name) for name in ("small.csv", "large.csv"))
    assert small["ImageId"].tolist() == large["ImageId"].tolist() == names
    np.testing.assert_allclose(small[list(KEYPOINT_COLUMNS)], large[list(KEYPOINT_COLUMNS)], atol=2e-4)


@pytest.mark.slow  # the command in a process of its own, under a real memory limit
def test_a_batch_beyond_the_memory_limit_is_one_line_naming_the_batch_size(workdir):
    """1.5 GB of address space holds the command with a batch of 16 faces, not one of 1000 (1.1 GB of
    the first layer's activations alone)."""
    for index in range(1000):
        Image.fromarray(random_pixels((96, 96), seed=index)).save(workdir / f"{index}.png")
    command = f"ulimit -v 1500000; PYTHONPATH={ROOT} exec {{}} -m pipeline.predict *.png --batch-size {{}} --output {{}}"
    small = run(workdir, "bash", "-c", command.format(sys.executable, 16, "small.csv"), check=False)
    assert small.returncode == 0, small.stderr
    large = run(workdir, "bash", "-c", command.format(sys.executable, 1000, "large.csv"), check=False)
    assert large.returncode == 2 and "Traceback" not in large.stderr
    assert large.stderr == ("error: predict: out of memory: lower --batch-size, or free memory (other programs, "
                            "ulimit -v)\n")
    assert not (workdir / "large.csv").exists()
