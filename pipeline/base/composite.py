"""A composite (params.yaml's composites.<name>): nets of groups of keypoints put side by side into one
predictor of all 30 columns, as the tutorial combines its specialists. No I/O here but reading the
members' weights (load_composite)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.base.config import Config
from pipeline.base.weights import checksum, load_model
from pipeline.base.shapes import KEYPOINT_COLUMNS


def combine(columns: Sequence[Sequence[int]], predicted: Sequence[np.ndarray]) -> np.ndarray:
    """The 30 columns (n, 30) of the members' predictions, each (n, len(its columns)) in its columns'
    order: each member's answers go to its own columns, as the composite's model (Composite) gives them."""
    _check_columns(columns)
    combined = np.empty((len(predicted[0]), len(KEYPOINT_COLUMNS)), dtype=np.result_type(*predicted))
    for member_columns, answers in zip(columns, predicted, strict=True):
        combined[:, list(member_columns)] = answers
    return combined


class Composite(nn.Module):
    """The members' outputs side by side, in KEYPOINT_COLUMNS order: a model of all 30 columns, which
    torch.export exports like a net (pipeline.tracking.export), so the registered model of a composite
    has the nets' signature."""

    def __init__(self, members: Sequence[nn.Module], columns: Sequence[Sequence[int]]):
        super().__init__()
        _check_columns(columns)
        self.members = nn.ModuleList(members)
        # Where each of the 30 columns is in the members' outputs concatenated.
        concatenated = [column for member_columns in columns for column in member_columns]
        self.register_buffer("order", torch.tensor([concatenated.index(column)
                                                    for column in range(len(KEYPOINT_COLUMNS))]), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(images) for member in self.members], dim=1)[:, self.order]


def _check_columns(columns: Sequence[Sequence[int]]) -> None:
    """Each of the 30 columns from one member: config.Config checks params.yaml's composites so."""
    if sorted(column for member_columns in columns for column in member_columns) != list(range(len(KEYPOINT_COLUMNS))):
        raise ValueError(f"a composite's members must answer each of the {len(KEYPOINT_COLUMNS)} columns once, "
                         f"got {[list(member_columns) for member_columns in columns]}")


def member_columns(config: Config, name: str) -> list[tuple[int, ...]]:
    """The columns of KEYPOINT_COLUMNS each member of composite `name` predicts, in the members' order."""
    return [config.nets[member].columns for member in config.composites[name]]


def load_composite(config: Config, name: str, seed: int | None = None) -> Composite:
    """Composite `name` of its members' trainings under `seed` (PathsConfig's files of a seed: None for
    the first's), in evaluation mode on the CPU."""
    members = [load_model(Path(config.paths.model(member, seed)), "cpu") for member in config.composites[name]]
    return Composite(members, member_columns(config, name)).eval()


def composite_checksum(config: Config, name: str, weights: dict[str, str]) -> str:
    """What names a composite as weights_checksum names a net (its WEIGHTS_TAG in MLflow): its members,
    their columns and their weights' checksums (`weights`, by member). The same members' weights give
    the same checksum, so evaluating again finds the composite's run and version."""
    return checksum([(member, list(config.nets[member].columns), weights[member])
                     for member in config.composites[name]])
