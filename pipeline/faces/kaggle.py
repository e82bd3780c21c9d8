"""The Kaggle Facial Keypoints CSV layout: column names, flip pairs, reading and writing.

The reader validates as it reads, so a bad file is rejected with one line naming the file,
the row and the problem instead of failing somewhere deep in training. Every CSV the pipeline reads
goes through check_csv_text first: a compressed file, an archive, a binary file or text that is
not UTF-8 is refused by name, with the line of the first bad byte, instead of a decoding traceback.
A UTF-8 byte-order mark (Excel writes one) is accepted.
"""

from __future__ import annotations

import codecs
import itertools
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from pipeline.base.errors import PipelineError, os_failure
from pipeline.base.files import atomic_write

IMAGE_SIZE = 96
N_PIXELS = IMAGE_SIZE * IMAGE_SIZE

KEYPOINTS = (
    "left_eye_center",
    "right_eye_center",
    "left_eye_inner_corner",
    "left_eye_outer_corner",
    "right_eye_inner_corner",
    "right_eye_outer_corner",
    "left_eyebrow_inner_end",
    "left_eyebrow_outer_end",
    "right_eyebrow_inner_end",
    "right_eyebrow_outer_end",
    "nose_tip",
    "mouth_left_corner",
    "mouth_right_corner",
    "mouth_center_top_lip",
    "mouth_center_bottom_lip",
)
KEYPOINT_COLUMNS = tuple(f"{name}_{axis}" for name in KEYPOINTS for axis in ("x", "y"))
COLUMNS = KEYPOINT_COLUMNS + ("Image",)

# "left" is the subject's left, on the image's right: a horizontal flip swaps each pair.
FLIP_PAIRS = (
    (0, 2), (1, 3), (4, 8), (5, 9), (6, 10), (7, 11),
    (12, 16), (13, 17), (14, 18), (15, 19), (22, 24), (23, 25),
)

# Column means of the published training.csv, in pixels, in KEYPOINT_COLUMNS order.
KAGGLE_MEANS = np.array([
    66.4, 37.7, 30.3, 38.0, 59.2, 37.9, 73.3, 37.7, 36.7, 38.0, 22.4, 38.0,
    56.1, 29.3, 79.5, 29.7, 39.3, 29.5, 15.9, 30.4, 48.4, 62.7,
    63.3, 76.0, 32.9, 76.2, 48.0, 72.9, 48.6, 79.0,
])


# What a file given as a CSV is, by its first bytes, and how to get the CSV text out of it.
NOT_CSV_SIGNATURES = (
    ((b"\x1f\x8b",), "is gzip-compressed, not a CSV text file (decompress it first: gunzip)"),
    ((b"PK\x03\x04", b"PK\x05\x06"),
     "is a zip archive (an Excel .xlsx workbook is one too), not a CSV text file (extract it first: unzip)"),
    (tuple(b"BZh%d" % level for level in range(1, 10)),
     "is bzip2-compressed, not a CSV text file (decompress it first: bunzip2)"),
    ((b"\xfd7zXZ\x00",), "is xz-compressed, not a CSV text file (decompress it first: unxz)"),
    ((b"\x28\xb5\x2f\xfd",), "is zstd-compressed, not a CSV text file (decompress it first: unzstd)"),
    ((b"\xff\xfe", b"\xfe\xff"), "is UTF-16 text, not UTF-8 (save it as UTF-8, Excel's \"CSV UTF-8\")"),
)
# 4 MiB: a 230 MB training.csv is checked in about 60 reads without being held in memory.
CHECK_CHUNK_BYTES = 1 << 22


# Kaggle's test.csv, and its lookup table (which also has an empty Location column, the submission's).
TEST_COLUMNS = ("ImageId", "Image")
LOOKUP_COLUMNS = ("RowId", "ImageId", "FeatureName")


class KaggleFormatError(PipelineError):
    pass


def line_error(path: Path, row: int, problem: str) -> KaggleFormatError:
    """A bad row of a CSV, named by its line in the file: the header is line 1, row 0 line 2."""
    return KaggleFormatError(f"{path}: line {row + 2}: {problem}")


