"""Tests of the synthetic face renderer: layout, determinism, Kaggle statistics and conventions."""

import hashlib
import math

import numpy as np
import pytest

from pipeline.faces.kaggle import IMAGE_SIZE, KAGGLE_MEANS, KEYPOINT_COLUMNS, KEYPOINTS
from pipeline.faces.synthetic import (_HEAD_RADIUS, _NOSE_RADIUS, _Pose, _choose_missing_keypoints, _to_canonical,
                                      _to_image, render_faces)

ALWAYS_LABELLED = ("left_eye_center", "right_eye_center", "nose_tip", "mouth_center_bottom_lip")
LEFT_RIGHT_PAIRS = tuple((f"left_{part}", f"right_{part}") for part in (
    "eye_center", "eye_inner_corner", "eye_outer_corner", "eyebrow_inner_end", "eyebrow_outer_end",
)) + (("mouth_left_corner", "mouth_right_corner"),)


# Enough faces for the statistics to test the renderer rather than chance: the column means' sampling
# error is at most 0.5 px for 3 px allowed, and 60 partly labelled rows put the share with every optional
# keypoint missing (0.7) five standard errors above the 0.4 required.
N_FACES = 300
N_PARTLY_LABELLED = 200


@pytest.fixture(scope="module")
def faces():
    return render_faces(N_FACES, seed=0, missing_fraction=0.0)


@pytest.fixture(scope="module")
def partly_labelled():
    return render_faces(N_PARTLY_LABELLED, seed=1, missing_fraction=0.3)


def column(keypoints, name):
    return keypoints[:, KEYPOINT_COLUMNS.index(name)]


def point(keypoints, name):
    return np.stack([column(keypoints, name + "_x"), column(keypoints, name + "_y")], axis=1)


def patch_median(images, points):
    """Median of the 3x3 pixels around each point, one point per image (pixel j covers [j, j+1))."""
    columns = np.clip(np.floor(points[:, 0]).astype(int), 1, IMAGE_SIZE - 2)
    rows = np.clip(np.floor(points[:, 1]).astype(int), 1, IMAGE_SIZE - 2)
    return np.array([np.median(image[row - 1:row + 2, col - 1:col + 2])
                     for image, row, col in zip(images, rows, columns)])


def test_shapes_and_dtypes(faces):
    images, keypoints = faces
    assert images.shape == (N_FACES, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.uint8
    assert keypoints.shape == (N_FACES, len(KEYPOINT_COLUMNS)) and keypoints.dtype == np.float64


def test_same_seed_gives_identical_output():
    first, second = render_faces(20, 7, 0.4), render_faces(20, 7, 0.4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_seeds_give_different_faces():
    images_a, keypoints_a = render_faces(5, 1, 0.0)
    images_b, keypoints_b = render_faces(5, 2, 0.0)
    assert not np.array_equal(images_a, images_b)
    assert not np.allclose(keypoints_a, keypoints_b)


def test_column_means_match_kaggle(faces):
    means = np.nanmean(faces[1], axis=0)
    assert np.abs(means - KAGGLE_MEANS).max() < 3.0


def test_pose_varies_by_several_pixels(faces):
    assert faces[1].std(axis=0).min() > 3.0


def test_keypoints_lie_inside_the_image(faces, partly_labelled):
    for _, keypoints in (faces, partly_labelled):
        labelled = keypoints[~np.isnan(keypoints)]
        assert labelled.min() >= 0 and labelled.max() <= IMAGE_SIZE


def test_subject_left_is_on_the_image_right(faces):
    keypoints = faces[1]
    for left, right in LEFT_RIGHT_PAIRS:
        assert (column(keypoints, left + "_x") > column(keypoints, right + "_x")).all(), left
    for side, outwards in (("left", 1), ("right", -1)):
        outer = column(keypoints, f"{side}_eye_outer_corner_x")
        inner = column(keypoints, f"{side}_eye_inner_corner_x")
        assert (outwards * (outer - inner) > 0).all(), side


def test_eye_centres_land_on_dark_irises(faces):
    images, keypoints = faces
    for side in ("left", "right"):
        eye = point(keypoints, f"{side}_eye_center")
        cheek = (eye + point(keypoints, f"mouth_{side}_corner")) / 2
        assert (patch_median(images, eye) < patch_median(images, cheek) - 10).all(), side


def test_keypoints_follow_the_drawing_transform():
    """Keypoints are drawn through _to_canonical, so _to_image must be its exact inverse."""
    rng = np.random.default_rng(0)
    for radius in (_HEAD_RADIUS, _NOSE_RADIUS):
        canonical = rng.uniform(15, 81, size=(200, 2))
        pose = _Pose(roll=0.2, scale=0.9, yaw=-0.3, shift=(4.0, -3.0))
        image = _to_image(canonical, pose, radius)
        back = np.stack(_to_canonical((image[:, 0], image[:, 1]), pose, radius), axis=1)
        np.testing.assert_allclose(back, canonical, atol=1e-9)


def test_missing_rows_share_and_pattern(partly_labelled):
    keypoints = partly_labelled[1]
    missing = np.isnan(keypoints)
    np.testing.assert_array_equal(missing[:, 0::2], missing[:, 1::2])
    affected = missing.any(axis=1)
    assert abs(affected.mean() - 0.3) < 0.02
    always = [KEYPOINTS.index(name) for name in ALWAYS_LABELLED]
    assert not missing[:, 0::2][:, always].any()
    optional_missing = np.delete(missing[:, 0::2], always, axis=1)[affected]
    assert optional_missing.all(axis=1).mean() > 0.4


def test_no_missing_keypoints_when_fraction_is_zero(faces):
    assert not np.isnan(faces[1]).any()


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        render_faces(n, 0, 0.0)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, math.nan, "0.2"])
def test_rejects_bad_missing_fraction(fraction):
    with pytest.raises(ValueError, match=r"missing_fraction must be a number in \[0, 1\)"):
        render_faces(3, 0, fraction)


