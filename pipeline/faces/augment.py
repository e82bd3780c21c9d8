"""Horizontal flip augmentation of a batch (net5, and a specialist of keypoints that come in pairs), as pure
functions."""

from __future__ import annotations

import functools

import torch

from pipeline.faces.kaggle import FLIP_PAIRS, KEYPOINT_COLUMNS


ALL_COLUMNS = tuple(range(len(KEYPOINT_COLUMNS)))


def flip_permutation(columns: tuple[int, ...] = ALL_COLUMNS) -> list[int]:
    """For each of a net's target columns (columns of KEYPOINT_COLUMNS), the position among them of the
    column a mirror turns it into: its pair's (left and right swap) or its own (the nose, the lips'
    centres). Every column's pair must be among `columns` (config refuses a flipping net without it)."""
    partner = {**dict(FLIP_PAIRS), **{right: left for left, right in FLIP_PAIRS}}
    position = {column: index for index, column in enumerate(columns)}
    return [position[partner.get(column, column)] for column in columns]


def x_column_sign(columns: tuple[int, ...] = ALL_COLUMNS) -> list[float]:
    # Scaled x coordinates are centred on the image's middle, so a mirror negates them.
    return [-1.0 if KEYPOINT_COLUMNS[column].endswith("_x") else 1.0 for column in columns]


@functools.cache
def _flip_tables(columns: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a table made from a Python list in every batch would be a
    # host-to-device copy, which makes a GPU wait for the host.
    return (torch.tensor(flip_permutation(columns), device=device),
            torch.tensor(x_column_sign(columns), dtype=dtype, device=device))


def flip(images: torch.Tensor, targets: torch.Tensor,
         columns: tuple[int, ...] = ALL_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror every image and its keypoints (`targets`, the net's `columns` of KEYPOINT_COLUMNS): x negated,
    left/right pairs swapped. An unlabelled coordinate (NaN) moves with its keypoint and stays NaN."""
    permutation, sign = _flip_tables(columns, targets.device, targets.dtype)
    return images.flip(-1), targets[:, permutation] * sign


def flip_random_half(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                     columns: tuple[int, ...] = ALL_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a random half of the batch into new tensors; the inputs are never modified.

    The seed's iterator flipped views of its stored data in place, so its flips piled up from
    epoch to epoch; selecting into new tensors keeps the stored training set as it was loaded.
    The half is the first n // 2 rows of a random permutation, chosen by a mask rather than
    written through an index: no scatter kernel, which on a GPU in deterministic mode would be a
    sort, and nothing that waits for the host.
    """
    order = torch.randperm(len(images), generator=generator, device=generator.device)
    chosen = order.argsort() < len(images) // 2  # row i is chosen if it comes in the permutation's first half
    flipped_images, flipped_targets = flip(images, targets, columns)
    return (torch.where(chosen[:, None, None, None], flipped_images, images),
            torch.where(chosen[:, None], flipped_targets, targets))