def check_rows(path: Path, bad: np.ndarray, problem: Callable[[int], str]) -> None:
    """Stop at the first row that `bad` marks, saying what is wrong with it."""
    if bad.any():
        row = int(np.argmax(bad))
        raise line_error(path, row, problem(row))


def check_csv_text(path: Path) -> None:
    """Refuse, with one line naming the file, a file that is not UTF-8 text: a compressed file or an
    archive (by its first bytes), a binary file (a NUL byte) or text in another encoding (with the
    line and column of its first byte that is not UTF-8)."""
    try:
        with open(path, "rb") as file:
            head = file.read(CHECK_CHUNK_BYTES)
            for signatures, what in NOT_CSV_SIGNATURES:
                if head.startswith(signatures):
                    raise KaggleFormatError(f"{path}: {what}")
            _check_utf8(path, itertools.chain([head], iter(lambda: file.read(CHECK_CHUNK_BYTES), b"")))
    except OSError as error:
        raise os_failure(error, "reading") from None


def _check_utf8(path: Path, chunks: Iterable[bytes]) -> None:
    # An incremental decoder keeps a character split between two chunks for the next one, so the
    # file is never read whole; line and column (1-based) are where the next character starts.
    # "utf-8-sig" skips a byte-order mark, which an editor does not count as a column either.
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line, column = 1, 1
    for chunk in chunks:
        if b"\x00" in chunk:
            nul_line = line + chunk.count(b"\n", 0, chunk.index(b"\x00"))
            raise KaggleFormatError(f"{path}: is a binary file (a NUL byte in line {nul_line}), not a CSV")
        line, column = _advance(line, column, _decode(path, decoder, chunk, line, column))
    # A character cut short by the end of the file is an error too.
    _decode(path, decoder, b"", line, column, final=True)


def _decode(path: Path, decoder: codecs.IncrementalDecoder, chunk: bytes, line: int, column: int,
            final: bool = False) -> str:
    try:
        return decoder.decode(chunk, final=final)
    except UnicodeDecodeError as error:
        # error.object is the chunk after any bytes kept from the one before; the text up to the
        # bad byte is valid UTF-8.
        line, column = _advance(line, column, error.object[:error.start].decode("utf-8"))
        raise KaggleFormatError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {column})"
        ) from None


def _advance(line: int, column: int, text: str) -> tuple[int, int]:
    """The line and column after `text`, read from `line` and `column`."""
    last_newline = text.rfind("\n")
    if last_newline < 0:
        return line, column + len(text)
    return line + text.count("\n"), len(text) - last_newline


def read_csv_text(path: Path, **options) -> pd.DataFrame:
    """pandas.read_csv of a file checked as UTF-8 text (a byte-order mark allowed), with an empty or
    malformed file as one line."""
    check_csv_text(path)
    try:
        return pd.read_csv(path, encoding="utf-8-sig", **options)
    except pd.errors.EmptyDataError:
        raise KaggleFormatError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as error:
        raise KaggleFormatError(f"{path}: {parser_problem(error)}") from None


def read_table(path: Path, required: tuple[str, ...], **options) -> pd.DataFrame:
    """A CSV with the `required` columns and at least one row (read_csv_text's options)."""
    if not path.is_file():
        raise KaggleFormatError(f"{path}: no such file")
    table = read_csv_text(path, **options)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise KaggleFormatError(f"{path}: line 1: column {missing[0]!r} is missing (expected {', '.join(required)})")
    if table.empty:
        raise KaggleFormatError(f"{path}: the file has a header but no rows")
    return table


def integer_column(path: Path, table: pd.DataFrame, column: str) -> np.ndarray:
    """A column of a table read as text (dtype=str), every row an integer."""
    values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(dtype=float)
    check_rows(path, np.isnan(values) | (values != np.round(values)),
               lambda row: f"{column} is {table[column].iloc[row]!r}, not an integer")
    return values.astype(np.int64)


