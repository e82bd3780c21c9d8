import functools
import json
import sys

import numpy as np
import pytest

from pipeline.base.errors import PipelineError
from pipeline.faces import data
from pipeline.faces.data import (
    FaceSet, content_hash, images_of, load_faces, load_split, read_summary, save_prepared, scale_keypoints, split,
    unscale_keypoints,
)
from pipeline.faces.kaggle import KAGGLE_MEANS, read_training_chunks, read_training_csv, write_training_csv
from tests.support.project import make_project, run


def write_faces(path, n=20, incomplete=(), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    keypoints = np.clip(KAGGLE_MEANS + rng.normal(0, 2, (n, 30)), 0, 96)
    for row in incomplete:
        keypoints[row, 10:12] = np.nan
    write_training_csv(path, images, keypoints)
    return images, keypoints


def load(path, seed):
    """Every face prepare reads from a CSV, the two portions of load_split together."""
    rest, held_out, report = load_split(path, seed, 0.5, "prepare.test_fraction")
    return FaceSet(images_of(np.concatenate([rest.pixels, held_out.pixels])),
                   np.concatenate([rest.keypoints, held_out.keypoints])), report


def test_load_scales_like_the_seed(tmp_path):
    images, keypoints = write_faces(tmp_path / "t.csv", n=12, incomplete=[3, 7])
    faces, report = load(tmp_path / "t.csv", seed=42)
    assert report.n_rows == 12 and report.n_dropped == 2 and report.repeated == {}
    assert faces.X.dtype == np.float32 and faces.X.shape == (10, 1, 96, 96)
    assert faces.y.dtype == np.float32 and faces.y.shape == (10, 30)
    assert 0 <= faces.X.min() and faces.X.max() <= 1
    # every loaded face is one of the complete rows, with y = (y - 48) / 48
    complete = [row for row in range(12) if row not in (3, 7)]
    for x, y in zip(faces.X, faces.y):
        row = next(r for r in complete if np.array_equal(np.rint(x[0] * 255), images[r]))
        np.testing.assert_allclose(y, (keypoints[row] - 48) / 48, atol=1e-5)


def test_load_shuffles_with_the_seed(tmp_path):
    write_faces(tmp_path / "t.csv", n=30)
    first, _ = load(tmp_path / "t.csv", seed=1)
    again, _ = load(tmp_path / "t.csv", seed=1)
    other, _ = load(tmp_path / "t.csv", seed=2)
    np.testing.assert_array_equal(first.y, again.y)
    assert not np.array_equal(first.y, other.y)


def test_load_rejects_a_file_without_complete_rows(tmp_path):
    write_faces(tmp_path / "t.csv", n=3, incomplete=[0, 1, 2])
    with pytest.raises(PipelineError, match="no row has all 30 keypoints"):
        load(tmp_path / "t.csv", seed=0)


def test_scaling_round_trips():
    pixels = np.array([[0.0, 48.0, 96.0]])
    np.testing.assert_allclose(scale_keypoints(pixels), [[-1, 0, 1]])
    np.testing.assert_allclose(unscale_keypoints(scale_keypoints(pixels)), pixels)


def small_set(n=10):
    rng = np.random.default_rng(0)
    X = (rng.integers(0, 256, (n, 1, 96, 96)) / 255).astype(np.float32)
    return FaceSet(X=X, y=rng.uniform(-1, 1, (n, 30)).astype(np.float32))


def test_split_is_seeded_disjoint_and_complete():
    faces = small_set(20)
    rest, held_out = split(faces, 0.25, seed=3, key="prepare.test_fraction")
    assert len(rest) == 15 and len(held_out) == 5
    rows = {tuple(y) for y in np.vstack([rest.y, held_out.y])}
    assert rows == {tuple(y) for y in faces.y}
    again_rest, _ = split(faces, 0.25, seed=3, key="prepare.test_fraction")
    np.testing.assert_array_equal(rest.y, again_rest.y)


@pytest.mark.parametrize("n, fraction, key", [(3, 0.1, "prepare.test_fraction"), (5, 0.99, "prepare.test_fraction"),
                                               (2, 0.2, "train.valid_fraction")])
def test_a_fraction_that_leaves_an_empty_part_is_named_by_its_key(n, fraction, key):
    with pytest.raises(PipelineError, match=rf"^params.yaml: {key}: {fraction} of {n} faces .*each part needs a face"):
        split(small_set(n), fraction, seed=0, key=key)


def write_repeated_faces(path):
    """Rows 0-7 (lines 2-9): row 5 and row 7 repeat row 1's image; row 2 lacks a keypoint and row 6 repeats
    its image; row 4 repeats row 3's image with other keypoints."""
    images, keypoints = write_faces(path, n=8)
    images[[5, 7]], images[6], images[4] = images[1], images[2], images[3]
    keypoints[2, 10] = np.nan
    write_training_csv(path, images, keypoints)
    return images


def test_load_keeps_each_image_once_so_that_no_face_is_on_both_sides_of_a_split(tmp_path):
    images = write_repeated_faces(tmp_path / "t.csv")
    faces, report = load(tmp_path / "t.csv", seed=0)
    # Dropped: rows 4, 5 and 7 (lines 6, 7 and 9), each named with the line of the image's first complete row.
    assert report.repeated == {6: 5, 7: 3, 9: 3} and report.n_dropped == 1
    kept = sorted(tuple(np.flatnonzero(np.all(images == np.rint(face[0] * 255), axis=(1, 2)))) for face in faces.X)
    assert kept == [(0,), (1, 5, 7), (2, 6), (3, 4)]  # each image once, row 6's too: row 2 lacks a keypoint
    rest, held_out = split(faces, 0.5, seed=0, key="prepare.test_fraction")
    pixels = lambda part: {part.X[row].tobytes() for row in range(len(part))}  # noqa: E731
    assert not pixels(rest) & pixels(held_out)


def prepared(folder, train=None, test=None):
    train, test = train or small_set(10), test or small_set(4)
    save_prepared(folder / "summary.json", {folder / "train.npz": train.stored(), folder / "test.npz": test.stored()},
                  {"data_hash": content_hash(train.stored(), test.stored())})
    return read_summary(folder / "summary.json")


def test_saved_faces_load_exactly_and_the_summary_holds_their_checksums(tmp_path):
    faces = small_set()
    summary = prepared(tmp_path / "prepared", train=faces)
    assert sorted(path.name for path in (tmp_path / "prepared").iterdir()) == ["summary.json", "test.npz", "train.npz"]
    assert sorted(summary["sha256"]) == ["test.npz", "train.npz"]
    loaded = load_faces(tmp_path / "prepared" / "train.npz", summary)
    np.testing.assert_array_equal(loaded.X, faces.X)
    np.testing.assert_array_equal(loaded.y, faces.y)
    assert content_hash(loaded.stored()) == content_hash(faces.stored())
    changed = FaceSet(faces.X, faces.y + 1e-3)
    assert content_hash(changed.stored()) != content_hash(faces.stored())


def test_a_changed_pixel_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "prepared"
    summary = prepared(folder)
    with np.load(folder / "train.npz") as stored:
        pixels, keypoints = stored["pixels"].copy(), stored["keypoints"]
    pixels[3, 0, 40, 40] ^= 1
    np.savez(folder / "train.npz", pixels=pixels, keypoints=keypoints)
    with pytest.raises(PipelineError, match=r"^.*prepared/train.npz: damaged: its content does not match the checksum "
                                            r"that summary.json beside it records; run `dvc repro prepare`$"):
        load_faces(folder / "train.npz", summary)
    load_faces(folder / "test.npz", summary)


def test_arrays_of_another_preparation_are_refused(tmp_path):
    old = prepared(tmp_path / "old")
    prepared(tmp_path / "new", train=small_set(12))
    (tmp_path / "old" / "train.npz").write_bytes((tmp_path / "new" / "train.npz").read_bytes())
    with pytest.raises(PipelineError, match="train.npz: damaged: its content does not match"):
        load_faces(tmp_path / "old" / "train.npz", old)


def test_a_summary_without_checksums_is_refused(tmp_path):
    summary = prepared(tmp_path)
    del summary["sha256"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PipelineError, match=r"summary.json: records no checksums .*; run `dvc repro prepare`$"):
        read_summary(tmp_path / "summary.json")


def test_load_faces_names_a_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="absent.npz"):
        load_faces(tmp_path / "absent.npz", {"sha256": {}})


