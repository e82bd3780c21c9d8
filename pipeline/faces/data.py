"""The seed's load2d semantics, the held-out test split and the prepared-array format."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
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
# The incomplete faces are shuffled and split by a generator of their own, seeded with [prepare.seed, this]:
# the complete faces' (seeded with prepare.seed alone) draws what it drew before incomplete faces were kept.
INCOMPLETE_STREAM = 1


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
    n_unlabelled: int  # rows without a single keypoint, dropped
    repeated: dict[int, int]  # complete rows dropped as repeats of an earlier row's image: line -> that row's line
    # Incomplete rows dropped as repeats of a complete row's image (wherever it is) or of an earlier incomplete
    # row's: line -> the line of the row kept with that image.
    repeated_incomplete: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedSplit:
    """What load_split returns: the complete faces' two portions, the incomplete faces' two and the report."""

    train: StoredFaces
    test: StoredFaces
    train_incomplete: StoredFaces
    test_incomplete: StoredFaces
    report: LoadReport


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


def load_split(path: Path, seed: int, fraction: float, key: str) -> PreparedSplit:
    """A Kaggle-layout CSV as the seed's load2d reads it: the complete rows, shuffled with `seed` and split as
    split() splits (train = the rest, test = held out); unlike the seed, each image once (see first_copies),
    and the incomplete rows (some keypoints NaN, one at least labelled) kept apart, shuffled and split in the
    same `fraction` by a generator of their own (INCOMPLETE_STREAM). The complete portions are thus exactly
    those of the file without its incomplete rows, and the incomplete ones never hold a complete face's image.

    Read in chunks straight into uint8, and shuffled and split in place: the memory of the prepared
    faces, once, and of a chunk of the file's text.
    """
    rows = first_copies(path)
    if not len(rows.complete_keypoints):
        raise PipelineError(f"{path}: no row has all 30 keypoints, so there is nothing to train on")
    complete = np.arange(len(rows.complete_pixels))
    train, test = _shuffled_portions(rows.complete_pixels, complete, rows.complete_keypoints, seed, fraction, key)
    train_incomplete, test_incomplete = _shuffled_portions(
        rows.incomplete_pixels, rows.incomplete_positions, rows.incomplete_keypoints, [seed, INCOMPLETE_STREAM],
        fraction, key=None)
    return PreparedSplit(train, test, train_incomplete, test_incomplete, rows.report)


def _shuffled_portions(pixels: np.ndarray, positions: np.ndarray, keypoints: np.ndarray, seed, fraction: float,
                       key: str | None) -> tuple[StoredFaces, StoredFaces]:
    """The faces whose images lie at `positions` of `pixels` (the file's i-th at pixels[positions[i]]), with
    their keypoints in pixels (the i-th the file's i-th), shuffled with `seed` and split (split_rows): (rest,
    held out). The images are moved in place (permute_rows), into the first rows of `pixels`; the rows at no
    position end up after them."""
    n_faces = len(positions)
    # Which face of the file goes to each row of the portions, one after the other: the shuffle, then the split.
    order = np.random.default_rng(seed).permutation(n_faces)
    rest, held_out = (order[rows] for rows in split_rows(n_faces, fraction, seed, key))
    source = np.concatenate([rest, held_out])
    unused = np.setdiff1d(np.arange(len(pixels)), positions)
    permute_rows(pixels, np.concatenate([positions[source], unused]))
    faces = StoredFaces(pixels[:n_faces, None], scale_keypoints(keypoints[source]))
    return faces.take(slice(0, len(rest))), faces.take(slice(len(rest), n_faces))


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


@dataclass(frozen=True)
class FirstCopies:
    """What first_copies reads: uint8 images (n, 96, 96) and keypoints in pixels (n, 30), NaN where unlabelled.

    Both kinds of images share one array, the complete ones from its start in the file's order, the
    incomplete ones from its end backwards: `incomplete_positions[i]` is the row of `incomplete_pixels` that
    holds the i-th incomplete face kept (in the file's order), whose keypoints are `incomplete_keypoints[i]`;
    its other rows hold the images of incomplete rows dropped at the end for repeating a complete row's."""

    complete_pixels: np.ndarray
    complete_keypoints: np.ndarray
    incomplete_pixels: np.ndarray
    incomplete_positions: np.ndarray
    incomplete_keypoints: np.ndarray
    report: LoadReport


def first_copies(path: Path) -> FirstCopies:
    """The complete rows whose image no earlier complete row has, in the file's order, and the incomplete
    rows (one keypoint at least labelled) whose image neither a complete row (earlier or later) nor an earlier
    incomplete row has; and the report, which names each dropped copy by its CSV line with the line of the
    row kept with its image, and counts the rows without a single keypoint, which are dropped.

    A face in the file twice could land in training and in the test portion at once, and be scored
    on what the net learnt by heart (or in the train stage's validation part, and choose the kept
    epoch). Dropping the copies keeps every image on one side of every split; the first keeps its
    keypoints, so a copy annotated differently loses its annotation. The complete rows are chosen
    among themselves, as if the file had no incomplete rows: those depend on the complete ones, never
    the other way round. Images are told apart by a 128-bit BLAKE2 digest: that two images of a million
    share one has a chance below 10^-26.

    The images go into one array of as many rows as the file has lines, the complete from its start
    and the incomplete from its end: the system commits its memory page by page as rows are written,
    so the rows a file lacks (unlabelled, repeated) cost none, and no image is held twice. (An incomplete row
    whose image a later complete row has is known as a copy only then: its image is kept till the end.)
    """
    require_file(path)  # before counting its lines: a named pipe would be read away
    capacity = count_lines(path)
    images_kept = np.empty((capacity, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    complete_keypoints, incomplete_keypoints = [], []
    first_line: dict[bytes, int] = {}  # a complete image's digest -> the line of its first complete row
    first_incomplete_line: dict[bytes, int] = {}  # the same among the incomplete rows
    incomplete_rows: list[tuple[int, bytes]] = []  # each incomplete row kept so far: its line and its image's digest
    repeated: dict[int, int] = {}
    repeated_incomplete: dict[int, int] = {}
    n_rows = n_unlabelled = n_kept = n_incomplete = 0
    for images, keypoints in read_training_chunks(path):
        unlabelled = np.isnan(keypoints)
        is_complete = ~unlabelled.any(axis=1)
        kept, kept_incomplete = [], []
        for row in np.flatnonzero(~unlabelled.all(axis=1)):
            line = n_rows + int(row) + 2  # the header is line 1, row 0 line 2
            digest = hashlib.blake2b(images[row], digest_size=16).digest()
            if is_complete[row]:
                original = first_line.setdefault(digest, line)
                if original == line:
                    kept.append(row)
                else:
                    repeated[line] = original
            else:
                original = first_incomplete_line.setdefault(digest, line)
                if original == line:
                    kept_incomplete.append(row)
                    incomplete_rows.append((line, digest))
                else:
                    repeated_incomplete[line] = original
        n_rows, n_unlabelled = n_rows + len(images), n_unlabelled + int(unlabelled.all(axis=1).sum())
        images_kept[n_kept:n_kept + len(kept)] = images[kept]
        end = capacity - n_incomplete
        images_kept[end - len(kept_incomplete):end] = images[kept_incomplete[::-1]]
        complete_keypoints.append(keypoints[kept])
        incomplete_keypoints.append(keypoints[kept_incomplete])
        n_kept, n_incomplete = n_kept + len(kept), n_incomplete + len(kept_incomplete)
    # An incomplete row whose image a complete row has, before or after it, gives way to the complete row.
    keep = np.array([digest not in first_line for _, digest in incomplete_rows], dtype=bool)
    kept_instead = {line: first_line[digest] for line, digest in incomplete_rows if digest in first_line}
    repeated_incomplete = dict(sorted({**{line: kept_instead.get(original, original)
                                          for line, original in repeated_incomplete.items()},
                                       **kept_instead}.items()))
    report = LoadReport(n_rows=n_rows, n_unlabelled=n_unlabelled, repeated=repeated,
                        repeated_incomplete=repeated_incomplete)
    return FirstCopies(
        complete_pixels=images_kept[:n_kept],
        complete_keypoints=np.concatenate(complete_keypoints),
        incomplete_pixels=images_kept[capacity - n_incomplete:],
        incomplete_positions=(n_incomplete - 1 - np.flatnonzero(keep)),
        incomplete_keypoints=np.concatenate(incomplete_keypoints)[keep],
        report=report,
    )


def count_lines(path: Path) -> int:
    """The lines of a file, the last one counted without its line break: at least its CSV rows."""
    with path.open("rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b"")) + 1


def split_rows(n_faces: int, fraction: float, seed, key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a seeded random `fraction` of `n_faces` faces, and of the rest: (rest, held_out),
    each in ascending order. `key` is the params.yaml key that gave `fraction`, which an error names
    if a part would be empty; None lets either part be empty (the incomplete faces: extras, maybe none)."""
    n_held_out = round(n_faces * fraction)
    if key is not None and (n_held_out < 1 or n_held_out >= n_faces):
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
    """The faces of a complete portion (train.npz, test.npz), after checking its bytes against the checksum
    that `summary` (read_summary: prepare's summary beside it) records: a changed pixel, or arrays of another
    preparation, are refused rather than trained on or scored under the summary's data hash. So is a portion
    with unlabelled keypoints (an incomplete one: load_incomplete_faces), whose NaN would train to NaN."""
    pixels, keypoints = _read_checked(path, summary)
    if np.isnan(keypoints).any():
        raise PipelineError(f"{path}: holds faces with unlabelled keypoints (NaN), where every face should have all "
                            f"30: an incomplete portion, not a complete one; {PREPARE}")
    return FaceSet(X=images_of(pixels), y=keypoints)


def faces_for_net(complete: FaceSet, incomplete: FaceSet, columns: tuple[int, ...], masked: bool) -> FaceSet:
    """The faces a net of these target `columns` (of KEYPOINT_COLUMNS) trains on, with those columns: every
    complete face, then the incomplete faces labelled for all of them (the tutorial's specialists), or with
    `masked` for one at least (the loss then skips the unlabelled coordinates, NaN: loop.batch_loss)."""
    labelled = ~np.isnan(incomplete.y[:, list(columns)])
    rows = labelled.any(axis=1) if masked else labelled.all(axis=1)
    return FaceSet(X=np.concatenate([complete.X, incomplete.X[rows]]),
                   y=np.concatenate([complete.y[:, list(columns)], incomplete.y[rows][:, list(columns)]]))


def load_incomplete_faces(path: Path, summary: dict) -> FaceSet:
    """The faces of an incomplete portion (train_incomplete.npz, test_incomplete.npz), checked as load_faces
    checks the complete ones: y holds NaN where a keypoint is unlabelled, and each face has one at least."""
    pixels, keypoints = _read_checked(path, summary)
    if np.isnan(keypoints).all(axis=1).any():
        raise PipelineError(f"{path}: damaged: a face without a single labelled keypoint; {PREPARE}")
    return FaceSet(X=images_of(pixels), y=keypoints)


def _read_checked(path: Path, summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and keypoints of an array file whose bytes match the checksum that `summary` records."""
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
    return pixels, keypoints


def read_summary(path: Path) -> dict:
    """What `prepare` recorded: the source, the counts, the data hash and the arrays' checksums."""
    summary = read_json(path, PREPARE)
    if not isinstance(summary.get(CHECKSUMS), dict):
        raise PipelineError(f"{path}: records no checksums of the arrays beside it (an older `prepare` wrote it); "
                            f"{PREPARE}")
    return summary


def content_hash(*face_sets: StoredFaces) -> str:
    """A short digest of the prepared arrays, logged by later stages for lineage. prepare records two: the
    data hash, of the complete portions, and the incomplete hash, of the incomplete ones."""
    digest = hashlib.sha256()
    for faces in face_sets:
        digest.update(np.ascontiguousarray(faces.pixels))
        digest.update(np.ascontiguousarray(faces.keypoints))
    return digest.hexdigest()[:16]
