"""The seed's load2d semantics, the held-out test split and the prepared-array format."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.base.errors import PipelineError, describe
from pipeline.base.files import atomic_folder, json_text, read_json
from pipeline.base.params_file import PARAMS_FILE
from pipeline.base.text import counted
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, read_training_chunks, require_file

PREPARE = "run `dvc repro prepare`"
# The summary's record of each array file's SHA-256, by file name: what the later stages check the
# arrays against.
CHECKSUMS = "sha256"
# Keypoints live in 0..96 pixels; the network regresses them in [-1, 1].
KEYPOINT_CENTER = IMAGE_SIZE / 2
KEYPOINT_SCALE = IMAGE_SIZE / 2
# Bytes read at once to checksum an array file or to count a CSV's lines.
READ_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class FaceSet:
    """X: float32 (n, 1, 96, 96) in [0, 1]; y: float32 (n, 30), scaled to [-1, 1]."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.X)

    def take(self, rows: np.ndarray | slice) -> "FaceSet":
        return FaceSet(self.X[rows], self.y[rows])

    def stored(self) -> "StoredFaces":
        return StoredFaces(pixels_of(self.X), self.y)


@dataclass(frozen=True)
class StoredFaces:
    """Faces as the prepared array files hold them: pixels uint8 (n, 1, 96, 96), a quarter of FaceSet's
    float32 X, and keypoints float32 (n, 30), scaled to [-1, 1]."""

    pixels: np.ndarray
    keypoints: np.ndarray

    def __len__(self) -> int:
        return len(self.pixels)

    def take(self, rows: np.ndarray | slice) -> "StoredFaces":
        return StoredFaces(self.pixels[rows], self.keypoints[rows])


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


def load_split(path: Path, seed: int, fraction: float, key: str) -> tuple[StoredFaces, StoredFaces, LoadReport]:
    """A Kaggle-layout CSV as the seed's load2d reads it, complete rows only and shuffled with `seed`;
    unlike the seed, each image once (see first_copies); split as split() splits (rest, held out).

    Read in chunks straight into uint8, and shuffled and split in place: the memory of the prepared
    faces, once, and of a chunk of the file's text.
    """
    pixels, keypoints, report = first_copies(path)
    n_faces = len(pixels)
    if not n_faces:
        raise PipelineError(f"{path}: no row has all 30 keypoints, so there is nothing to train on")
    # Which face of the file goes to each row of the portions, one after the other: the shuffle, then the split.
    order = np.random.default_rng(seed).permutation(n_faces)
    rest, held_out = (order[rows] for rows in split_rows(n_faces, fraction, seed, key))
    source = np.concatenate([rest, held_out])
    permute_rows(pixels, source)
    faces = StoredFaces(pixels[:, None], scale_keypoints(keypoints[source]))
    return faces.take(slice(0, len(rest))), faces.take(slice(len(rest), n_faces)), report


def permute_rows(rows: np.ndarray, source: np.ndarray) -> None:
    """rows[i] = the old rows[source[i]] for every i, in place: one row of memory more, not a copy of
    them all. Each cycle of the permutation is followed from its first row, kept aside."""
    done = np.zeros(len(source), dtype=bool)
    for start in np.flatnonzero(source != np.arange(len(source))):
        if done[start]:
            continue
        first, row = rows[start].copy(), start
        while source[row] != start:
            rows[row] = rows[source[row]]
            done[row], row = True, source[row]
        rows[row], done[row] = first, True


