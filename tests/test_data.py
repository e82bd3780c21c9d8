import numpy as np
import pytest

from pipeline.base.errors import PipelineError
from pipeline.faces.data import (
    FaceSet, content_hash, load, load_faces, read_summary, save_faces, scale_keypoints, split, unscale_keypoints,
)
from pipeline.faces.kaggle import KAGGLE_MEANS, write_training_csv


def write_faces(path, n=20, incomplete=(), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    keypoints = np.clip(KAGGLE_MEANS + rng.normal(0, 2, (n, 30)), 0, 96)
    for row in incomplete:
        keypoints[row, 10:12] = np.nan
    write_training_csv(path, images, keypoints)
    return images, keypoints


def test_load_scales_like_the_seed(tmp_path):
    images, keypoints = write_faces(tmp_path / "t.csv", n=12, incomplete=[3, 7])
    faces, report = load(tmp_path / "t.csv", seed=42)
    assert report.n_rows == 12 and report.n_dropped == 2
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
    rest, held_out = split(faces, 0.25, seed=3)
    assert len(rest) == 15 and len(held_out) == 5
    rows = {tuple(y) for y in np.vstack([rest.y, held_out.y])}
    assert rows == {tuple(y) for y in faces.y}
    again_rest, _ = split(faces, 0.25, seed=3)
    np.testing.assert_array_equal(rest.y, again_rest.y)


def test_split_refuses_an_empty_part():
    with pytest.raises(PipelineError, match="empty part"):
        split(small_set(3), 0.1, seed=0)


def test_saved_faces_load_exactly(tmp_path):
    faces = small_set()
    save_faces(tmp_path / "f.npz", faces)
    loaded = load_faces(tmp_path / "f.npz")
    np.testing.assert_array_equal(loaded.X, faces.X)
    np.testing.assert_array_equal(loaded.y, faces.y)
    assert content_hash(loaded) == content_hash(faces)
    changed = FaceSet(faces.X, faces.y + 1e-3)
    assert content_hash(changed) != content_hash(faces)


def test_load_faces_names_a_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="absent.npz"):
        load_faces(tmp_path / "absent.npz")


def test_damaged_prepared_files_are_named_with_what_to_do(tmp_path):
    faces = FaceSet(np.zeros((4, 1, 96, 96), np.float32), np.zeros((4, 30), np.float32))
    save_faces(tmp_path / "train.npz", faces)
    whole = (tmp_path / "train.npz").read_bytes()
    (tmp_path / "train.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(PipelineError, match=r"train.npz: damaged: .*; run `dvc repro prepare`$"):
        load_faces(tmp_path / "train.npz")
    (tmp_path / "summary.json").write_text('{"data_hash": "ab')
    with pytest.raises(PipelineError, match=r"summary.json: damaged: not valid JSON .*; run `dvc repro prepare`$"):
        read_summary(tmp_path / "summary.json")
