import torch

from pipeline.base.config import keypoint_columns
from pipeline.faces.augment import flip, flip_permutation, flip_random_half
from pipeline.faces.kaggle import FLIP_PAIRS, KEYPOINT_COLUMNS


def batch(n=8):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 96, 96, generator=generator), torch.rand(n, 30, generator=generator) * 2 - 1


def test_flip_mirrors_images_negates_x_and_swaps_pairs():
    images, targets = batch()
    flipped_images, flipped_targets = flip(images, targets)
    torch.testing.assert_close(flipped_images[..., 0], images[..., 95])
    left_eye_x = KEYPOINT_COLUMNS.index("left_eye_center_x")
    right_eye_x = KEYPOINT_COLUMNS.index("right_eye_center_x")
    right_eye_y = KEYPOINT_COLUMNS.index("right_eye_center_y")
    left_eye_y = KEYPOINT_COLUMNS.index("left_eye_center_y")
    torch.testing.assert_close(flipped_targets[:, right_eye_x], -targets[:, left_eye_x])
    torch.testing.assert_close(flipped_targets[:, right_eye_y], targets[:, left_eye_y])
    nose_x = KEYPOINT_COLUMNS.index("nose_tip_x")
    torch.testing.assert_close(flipped_targets[:, nose_x], -targets[:, nose_x])
    assert len(FLIP_PAIRS) == 12 and sorted(flip_permutation()) == list(range(30))


def test_flipping_twice_is_the_identity():
    images, targets = batch()
    twice_images, twice_targets = flip(*flip(images, targets))
    torch.testing.assert_close(twice_images, images)
    torch.testing.assert_close(twice_targets, targets)


def test_flips_exactly_half_and_leaves_the_stored_batch_untouched():
    images, targets = batch(10)
    stored_images, stored_targets = images.clone(), targets.clone()
    generator = torch.Generator().manual_seed(0)
    out_images, out_targets = flip_random_half(images, targets, generator)
    torch.testing.assert_close(images, stored_images)
    torch.testing.assert_close(targets, stored_targets)
    mirrored_images, mirrored_targets = flip(images, targets)
    changed = [i for i in range(10) if not torch.equal(out_images[i], images[i])]
    assert len(changed) == 5
    for i in range(10):
        expected_images = mirrored_images[i] if i in changed else images[i]
        expected_targets = mirrored_targets[i] if i in changed else targets[i]
        torch.testing.assert_close(out_images[i], expected_images)
        torch.testing.assert_close(out_targets[i], expected_targets)


def test_the_chosen_half_varies_between_batches():
    images, targets = batch(16)
    generator = torch.Generator().manual_seed(0)
    first = flip_random_half(images, targets, generator)[0]
    second = flip_random_half(images, targets, generator)[0]
    assert not torch.equal(first, second)


def test_the_whole_face_permutation_swaps_exactly_the_kaggle_pairs():
    expected = list(range(30))
    for left, right in FLIP_PAIRS:
        expected[left], expected[right] = right, left
    assert flip_permutation() == expected


def test_a_group_flips_as_the_whole_face_restricted_to_its_columns():
    images, targets = batch()
    for group in (["left_eye_center", "right_eye_center"], ["nose_tip"], ["mouth_center_bottom_lip", "mouth_left_corner",
                  "mouth_right_corner"], ["left_eyebrow_inner_end", "right_eyebrow_inner_end", "left_eyebrow_outer_end",
                                          "right_eyebrow_outer_end"]):
        columns = keypoint_columns(tuple(group))
        flipped_images, flipped = flip(images, targets[:, list(columns)], columns)
        torch.testing.assert_close(flipped, flip(images, targets)[1][:, list(columns)])
        torch.testing.assert_close(flipped_images, images.flip(-1))
        torch.testing.assert_close(flip(flipped_images, flipped, columns)[1], targets[:, list(columns)])


def test_an_unlabelled_keypoint_stays_unlabelled_and_moves_with_its_pair():
    columns = keypoint_columns(("left_eye_center", "right_eye_center"))
    targets = torch.tensor([[0.5, 0.1, float("nan"), float("nan")]])
    _, flipped = flip(torch.zeros(1, 1, 96, 96), targets, columns)
    assert torch.isnan(flipped[0, :2]).all()
    torch.testing.assert_close(flipped[0, 2:], torch.tensor([-0.5, 0.1]))
