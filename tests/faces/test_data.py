import functools
import json
import sys

import numpy as np
import pytest

from pipeline.base.errors import PipelineError
from pipeline.faces import data
from pipeline.faces.data import (
    FaceSet, StoredFaces, content_hash, images_of, load_faces, load_incomplete_faces, load_split, read_summary,
    save_prepared, scale_keypoints, split, unscale_keypoints,
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
    loaded = load_split(path, seed, 0.5, "prepare.test_fraction")
    return FaceSet(images_of(np.concatenate([loaded.train.pixels, loaded.test.pixels])),
                   np.concatenate([loaded.train.keypoints, loaded.test.keypoints])), loaded.report


def test_load_scales_like_the_seed(tmp_path):
    images, keypoints = write_faces(tmp_path / "t.csv", n=12, incomplete=[3, 7])
    faces, report = load(tmp_path / "t.csv", seed=42)
    assert report.n_rows == 12 and report.n_unlabelled == 0 and report.repeated == report.repeated_incomplete == {}
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
    """Rows 0-7 (lines 2-9): row 5 and row 7 repeat row 1's image; row 2 lacks a keypoint and row 6, complete,
    repeats its image; row 4 repeats row 3's image with other keypoints."""
    images, keypoints = write_faces(path, n=8)
    images[[5, 7]], images[6], images[4] = images[1], images[2], images[3]
    keypoints[2, 10] = np.nan
    write_training_csv(path, images, keypoints)
    return images


def test_load_keeps_each_image_once_so_that_no_face_is_on_both_sides_of_a_split(tmp_path):
    images = write_repeated_faces(tmp_path / "t.csv")
    faces, report = load(tmp_path / "t.csv", seed=0)
    # Dropped: rows 4, 5 and 7 (lines 6, 7 and 9), each named with the line of the image's first complete row;
    # and row 2 (line 4), incomplete, for the complete row 6 (line 8) that comes after it.
    assert report.repeated == {6: 5, 7: 3, 9: 3} and report.repeated_incomplete == {4: 8}
    kept = sorted(tuple(np.flatnonzero(np.all(images == np.rint(face[0] * 255), axis=(1, 2)))) for face in faces.X)
    assert kept == [(0,), (1, 5, 7), (2, 6), (3, 4)]  # each image once, row 6's too: row 2 gives way to it
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
    loaded = load_split(tmp_path / "t.csv", 7, 0.25, "prepare.test_fraction")
    rest, held_out, report = loaded.train, loaded.test, loaded.report

    whole_images, whole_keypoints = read_training_csv(tmp_path / "t.csv")
    kept = [row for row in range(40) if row not in (0, 9, 10, 33, 17, 25)]
    order = np.random.default_rng(7).permutation(len(kept))
    faces = FaceSet(images_of(whole_images[kept][order, None]), scale_keypoints(whole_keypoints[kept][order]))
    expected_rest, expected_held_out = split(faces, 0.25, seed=7, key="prepare.test_fraction")
    for streamed, expected in ((rest, expected_rest), (held_out, expected_held_out)):
        np.testing.assert_array_equal(streamed.pixels, expected.stored().pixels)
        np.testing.assert_array_equal(streamed.keypoints, expected.y)
    assert report.n_rows == 40 and report.n_unlabelled == 0 and report.repeated == {19: 7, 27: 7}


def incomplete_and_unlabelled_csv(path, n=40, incomplete=(1, 4, 5, 12, 13, 20, 21, 22, 30, 31, 38, 39),
                                  unlabelled=(7, 25)):
    """n rows: `incomplete` lack the 11 outer keypoints (as most of Kaggle's partial rows do), `unlabelled` have
    no keypoint at all; the rest are complete."""
    images, keypoints = faces_of(n, seed=3)
    keypoints[list(incomplete), 4:20] = np.nan
    keypoints[list(incomplete), 22:28] = np.nan
    keypoints[list(unlabelled)] = np.nan
    write_training_csv(path, images, keypoints)
    return images, keypoints


def test_incomplete_rows_are_kept_apart_and_split_in_the_same_fraction(tmp_path):
    images, keypoints = incomplete_and_unlabelled_csv(tmp_path / "t.csv")
    loaded = load_split(tmp_path / "t.csv", 5, 0.25, "prepare.test_fraction")
    assert (len(loaded.train), len(loaded.test), len(loaded.train_incomplete), len(loaded.test_incomplete)) == (
        20, 6, 9, 3)  # 26 complete faces, 12 incomplete ones, a quarter of each held out (6.5 rounded to even)
    assert loaded.report.n_rows == 40 and loaded.report.n_unlabelled == 2
    # Every incomplete face once, with its own keypoints scaled as the complete ones are and NaN where unlabelled.
    rows = []
    for portion in (loaded.train_incomplete, loaded.test_incomplete):
        assert portion.pixels.dtype == np.uint8 and portion.pixels.shape[1:] == (1, 96, 96)
        assert portion.keypoints.dtype == np.float32
        for pixels, scaled in zip(portion.pixels, portion.keypoints):
            (row,) = np.flatnonzero(np.all(images == pixels[0], axis=(1, 2)))
            rows.append(row)
            np.testing.assert_array_equal(np.isnan(scaled), np.isnan(keypoints[row]))
            np.testing.assert_allclose(scaled, scale_keypoints(keypoints[row]), atol=1e-6)
    assert sorted(rows) == [1, 4, 5, 12, 13, 20, 21, 22, 30, 31, 38, 39]
    again = load_split(tmp_path / "t.csv", 5, 0.25, "prepare.test_fraction")
    other = load_split(tmp_path / "t.csv", 6, 0.25, "prepare.test_fraction")
    np.testing.assert_array_equal(again.test_incomplete.pixels, loaded.test_incomplete.pixels)
    assert not np.array_equal(other.train_incomplete.pixels, loaded.train_incomplete.pixels)


def test_the_complete_portions_are_those_of_the_file_without_its_incomplete_rows(tmp_path):
    images, keypoints = incomplete_and_unlabelled_csv(tmp_path / "with.csv")
    complete = ~np.isnan(keypoints).any(axis=1)
    write_training_csv(tmp_path / "without.csv", images[complete], keypoints[complete])
    with_them, without = (load_split(tmp_path / name, 5, 0.25, "prepare.test_fraction")
                          for name in ("with.csv", "without.csv"))
    for portion in ("train", "test"):
        np.testing.assert_array_equal(getattr(with_them, portion).pixels, getattr(without, portion).pixels)
        np.testing.assert_array_equal(getattr(with_them, portion).keypoints, getattr(without, portion).keypoints)
    assert content_hash(with_them.train, with_them.test) == content_hash(without.train, without.test)
    assert len(without.train_incomplete) == len(without.test_incomplete) == 0


def test_a_repeated_image_is_dropped_whichever_portion_it_would_land_in(tmp_path):
    """Rows 0-9 (lines 2-11). Complete rows are chosen among themselves, as today; an incomplete row gives way
    to any complete row with its image, before or after it, and to an earlier incomplete one."""
    images, keypoints = faces_of(10, seed=4)
    for row in (1, 3, 4, 6, 8):
        keypoints[row, 4:20] = np.nan
    images[3] = images[0]  # incomplete after a complete row
    images[6] = images[1]  # incomplete after an incomplete row...
    images[9] = images[1]  # ...and both before a complete row: row 9 is kept, with the image
    images[8] = images[4]  # incomplete after an incomplete row, no complete row with it: row 4 is kept
    images[7] = images[2]  # complete after a complete row, as today
    write_training_csv(tmp_path / "t.csv", images, keypoints)
    loaded = load_split(tmp_path / "t.csv", 0, 0.5, "prepare.test_fraction")
    assert loaded.report.repeated == {9: 4}
    # Each dropped copy named with the line of the row kept with its image.
    assert loaded.report.repeated_incomplete == {3: 11, 5: 2, 8: 11, 10: 6}
    portions = [loaded.train, loaded.test, loaded.train_incomplete, loaded.test_incomplete]
    kept = [sorted(tuple(np.flatnonzero(np.all(images == face[0], axis=(1, 2)))) for face in portion.pixels)
            for portion in portions]
    assert sorted(kept[0] + kept[1]) == [(0, 3), (1, 6, 9), (2, 7), (5,)]
    assert sorted(kept[2] + kept[3]) == [(4, 8)]
    every = [face.tobytes() for portion in portions for face in portion.pixels]
    assert len(every) == len(set(every)) == 5


def test_rows_without_a_single_keypoint_are_dropped_and_counted(tmp_path):
    incomplete_and_unlabelled_csv(tmp_path / "t.csv", n=12, incomplete=(2,), unlabelled=(0, 5, 11))
    loaded = load_split(tmp_path / "t.csv", 0, 0.25, "prepare.test_fraction")
    assert loaded.report.n_unlabelled == 3
    assert (len(loaded.train) + len(loaded.test), len(loaded.train_incomplete) + len(loaded.test_incomplete)) == (8, 1)
    assert not np.isnan(loaded.train_incomplete.keypoints).all(axis=1).any()


def test_incomplete_portions_streamed_are_the_whole_files_across_chunk_borders(tmp_path, monkeypatch):
    images, keypoints = incomplete_and_unlabelled_csv(tmp_path / "t.csv")
    images[[14, 32]] = images[12]  # row 14 complete: incomplete row 12 gives way to it; row 32 complete, a repeat
    images[38] = images[30]  # incomplete, repeating an earlier incomplete row
    write_training_csv(tmp_path / "t.csv", images, keypoints)
    monkeypatch.setattr(data, "read_training_chunks", functools.partial(read_training_chunks, rows=3))
    loaded = load_split(tmp_path / "t.csv", 7, 0.25, "prepare.test_fraction")
    assert loaded.report.repeated == {34: 16} and loaded.report.repeated_incomplete == {14: 16, 40: 32}

    whole_images, whole_keypoints = read_training_csv(tmp_path / "t.csv")
    kept = [1, 4, 5, 13, 20, 21, 22, 30, 31, 39]
    order = np.random.default_rng([7, data.INCOMPLETE_STREAM]).permutation(len(kept))
    faces = FaceSet(images_of(whole_images[kept][order, None]), scale_keypoints(whole_keypoints[kept][order]))
    expected = split(faces, 0.25, seed=[7, data.INCOMPLETE_STREAM], key="prepare.test_fraction")
    for streamed, wanted in zip((loaded.train_incomplete, loaded.test_incomplete), expected):
        np.testing.assert_array_equal(streamed.pixels, wanted.stored().pixels)
        np.testing.assert_array_equal(streamed.keypoints, wanted.y)


@pytest.mark.parametrize("n_incomplete, fraction, sizes", [(0, 0.15, (0, 0)), (1, 0.15, (1, 0)), (1, 0.9, (0, 1)),
                                                            (3, 0.5, (1, 2))])
def test_few_incomplete_faces_are_split_without_complaint(tmp_path, n_incomplete, fraction, sizes):
    """The incomplete portions are extras: either may be empty, where a complete one may not."""
    incomplete_and_unlabelled_csv(tmp_path / "t.csv", n=30, incomplete=range(n_incomplete), unlabelled=())
    loaded = load_split(tmp_path / "t.csv", 0, fraction, "prepare.test_fraction")
    assert (len(loaded.train_incomplete), len(loaded.test_incomplete)) == sizes


def stored(n, seed, unlabelled=()):
    rng = np.random.default_rng(seed)
    keypoints = rng.uniform(-1, 1, (n, 30)).astype(np.float32)
    keypoints[list(unlabelled), 4:20] = np.nan
    return StoredFaces(rng.integers(0, 256, (n, 1, 96, 96), dtype=np.uint8), keypoints)


def prepared_with_incomplete(folder):
    save_prepared(folder / "summary.json", {folder / "train.npz": stored(6, 0), folder / "test.npz": stored(3, 1),
                                            folder / "train_incomplete.npz": stored(4, 2, unlabelled=range(4)),
                                            folder / "test_incomplete.npz": stored(2, 3, unlabelled=range(2))}, {})
    return read_summary(folder / "summary.json")


def test_incomplete_faces_load_with_nan_where_unlabelled_after_their_checksum(tmp_path):
    summary = prepared_with_incomplete(tmp_path)
    assert sorted(summary["sha256"]) == ["test.npz", "test_incomplete.npz", "train.npz", "train_incomplete.npz"]
    faces = load_incomplete_faces(tmp_path / "train_incomplete.npz", summary)
    np.testing.assert_array_equal(faces.y, stored(4, 2, unlabelled=range(4)).keypoints)
    assert np.isnan(faces.y[:, 4:20]).all() and not np.isnan(faces.y[:, :4]).any()
    assert faces.X.dtype == np.float32 and faces.X.shape == (4, 1, 96, 96)


def test_a_tampered_incomplete_portion_is_refused_by_its_checksum_in_one_line(tmp_path):
    summary = prepared_with_incomplete(tmp_path)
    with np.load(tmp_path / "test_incomplete.npz") as arrays:
        pixels, keypoints = arrays["pixels"], arrays["keypoints"].copy()
    keypoints[0, 0] = np.nan  # one more keypoint unlabelled
    np.savez(tmp_path / "test_incomplete.npz", pixels=pixels, keypoints=keypoints)
    with pytest.raises(PipelineError) as caught:
        load_incomplete_faces(tmp_path / "test_incomplete.npz", summary)
    assert str(caught.value) == (f"{tmp_path / 'test_incomplete.npz'}: damaged: its content does not match the "
                                 "checksum that summary.json beside it records; run `dvc repro prepare`")


def test_an_incomplete_portion_is_refused_where_complete_faces_are_read(tmp_path):
    summary = prepared_with_incomplete(tmp_path)
    with pytest.raises(PipelineError, match=r"^.*train_incomplete.npz: holds faces with unlabelled keypoints \(NaN\), "
                                            r"where every face should have all 30: .*; run `dvc repro prepare`$"):
        load_faces(tmp_path / "train_incomplete.npz", summary)


@pytest.mark.slow
def test_prepare_writes_counts_checksums_and_hashes_of_the_incomplete_portions(tmp_path):
    images, keypoints = faces_of(100, seed=2)
    keypoints[:30, 4:20] = np.nan  # 30 incomplete rows
    keypoints[30:32] = np.nan  # 2 without a keypoint
    images[[40, 41]] = images[3]  # a complete row after an incomplete one with its image; and a repeat of it
    images[5] = images[4]  # an incomplete row repeating an incomplete one
    project, result = prepare(tmp_path, (images, keypoints), test_fraction=0.2)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: data/raw/training.csv: 1 complete rows repeat the image of an earlier row (line 43 repeats line 42) "
        "and were dropped, so that no face is both trained on and tested on",
        "warning: data/raw/training.csv: 2 incomplete rows repeat the image of a complete row or of an earlier "
        "incomplete one (line 5 repeats line 42) and were dropped, so that no face is both trained on and tested on"]
    summary = read_summary(project / "data/prepared/summary.json")
    counts = {key: summary[key] for key in ("n_rows", "n_dropped_unlabelled", "n_dropped_repeated", "n_train", "n_test",
                                            "n_train_incomplete", "n_test_incomplete")}
    assert counts == {"n_rows": 100, "n_dropped_unlabelled": 2, "n_dropped_repeated": 3, "n_train": 54, "n_test": 13,
                      "n_train_incomplete": 22, "n_test_incomplete": 6}
    assert result.stdout.splitlines() == [
        "prepare: data/raw/training.csv: 100 rows, 2 dropped for lacking every keypoint, 3 for repeating another row's "
        f"image, 54 train + 13 test, and 22 + 6 lacking some keypoints, data hash {summary['data_hash']}"]
    folder = project / "data/prepared"
    complete = [load_faces(folder / f"{name}.npz", summary) for name in ("train", "test")]
    incomplete = [load_incomplete_faces(folder / f"{name}_incomplete.npz", summary) for name in ("train", "test")]
    assert summary["data_hash"] == content_hash(*(faces.stored() for faces in complete))
    assert summary["incomplete_hash"] == content_hash(*(faces.stored() for faces in incomplete))
    assert all(np.isnan(faces.y[:, 4:20]).all() for faces in incomplete)