def test_damaged_prepared_files_are_named_with_what_to_do(tmp_path):
    faces = FaceSet(np.zeros((4, 1, 96, 96), np.float32), np.zeros((4, 30), np.float32))
    summary = prepared(tmp_path, train=faces)
    whole = (tmp_path / "train.npz").read_bytes()
    (tmp_path / "train.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(PipelineError, match=r"train.npz: damaged: .*; run `dvc repro prepare`$"):
        load_faces(tmp_path / "train.npz", summary)
    (tmp_path / "summary.json").write_text('{"data_hash": "ab')
    with pytest.raises(PipelineError, match=r"summary.json: damaged: not valid JSON .*; run `dvc repro prepare`$"):
        read_summary(tmp_path / "summary.json")


def prepare(tmp_path, images_and_keypoints, test_fraction=0.15):
    """`python -m pipeline.prepare` on the user's CSV, in a scratch project."""
    project = make_project(tmp_path / "project", {"data.source": "csv", "prepare.test_fraction": test_fraction},
                           git=False)
    write_training_csv(project / "data/raw/training.csv", *images_and_keypoints)
    return project, run(project, sys.executable, "-m", "pipeline.prepare", check=False)


def faces_of(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 96, 96), dtype=np.uint8), np.clip(KAGGLE_MEANS + rng.normal(0, 2, (n, 30)), 0, 96)


