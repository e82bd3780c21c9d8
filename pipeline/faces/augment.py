"""Horizontal flip augmentation of a batch (net5), as a pure function."""

from __future__ import annotations

import functools

import torch

from pipeline.faces.kaggle import FLIP_PAIRS, KEYPOINT_COLUMNS


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
    epoch to epoch; selecting into new tensors keeps the stored training set as it was loaded.
    The half is the first n // 2 rows of a random permutation, chosen by a mask rather than
    written through an index: no scatter kernel, which on a GPU in deterministic mode would be a
    sort, and nothing that waits for the host.
    """
    order = torch.randperm(len(images), generator=generator, device=generator.device)
    chosen = order.argsort() < len(images) // 2  # row i is chosen if it comes in the permutation's first half
    flipped_images, flipped_targets = flip(images, targets)
    return (torch.where(chosen[:, None, None, None], flipped_images, images),
            torch.where(chosen[:, None], flipped_targets, targets))
