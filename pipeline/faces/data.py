"""The seed's load2d semantics, the held-out test split and the prepared-array format."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.base.config import PARAMS_FILE
from pipeline.base.errors import PipelineError, counted, describe
from pipeline.base.files import atomic_folder, json_text, read_json
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, read_training_csv

PREPARE = "run `dvc repro prepare`"
# The summary's record of each array file's SHA-256, by file name: what the later stages check the
# arrays against.
CHECKSUMS = "sha256"
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
    n_dropped: int  # incomplete
    repeated: dict[int, int]  # complete rows dropped as repeats of an earlier row's image: line -> that row's line


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
    """Read a Kaggle-layout CSV as the seed's load2d does: complete rows only, shuffled with `seed`;
    and, unlike the seed, each image once (see first_copies)."""
    images, keypoints = read_training_csv(path)
    complete = np.flatnonzero(~np.isnan(keypoints).any(axis=1))
    if not len(complete):
        raise PipelineError(f"{path}: no row has all 30 keypoints, so there is nothing to train on")
    kept, repeated = first_copies(images, complete)
    order = np.random.default_rng(seed).permutation(len(kept))
    faces = FaceSet(
        X=images_of(images[kept][order, None]),
        y=scale_keypoints(keypoints[kept][order]),
    )
    return faces, LoadReport(n_rows=len(images), n_dropped=len(images) - len(complete), repeated=repeated)


def first_copies(images: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """The `rows` whose image no earlier one of `rows` has, and the others, by CSV line, with the line
    of the row whose image they repeat.

    A face in the file twice could land in training and in the test portion at once, and be scored
    on what the net learnt by heart (or in the train stage's validation part, and choose the kept
    epoch). Dropping the copies keeps every image on one side of every split; the first keeps its
    keypoints, so a copy annotated differently loses its annotation.
    """
    _, first, copy_of = np.unique(images[rows].reshape(len(rows), -1), axis=0, return_index=True,
                                  return_inverse=True)
    is_first = np.zeros(len(rows), dtype=bool)
    is_first[first] = True
    # CSV lines: the header is line 1, row 0 line 2.
    repeated = {int(rows[row]) + 2: int(rows[first[copy_of[row]]]) + 2 for row in np.flatnonzero(~is_first)}
    return rows[is_first], repeated


def split(faces: FaceSet, fraction: float, seed: int, key: str) -> tuple[FaceSet, FaceSet]:
    """Split off a seeded random `fraction` of the faces: returns (rest, held_out). `key` is the
    params.yaml key that gave `fraction`, which an error names."""
    n_held_out = round(len(faces) * fraction)
    if n_held_out < 1 or n_held_out >= len(faces):
        raise PipelineError(
            f"{PARAMS_FILE}: {key}: {fraction} of {counted(len(faces), 'face')} leaves {len(faces) - n_held_out} and holds out "
            f"{n_held_out}, and each part needs a face at least: use more faces or another fraction"
        )
    order = np.random.default_rng(seed).permutation(len(faces))
    return faces.take(np.sort(order[n_held_out:])), faces.take(np.sort(order[:n_held_out]))


def save_prepared(summary_path: Path, portions: dict[Path, FaceSet], summary: dict) -> dict:
    """Write the portions (array files in the summary's folder) and the summary with their checksums,
    as one unit (files.atomic_folder): a reader never finds arrays beside a summary of other arrays.
    Returns the summary written."""
    with atomic_folder(summary_path.parent) as folder:
        checksums = {path.name: _save_faces(folder / path.name, faces) for path, faces in portions.items()}
        summary = {**summary, CHECKSUMS: checksums}
        (folder / summary_path.name).write_text(json_text(summary))
    return summary


def _save_faces(path: Path, faces: FaceSet) -> str:
    """Store as uint8 pixels, four times smaller than float32 and exact, since X came from uint8.
    Returns the file's SHA-256."""
    stream = io.BytesIO()
    np.savez(stream, pixels=pixels_of(faces.X), keypoints=faces.y)
    path.write_bytes(stream.getbuffer())
    return hashlib.sha256(stream.getbuffer()).hexdigest()


def load_faces(path: Path, summary: dict) -> FaceSet:
    """The faces of an array file, after checking its bytes against the checksum that `summary`
    (read_summary: prepare's summary beside it) records: a changed pixel, or arrays of another
    preparation, are refused rather than trained on or scored under the summary's data hash."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file ({PREPARE})")
    content = path.read_bytes()
    if hashlib.sha256(content).hexdigest() != summary[CHECKSUMS].get(path.name):
        raise PipelineError(f"{path}: damaged: its content does not match the checksum that summary.json beside it "
                            f"records; {PREPARE}")
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as stored:
            pixels, keypoints = stored["pixels"], stored["keypoints"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise PipelineError(f"{path}: damaged: {describe(error)}; {PREPARE}") from None
    if (pixels.dtype != np.uint8 or pixels.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE)
            or keypoints.shape != (len(pixels), len(KEYPOINT_COLUMNS))):
        raise PipelineError(f"{path}: damaged: arrays of shapes {pixels.shape} and {keypoints.shape}; {PREPARE}")
    return FaceSet(X=images_of(pixels), y=keypoints)


def read_summary(path: Path) -> dict:
    """What `prepare` recorded: the source, the counts, the data hash and the arrays' checksums."""
    summary = read_json(path, PREPARE)
    if not isinstance(summary.get(CHECKSUMS), dict):
        raise PipelineError(f"{path}: records no checksums of the arrays beside it (an older `prepare` wrote it); "
                            f"{PREPARE}")
    return summary


def content_hash(*face_sets: FaceSet) -> str:
    """A short digest of the prepared arrays, logged by later stages for lineage."""
    digest = hashlib.sha256()
    for faces in face_sets:
        digest.update(pixels_of(faces.X).tobytes())
        digest.update(np.ascontiguousarray(faces.y).tobytes())
    return digest.hexdigest()[:16]