def read_test_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Kaggle's test.csv: each row's ImageId (distinct integers) and its 96x96 Image of space-separated
    pixels, as (ImageIds, uint8 images (n, 96, 96))."""
    table = read_table(path, TEST_COLUMNS, dtype=str, keep_default_na=False)
    image_ids = integer_column(path, table, "ImageId")
    check_rows(path, pd.Series(image_ids).duplicated().to_numpy(), lambda row: f"ImageId {image_ids[row]} appears twice")
    return image_ids, parse_images(path, table["Image"])


def read_training_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a file in the Kaggle training.csv layout, validating every row.

    Returns images as uint8 (n, 96, 96) and keypoints as float64 (n, 30) pixels, NaN where a
    keypoint is not labelled. Rows are numbered as in the file: the header is line 1.
    """
    path = Path(path)
    table = _read_table(path)
    keypoints = _parse_keypoints(path, table)
    images = parse_images(path, table["Image"])
    return images, keypoints


def write_training_csv(path: Path, images: np.ndarray, keypoints: np.ndarray) -> None:
    """Write images (n, 96, 96) uint8 and keypoints (n, 30) pixels (NaN = missing) as Kaggle does."""
    frame = pd.DataFrame(keypoints, columns=KEYPOINT_COLUMNS)
    frame["Image"] = [" ".join(map(str, image.ravel().tolist())) for image in images]
    with atomic_write(path) as temporary:
        frame.to_csv(temporary, index=False, float_format="%.6f")


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise KaggleFormatError(f"{path}: no such file")
    check_csv_text(path)
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns.tolist()
    except pd.errors.EmptyDataError:
        raise KaggleFormatError(f"{path}: the file is empty") from None
    for position, expected in enumerate(COLUMNS):
        if position >= len(header):
            raise KaggleFormatError(f"{path}: line 1: column {expected!r} is missing")
        if header[position] != expected:
            found = header[position]
            problem = "misordered" if found in COLUMNS else "unexpected"
            raise KaggleFormatError(
                f"{path}: line 1: {problem} column {found!r} at position {position + 1}, expected {expected!r}"
            )
    if len(header) > len(COLUMNS):
        raise KaggleFormatError(f"{path}: line 1: unexpected extra column {header[len(COLUMNS)]!r}")
    try:
        # Everything as text: a value that is not a number is reported, not silently turned into NaN.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, engine="c", encoding="utf-8-sig")
    except pd.errors.ParserError as error:
        raise KaggleFormatError(f"{path}: {parser_problem(error)}") from None
    if table.empty:
        raise KaggleFormatError(f"{path}: the file has a header but no rows")
    return table


def parser_problem(error: Exception) -> str:
    # pandas says "Expected 31 fields in line 5, saw 32"; keep it to one line.
    return " ".join(str(error).replace("Error tokenizing data. C error: ", "").split())


def _parse_keypoints(path: Path, table: pd.DataFrame) -> np.ndarray:
    keypoints = np.empty((len(table), len(KEYPOINT_COLUMNS)))
    for index, column in enumerate(KEYPOINT_COLUMNS):
        text = table[column].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
        check_rows(path, np.isnan(values) & (text != "").to_numpy(),
                   lambda row: f"{column} is {table[column].iloc[row]!r}, not a number")
        check_rows(path, ~np.isnan(values) & ~((values >= 0) & (values <= IMAGE_SIZE)),
                   lambda row: f"{column} is {values[row]:g}, outside 0..{IMAGE_SIZE}")
        keypoints[:, index] = values
    return keypoints


def parse_images(path: Path, column: pd.Series) -> np.ndarray:
    pixels = np.empty((len(column), N_PIXELS), dtype=np.float32)
    for row, text in enumerate(column):
        try:
            values = np.fromstring(text, dtype=np.float32, sep=" ")
        except ValueError:
            raise line_error(path, row, f"Image is not {N_PIXELS} space-separated integers") from None
        if values.size == 0:
            raise line_error(path, row, f"Image is empty (or the row has fewer than {len(COLUMNS)} fields)")
        if values.size != N_PIXELS:
            raise line_error(path, row, f"Image has {values.size} values, expected {N_PIXELS}")
        pixels[row] = values
    # One vectorised check over all rows is far cheaper than one per row.
    bad = (pixels < 0) | (pixels > 255) | (pixels != np.floor(pixels))
    check_rows(path, bad.any(axis=1),
               lambda row: f"Image value {pixels[row][bad[row]][0]:g} is not an integer in 0..255")
    return pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
