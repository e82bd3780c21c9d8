"""Horizontal flip augmentation of a batch (net5), as a pure function."""

from __future__ import annotations

import functools

import torch

from pipeline.kaggle import FLIP_PAIRS, KEYPOINT_COLUMNS


def _flip_permutation() -> list[int]:
    permutation = list(range(len(KEYPOINT_COLUMNS)))
    for left, right in FLIP_PAIRS:
        permutation[left], permutation[right] = right, left
    return permutation


FLIP_PERMUTATION = _flip_permutation()
# Scaled x coordinates are centred on the image's middle, so a mirror negates them.
X_COLUMN_SIGN = [(-1.0 if column.endswith("_x") else 1.0) for column in KEYPOINT_COLUMNS]


@functools.cache
def _flip_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a table made from a Python list in every batch would be a
    # host-to-device copy, which makes a GPU wait for the host.
    return (torch.tensor(FLIP_PERMUTATION, device=device),
            torch.tensor(X_COLUMN_SIGN, dtype=dtype, device=device))


def flip(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror every image and its keypoints: x negated, left/right pairs swapped."""
    permutation, sign = _flip_tables(targets.device, targets.dtype)
    return images.flip(-1), targets[:, permutation] * sign


def flip_random_half(images: torch.Tensor, targets: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a random half of the batch into new tensors; the inputs are never modified.

    The seed's iterator flipped views of its stored data in place, so its flips piled up from
    epoch to epoch; copying here keeps the stored training set as it was loaded.
    """
    chosen = torch.randperm(len(images), generator=generator, device=generator.device)[: len(images) // 2]
    flipped_images, flipped_targets = flip(images[chosen], targets[chosen])
    images, targets = images.clone(), targets.clone()
    images[chosen] = flipped_images
    targets[chosen] = flipped_targets
    return images, targets
