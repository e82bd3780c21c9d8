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
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from pipeline.base.errors import PipelineError, os_failure
from pipeline.base.files import atomic_write
from pipeline.base.shapes import FLIP_PAIRS, KEYPOINT_COLUMNS, KEYPOINTS

IMAGE_SIZE = 96
N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
COLUMNS = KEYPOINT_COLUMNS + ("Image",)

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
# Rows parsed at once (about 36 MB of text): a CSV of any length is read in this much memory and its faces.
CHUNK_ROWS = 1000
# An integer as text: ids are kept as written, and compared as Python's integers, of any size.
INTEGER = re.compile(r"[+-]?[0-9]+")


# Kaggle's test.csv, and its lookup table (which also has an empty Location column, the submission's).
TEST_COLUMNS = ("ImageId", "Image")
LOOKUP_COLUMNS = ("RowId", "ImageId", "FeatureName")


class KaggleFormatError(PipelineError):
    pass


def line_error(path: Path, row: int, problem: str) -> KaggleFormatError:
    """A bad row of a CSV, named by its line in the file: the header is line 1, row 0 line 2."""
    return KaggleFormatError(f"{path}: line {row + 2}: {problem}")


def check_rows(path: Path, bad: np.ndarray, problem: Callable[[int], str], first_row: int = 0) -> None:
    """Stop at the first row that `bad` marks, saying what is wrong with it; `bad` covers the rows from
    `first_row` of the file on."""
    if bad.any():
        row = int(np.argmax(bad))
        raise line_error(path, first_row + row, problem(row))


def require_file(path: Path) -> None:
    """A CSV that is no regular file refused by what it is: it is read twice (checked, then parsed),
    which a named pipe or a device cannot be."""
    if path.is_file():
        return
    if path.exists():
        raise KaggleFormatError(f"{path}: not a regular file (a named pipe, a device or a directory), which cannot be "
                                "read twice as the CSV is (checked, then parsed): save it to a file first")
    raise KaggleFormatError(f"{path}: no such file")


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
    require_file(path)
    table = read_csv_text(path, **options)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise KaggleFormatError(f"{path}: line 1: column {missing[0]!r} is missing (expected {', '.join(required)})")
    if table.empty:
        raise KaggleFormatError(f"{path}: the file has a header but no rows")
    return table


def integer_column(path: Path, table: pd.DataFrame, column: str, first_row: int = 0) -> list[str]:
    """A column of a table read as text (dtype=str), every row an integer: the texts, stripped. Never
    through a float or an int64, which would change an id beyond 2^53 or 2^63."""
    texts = table[column].str.strip()
    check_rows(path, ~texts.str.fullmatch(INTEGER).to_numpy(),
               lambda row: f"{column} is {table[column].iloc[row]!r}, not an integer", first_row)
    return texts.tolist()


def read_test_csv(path: Path, rows: int = CHUNK_ROWS) -> Iterator[tuple[list[str], np.ndarray]]:
    """Kaggle's test.csv, `rows` rows at a time: each row's ImageId (distinct integers, as written) and
    its 96x96 Image of space-separated pixels, as (ImageIds, uint8 images (rows, 96, 96))."""
    require_file(path)
    check_csv_text(path)
    seen: set[int] = set()
    for first_row, table in _chunks(path, rows):
        missing = [column for column in TEST_COLUMNS if column not in table.columns]
        if missing:
            raise KaggleFormatError(f"{path}: line 1: column {missing[0]!r} is missing (expected "
                                    f"{', '.join(TEST_COLUMNS)})")
        image_ids = integer_column(path, table, "ImageId", first_row)
        values = [int(image_id) for image_id in image_ids]
        repeated = [value in seen or seen.add(value) for value in values]
        check_rows(path, np.array(repeated), lambda row: f"ImageId {image_ids[row]} appears twice", first_row)
        yield image_ids, parse_images(path, table["Image"], first_row)