@pytest.mark.parametrize("pattern", ["Kaggle", "", None])
def test_rejects_bad_missing_pattern(pattern):
    with pytest.raises(ValueError, match=r"missing_pattern must be one of random, kaggle"):
        render_faces(3, 0, 0.3, pattern)


def outer_columns():
    return [column for column, name in enumerate(KEYPOINT_COLUMNS) if name.rsplit("_", 1)[0] not in ALWAYS_LABELLED]


def test_the_kaggle_pattern_leaves_the_partial_rows_the_four_central_keypoints_alone():
    """As in Kaggle's file, where 70% of the rows have only the eye centres, the nose tip and the bottom lip."""
    images, keypoints = render_faces(60, seed=2, missing_fraction=0.7, missing_pattern="kaggle")
    missing = np.isnan(keypoints)
    partial = missing.any(axis=1)
    assert partial.sum() == 42 and len(outer_columns()) == 22
    assert (missing[partial] == np.isin(np.arange(30), outer_columns())).all()  # exactly the 11 outer keypoints
    # The same faces as the random pattern's: only the missing keypoints differ.
    random_images, random_keypoints = render_faces(60, seed=2, missing_fraction=0.7, missing_pattern="random")
    np.testing.assert_array_equal(images, random_images)
    np.testing.assert_array_equal(keypoints[~missing], random_keypoints[~missing])


def test_the_random_pattern_draws_the_masks_it_drew_before_the_kaggle_one():
    """What keeps the default synthetic CSV (missing_fraction 0.3, seed 7) the same bytes: the masks of the rule
    as it was, pinned: 70% of the partial rows lack all 11 outer keypoints, the others a random 1 to 10."""
    digests = {(seed, n, fraction): hashlib.sha256(_choose_missing_keypoints(
                   np.random.default_rng(seed), n, fraction, "random").tobytes()).hexdigest()[:16]
               for seed, n, fraction in ((7, 2400, 0.3), (1, 40, 0.5))}
    assert digests == {(7, 2400, 0.3): "06470af8b9cda87d", (1, 40, 0.5): "de06b847b40ba9e6"}
    missing = _choose_missing_keypoints(np.random.default_rng(1), 12, 0.5)  # "random" by default
    assert [(row, missing[row].sum()) for row in np.flatnonzero(missing.any(axis=1))] == [
        (0, 7), (1, 10), (3, 3), (4, 11), (6, 5), (9, 6)]
