"""The seed's load2d semantics, the held-out test split and the prepared-array format."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.base.errors import PipelineError, describe
from pipeline.base.files import atomic_write, read_json
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, read_training_csv

PREPARE = "run `dvc repro prepare`"
# Keypoints live in 0..96 pixels; the network regresses them in [-1, 1].
KEYPOINT_CENTER = IMAGE_SIZE / 2
KEYPOINT_SCALE = IMAGE_SIZE / 2


@dataclass(frozen=True)
class FaceSet:
    """X: float32 (n, 1, 96, 96) in [0, 1]; y: float32 (n, 30), scaled to [-1, 1]."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.X)

    def take(self, rows: np.ndarray | slice) -> "FaceSet":
        return FaceSet(self.X[rows], self.y[rows])


@dataclass(frozen=True)
class LoadReport:
    n_rows: int
    n_dropped: int


def images_of(pixels: np.ndarray) -> np.ndarray:
    """8-bit gray levels as the net's float32 input in 0..1."""
    return pixels.astype(np.float32) / np.float32(255)


def pixels_of(images: np.ndarray) -> np.ndarray:
    """Levels in 0..1 as 8-bit gray, to the nearest: the net's input back exactly (it came from them)."""
    return np.rint(images * 255).astype(np.uint8)


def loss_to_rmse_px(loss):
    """A mean squared error in the scaled space as an RMSE in pixels (works on arrays too)."""
    return np.sqrt(loss) * KEYPOINT_SCALE


def scale_keypoints(pixels: np.ndarray) -> np.ndarray:
    return ((pixels - KEYPOINT_CENTER) / KEYPOINT_SCALE).astype(np.float32)


def unscale_keypoints(scaled: np.ndarray) -> np.ndarray:
    return scaled * KEYPOINT_SCALE + KEYPOINT_CENTER


def load(path: Path, seed: int) -> tuple[FaceSet, LoadReport]:
    """Read a Kaggle-layout CSV as the seed's load2d does: complete rows only, shuffled with `seed`."""
    images, keypoints = read_training_csv(path)
    complete = ~np.isnan(keypoints).any(axis=1)
    if not complete.any():
        raise PipelineError(f"{path}: no row has all 30 keypoints, so there is nothing to train on")
    order = np.random.default_rng(seed).permutation(int(complete.sum()))
    faces = FaceSet(
        X=images_of(images[complete][order, None]),
        y=scale_keypoints(keypoints[complete][order]),
    )
    return faces, LoadReport(n_rows=len(images), n_dropped=int((~complete).sum()))


def split(faces: FaceSet, fraction: float, seed: int) -> tuple[FaceSet, FaceSet]:
    """Split off a seeded random `fraction` of the faces: returns (rest, held_out)."""
    n_held_out = round(len(faces) * fraction)
    if n_held_out < 1 or n_held_out >= len(faces):
        raise PipelineError(
            f"splitting {len(faces)} faces by {fraction} leaves an empty part: use more data or another fraction"
        )
    order = np.random.default_rng(seed).permutation(len(faces))
    return faces.take(np.sort(order[n_held_out:])), faces.take(np.sort(order[:n_held_out]))


def save_faces(path: Path, faces: FaceSet) -> None:
    """Store as uint8 pixels, four times smaller than float32 and exact, since X came from uint8."""
    pixels = pixels_of(faces.X)
    with atomic_write(path) as temporary, temporary.open("wb") as stream:
        np.savez(stream, pixels=pixels, keypoints=faces.y)


def load_faces(path: Path) -> FaceSet:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file ({PREPARE})")
    try:
        with np.load(path, allow_pickle=False) as stored:
            pixels, keypoints = stored["pixels"], stored["keypoints"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise PipelineError(f"{path}: damaged: {describe(error)}; {PREPARE}") from None
    if (pixels.dtype != np.uint8 or pixels.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE)
            or keypoints.shape != (len(pixels), len(KEYPOINT_COLUMNS))):
        raise PipelineError(f"{path}: damaged: arrays of shapes {pixels.shape} and {keypoints.shape}; {PREPARE}")
    return FaceSet(X=images_of(pixels), y=keypoints)


def read_summary(path: Path) -> dict:
    """What `prepare` recorded: the source, the counts and the data hash."""
    return read_json(path, PREPARE)


def content_hash(*face_sets: FaceSet) -> str:
    """A short digest of the prepared arrays, logged by later stages for lineage."""
    digest = hashlib.sha256()
    for faces in face_sets:
        digest.update(pixels_of(faces.X).tobytes())
        digest.update(np.ascontiguousarray(faces.y).tobytes())
    return digest.hexdigest()[:16]