def read_training_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a file in the Kaggle training.csv layout, validating every row.

    Returns images as uint8 (n, 96, 96) and keypoints as float64 (n, 30) pixels, NaN where a
    keypoint is not labelled. Rows are numbered as in the file: the header is line 1.
    """
    chunks = list(read_training_chunks(Path(path)))
    return np.concatenate([images for images, _ in chunks]), np.concatenate([keypoints for _, keypoints in chunks])


def read_training_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """read_training_csv `rows` rows at a time, validated as they come: a file of any length is read
    in the memory of its faces (uint8) and a chunk of its text."""
    _check_header(path)
    for first_row, table in _chunks(path, rows):
        yield parse_images(path, table["Image"], first_row), _parse_keypoints(path, table, first_row)


def write_training_csv(path: Path, images: np.ndarray, keypoints: np.ndarray) -> None:
    """Write images (n, 96, 96) uint8 and keypoints (n, 30) pixels (NaN = missing) as Kaggle does."""
    frame = pd.DataFrame(keypoints, columns=KEYPOINT_COLUMNS)
    frame["Image"] = [" ".join(map(str, image.ravel().tolist())) for image in images]
    with atomic_write(path) as temporary:
        frame.to_csv(temporary, index=False, float_format="%.6f")


def _check_header(path: Path) -> None:
    require_file(path)
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


def _chunks(path: Path, rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """A checked CSV text (check_csv_text) as tables of `rows` rows and the index of each one's first row.

    Everything as text: a value that is not a number is reported, not silently turned into NaN."""
    first_row = 0
    try:
        with pd.read_csv(path, dtype=str, keep_default_na=False, engine="c", encoding="utf-8-sig",
                         chunksize=rows) as reader:
            for table in reader:
                yield first_row, table
                first_row += len(table)
    except pd.errors.EmptyDataError:
        raise KaggleFormatError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as error:
        raise KaggleFormatError(f"{path}: {parser_problem(error)}") from None
    if not first_row:
        raise KaggleFormatError(f"{path}: the file has a header but no rows")


def parser_problem(error: Exception) -> str:
    # pandas says "Expected 31 fields in line 5, saw 32"; keep it to one line.
    return " ".join(str(error).replace("Error tokenizing data. C error: ", "").split())


def _parse_keypoints(path: Path, table: pd.DataFrame, first_row: int) -> np.ndarray:
    keypoints = np.empty((len(table), len(KEYPOINT_COLUMNS)))
    for index, column in enumerate(KEYPOINT_COLUMNS):
        text = table[column].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
        check_rows(path, np.isnan(values) & (text != "").to_numpy(),
                   lambda row: f"{column} is {table[column].iloc[row]!r}, not a number", first_row)
        check_rows(path, ~np.isnan(values) & ~((values >= 0) & (values <= IMAGE_SIZE)),
                   lambda row: f"{column} is {values[row]:g}, outside 0..{IMAGE_SIZE}", first_row)
        keypoints[:, index] = values
    return keypoints


def parse_images(path: Path, column: pd.Series, first_row: int = 0) -> np.ndarray:
    """The Image texts of rows from `first_row` on as uint8 (n, 96, 96)."""
    pixels = np.empty((len(column), N_PIXELS), dtype=np.float32)
    for row, text in enumerate(column):
        try:
            values = np.fromstring(text, dtype=np.float32, sep=" ")
        except ValueError:
            raise line_error(path, first_row + row, f"Image is not {N_PIXELS} space-separated integers") from None
        if values.size == 0:
            raise line_error(path, first_row + row,
                             f"Image is empty (or the row has fewer than {len(COLUMNS)} fields)")
        if values.size != N_PIXELS:
            raise line_error(path, first_row + row, f"Image has {values.size} values, expected {N_PIXELS}")
        pixels[row] = values
    # One vectorised check over all rows is far cheaper than one per row.
    bad = (pixels < 0) | (pixels > 255) | (pixels != np.floor(pixels))
    check_rows(path, bad.any(axis=1),
               lambda row: f"Image value {pixels[row][bad[row]][0]:g} is not an integer in 0..255", first_row)
    return pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