def test_a_net_trains_on_the_complete_faces_and_the_incomplete_ones_labelled_for_its_keypoints():
    nan = np.nan
    complete = data.FaceSet(np.zeros((2, 1, 96, 96), np.float32), np.arange(60, dtype=np.float32).reshape(2, 30))
    incomplete_y = np.full((3, 30), nan, np.float32)
    incomplete_y[0, :4] = 1  # both eye centres
    incomplete_y[1, :2] = 2  # the left eye centre alone
    incomplete_y[2, 20:22] = 3  # the nose tip alone
    incomplete = data.FaceSet(np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1) * np.ones((1, 1, 96, 96), np.float32),
                              incomplete_y)
    eyes = (0, 1, 2, 3)
    strict = data.faces_for_net(complete, incomplete, eyes, masked=False)
    assert strict.y.tolist() == [[0, 1, 2, 3], [30, 31, 32, 33], [1, 1, 1, 1]] and strict.X[2, 0, 0, 0] == 0
    masked = data.faces_for_net(complete, incomplete, eyes, masked=True)
    assert len(masked) == 4 and masked.X[3, 0, 0, 0] == 1
    assert masked.y[3, :2].tolist() == [2, 2] and np.isnan(masked.y[3, 2:]).all()
    # A net of all 15 keypoints, not masked: the complete faces alone, as before incomplete ones were kept.
    whole = data.faces_for_net(complete, incomplete, tuple(range(30)), masked=False)
    assert np.array_equal(whole.y, complete.y) and np.array_equal(whole.X, complete.X)