@pytest.mark.slow
def test_prepare_drops_repeated_images_with_a_warning_so_that_no_test_face_is_trained_on(tmp_path):
    images, keypoints = faces_of(200)
    images[150:], keypoints[150:] = images[:50], keypoints[:50]  # the first 50 faces twice, as in a CSV concatenated
    project, result = prepare(tmp_path, (images, keypoints))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: data/raw/training.csv: 50 complete rows repeat the image of an earlier row (line 152 repeats line 2) "
        "and were dropped, so that no face is both trained on and tested on"]
    summary = read_summary(project / "data/prepared/summary.json")
    assert (summary["n_dropped_repeated"], summary["n_train"] + summary["n_test"]) == (50, 150)
    train, test = (load_faces(project / "data/prepared" / name, summary) for name in ("train.npz", "test.npz"))
    assert not {face.tobytes() for face in train.X} & {face.tobytes() for face in test.X}


@pytest.mark.slow
@pytest.mark.parametrize("n, test_fraction, warning", [
    (5, 0.15, "warning: only 4 faces to train on (fewer than 50) and 1 face to test on (fewer than 10): the net and "
              "its test figures will say little; use more faces or another prepare.test_fraction (0.15)"),
    (40, 0.9, "warning: only 4 faces to train on (fewer than 50): the net and its test figures will say little; use "
              "more faces or another prepare.test_fraction (0.9)"),
])
def test_prepare_warns_in_one_line_of_a_tiny_portion(tmp_path, n, test_fraction, warning):
    project, result = prepare(tmp_path, faces_of(n), test_fraction)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [warning]


@pytest.mark.slow
@pytest.mark.parametrize("test_fraction, error", [
    (0.97, "error: params.yaml: prepare.test_fraction: 0.97 of 40 faces leaves 1 to train on, and the train stage "
           "needs 2 (one to fit, one to validate): use more faces or a smaller fraction"),
    (0.99, "error: params.yaml: prepare.test_fraction: 0.99 of 40 faces leaves 0 and holds out 40, and each part "
           "needs a face at least: use more faces or another fraction"),
])
def test_prepare_refuses_a_fraction_that_leaves_nothing_to_train_on_naming_the_key(tmp_path, test_fraction, error):
    project, result = prepare(tmp_path, faces_of(40), test_fraction)
    assert result.returncode == 2 and result.stderr.splitlines() == [error]
    assert not (project / "data/prepared").exists()



def test_streamed_loading_is_the_whole_files_shuffle_and_split_across_chunk_borders(tmp_path, monkeypatch):
    """What prepare did with the whole file in memory: complete rows, each image once, shuffled, split."""
    images, keypoints = write_faces(tmp_path / "t.csv", n=40, incomplete=[0, 9, 10, 33])
    images[[17, 25]] = images[5]  # repeats, dropped
    write_training_csv(tmp_path / "t.csv", images, keypoints)
    monkeypatch.setattr(data, "read_training_chunks", functools.partial(read_training_chunks, rows=3))
    rest, held_out, report = load_split(tmp_path / "t.csv", 7, 0.25, "prepare.test_fraction")

    whole_images, whole_keypoints = read_training_csv(tmp_path / "t.csv")
    kept = [row for row in range(40) if row not in (0, 9, 10, 33, 17, 25)]
    order = np.random.default_rng(7).permutation(len(kept))
    faces = FaceSet(images_of(whole_images[kept][order, None]), scale_keypoints(whole_keypoints[kept][order]))
    expected_rest, expected_held_out = split(faces, 0.25, seed=7, key="prepare.test_fraction")
    for streamed, expected in ((rest, expected_rest), (held_out, expected_held_out)):
        np.testing.assert_array_equal(streamed.pixels, expected.stored().pixels)
        np.testing.assert_array_equal(streamed.keypoints, expected.y)
    assert report.n_rows == 40 and report.n_dropped == 4 and report.repeated == {19: 7, 27: 7}