def first_copies(path: Path) -> tuple[np.ndarray, np.ndarray, LoadReport]:
    """The complete rows whose image no earlier complete row has, in the file's order, as uint8 images
    (n, 96, 96) and keypoints in pixels; and the report, which names each dropped copy by its CSV line
    with the line of the row whose image it repeats.

    A face in the file twice could land in training and in the test portion at once, and be scored
    on what the net learnt by heart (or in the train stage's validation part, and choose the kept
    epoch). Dropping the copies keeps every image on one side of every split; the first keeps its
    keypoints, so a copy annotated differently loses its annotation. Images are told apart by a
    128-bit BLAKE2 digest: that two images of a million share one has a chance below 10^-26.

    The images go into an array of as many rows as the file has lines: the system commits its
    memory page by page as rows are written, so the rows a file lacks (incomplete, repeated) cost none.
    """
    require_file(path)  # before counting its lines: a named pipe would be read away
    images_kept = np.empty((count_lines(path), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    keypoints_kept = []
    first_line: dict[bytes, int] = {}
    repeated: dict[int, int] = {}
    n_rows = n_incomplete = n_kept = 0
    for images, keypoints in read_training_chunks(path):
        complete = np.flatnonzero(~np.isnan(keypoints).any(axis=1))
        kept = []
        for row in complete:
            line = n_rows + int(row) + 2  # the header is line 1, row 0 line 2
            original = first_line.setdefault(hashlib.blake2b(images[row], digest_size=16).digest(), line)
            if original == line:
                kept.append(row)
            else:
                repeated[line] = original
        n_rows, n_incomplete = n_rows + len(images), n_incomplete + len(images) - len(complete)
        images_kept[n_kept:n_kept + len(kept)] = images[kept]
        keypoints_kept.append(keypoints[kept])
        n_kept += len(kept)
    report = LoadReport(n_rows=n_rows, n_dropped=n_incomplete, repeated=repeated)
    return images_kept[:n_kept], np.concatenate(keypoints_kept), report


def count_lines(path: Path) -> int:
    """The lines of a file, the last one counted without its line break: at least its CSV rows."""
    with path.open("rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b"")) + 1


def split_rows(n_faces: int, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a seeded random `fraction` of `n_faces` faces, and of the rest: (rest, held_out),
    each in ascending order. `key` is the params.yaml key that gave `fraction`, which an error names."""
    n_held_out = round(n_faces * fraction)
    if n_held_out < 1 or n_held_out >= n_faces:
        raise PipelineError(
            f"{PARAMS_FILE}: {key}: {fraction} of {counted(n_faces, 'face')} leaves {n_faces - n_held_out} and holds "
            f"out {n_held_out}, and each part needs a face at least: use more faces or another fraction"
        )
    order = np.random.default_rng(seed).permutation(n_faces)
    return np.sort(order[n_held_out:]), np.sort(order[:n_held_out])


def split(faces: FaceSet, fraction: float, seed: int, key: str) -> tuple[FaceSet, FaceSet]:
    """Split off a seeded random `fraction` of the faces (split_rows): returns (rest, held_out)."""
    rest, held_out = split_rows(len(faces), fraction, seed, key)
    return faces.take(rest), faces.take(held_out)


def save_prepared(summary_path: Path, portions: dict[Path, StoredFaces], summary: dict) -> dict:
    """Write the portions (array files in the summary's folder) and the summary with their checksums,
    as one unit (files.atomic_folder): a reader never finds arrays beside a summary of other arrays.
    Returns the summary written."""
    with atomic_folder(summary_path.parent) as folder:
        checksums = {path.name: _save_faces(folder / path.name, faces) for path, faces in portions.items()}
        summary = {**summary, CHECKSUMS: checksums}
        (folder / summary_path.name).write_text(json_text(summary))
    return summary


def _save_faces(path: Path, faces: StoredFaces) -> str:
    """Store as uint8 pixels, four times smaller than float32 and exact, since X came from uint8;
    written as numpy streams it, with no copy of the arrays. Returns the file's SHA-256."""
    np.savez(path, pixels=faces.pixels, keypoints=faces.keypoints)
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def content_hash(*face_sets: StoredFaces) -> str:
    """A short digest of the prepared arrays, logged by later stages for lineage."""
    digest = hashlib.sha256()
    for faces in face_sets:
        digest.update(np.ascontiguousarray(faces.pixels))
        digest.update(np.ascontiguousarray(faces.keypoints))
    return digest.hexdigest()[:16]
