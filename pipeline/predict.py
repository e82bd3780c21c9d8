"""The prediction command: keypoints for face images or a Kaggle test.csv, and a Kaggle submission.

    python -m pipeline.predict [--net NET] [--output CSV] [--draw DIR] IMAGE [IMAGE ...]
    python -m pipeline.predict [--net NET] [--output CSV] [--draw DIR] test.csv
                               [--lookup IdLookupTable.csv [--submission CSV]]

Run from the project root: the model is <paths.models>/<net>.pt, as params.yaml says. It runs on
the CPU, which predicts even Kaggle's 1783 test faces in seconds. Images of any size are
converted to grayscale and resized to 96x96, the faces the net was trained on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import load_config
from pipeline.data import unscale_keypoints
from pipeline.errors import PipelineError, reports_errors
from pipeline.files import write_text
from pipeline.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, parse_images
from pipeline.metrics import predict
from pipeline.plots import draw_keypoints
from pipeline.weights import load_model

TEST_COLUMNS = ("ImageId", "Image")
# Kaggle's lookup table also has an empty Location column, which the submission fills.
LOOKUP_COLUMNS = ("RowId", "ImageId", "FeatureName")


@dataclass(frozen=True)
class NamedFaces:
    """Faces to predict: names (an ImageId of test.csv or an image's path) and uint8 (n, 96, 96) pixels."""

    names: list[str]
    images: np.ndarray


def read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise PipelineError(f"{path}: not a readable image ({error})") from None
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV as text, with the `required` columns; lines are numbered as in the file (header = 1)."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as error:
        raise PipelineError(f"{path}: {' '.join(str(error).split())}") from None
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise PipelineError(f"{path}: line 1: column {missing[0]!r} is missing (expected {', '.join(required)})")
    if table.empty:
        raise PipelineError(f"{path}: the file has a header but no rows")
    return table


def integer_column(path: Path, table: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(values) | (values != np.round(values))
    if bad.any():
        row = int(np.argmax(bad))
        raise PipelineError(f"{path}: line {row + 2}: {column} is {table[column].iloc[row]!r}, not an integer")
    return values.astype(np.int64)


def read_test_csv(path: Path) -> NamedFaces:
    """Kaggle's test.csv layout: ImageId and a 96x96 Image of space-separated pixels per row."""
    table = read_table(path, TEST_COLUMNS)
    image_ids = integer_column(path, table, "ImageId")
    repeated = pd.Series(image_ids).duplicated().to_numpy()
    if repeated.any():
        row = int(np.argmax(repeated))
        raise PipelineError(f"{path}: line {row + 2}: ImageId {image_ids[row]} appears twice")
    return NamedFaces([str(image_id) for image_id in image_ids], parse_images(path, table["Image"]))


def read_images(paths: list[Path]) -> NamedFaces:
    return NamedFaces([str(path) for path in paths], np.stack([read_image(path) for path in paths]))


def predict_pixels(model, faces: NamedFaces) -> np.ndarray:
    """Keypoints (n, 30) in pixels, the images scaled to [0, 1] as the net was trained on them."""
    return unscale_keypoints(predict(model, faces.images[:, None] / np.float32(255)))


def predictions_table(faces: NamedFaces, keypoints: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(keypoints, columns=KEYPOINT_COLUMNS)
    table.insert(0, "ImageId", faces.names)
    return table


def submission_table(lookup_path: Path, lookup: pd.DataFrame, test_path: Path, faces: NamedFaces,
                     keypoints: np.ndarray) -> pd.DataFrame:
    """The Location of each RowId of the lookup table, in pixels clipped to the image."""
    image_ids = integer_column(lookup_path, lookup, "ImageId")
    rows = pd.Index([int(name) for name in faces.names]).get_indexer(image_ids)
    if (rows < 0).any():
        line = int(np.argmax(rows < 0))
        raise PipelineError(
            f"{lookup_path}: line {line + 2}: ImageId {image_ids[line]} is not in {test_path}"
        )
    columns = pd.Index(KEYPOINT_COLUMNS).get_indexer(lookup["FeatureName"].str.strip())
    if (columns < 0).any():
        line = int(np.argmax(columns < 0))
        raise PipelineError(
            f"{lookup_path}: line {line + 2}: unknown FeatureName {lookup['FeatureName'].iloc[line]!r}"
        )
    return pd.DataFrame({
        "RowId": integer_column(lookup_path, lookup, "RowId"),
        "Location": np.clip(keypoints[rows, columns], 0, IMAGE_SIZE),
    })


def picture_names(folder: Path, faces: NamedFaces) -> list[Path]:
    """<folder>/<name>.png per face, after the image's file name or its ImageId, checked to be distinct."""
    stems = [Path(name).stem for name in faces.names]
    repeated = pd.Series(stems).duplicated().to_numpy()
    if repeated.any():
        name = faces.names[int(np.argmax(repeated))]
        raise PipelineError(f"{name}: another input has the same file name, so --draw would overwrite its picture")
    return [folder / f"{stem}.png" for stem in stems]


def draw_all(paths: list[Path], faces: NamedFaces, keypoints: np.ndarray) -> None:
    for path, image, points in zip(paths, faces.images, keypoints):
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_keypoints(image, points).save(path)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Predict the 15 facial keypoints of face images or of a Kaggle test.csv.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="face images (PNG, JPG), or one test.csv with columns ImageId,Image")
    parser.add_argument("--net", default="net5", help="the trained net to use (default: net5)")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"),
                        help="the keypoints in pixels, one row per image (default: predictions.csv)")
    parser.add_argument("--draw", type=Path, metavar="DIR", help="also write each face with its keypoints here")
    parser.add_argument("--lookup", type=Path, metavar="CSV",
                        help="Kaggle's IdLookupTable.csv: write a submission for test.csv")
    parser.add_argument("--submission", type=Path, default=Path("submission.csv"),
                        help="where --lookup writes RowId,Location (default: submission.csv)")
    return parser.parse_args(argv)


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    is_test_csv = [path.suffix.lower() == ".csv" for path in args.inputs]
    if any(is_test_csv) and len(args.inputs) > 1:
        raise PipelineError("give either one test.csv or face images, not both or several CSV files")
    if args.lookup and not any(is_test_csv):
        raise PipelineError("--lookup needs the test.csv its ImageIds refer to")
    config = load_config()
    config.net(args.net)
    model = load_model(config.paths.model(args.net), "cpu")
    faces = read_test_csv(args.inputs[0]) if any(is_test_csv) else read_images(args.inputs)
    pictures = picture_names(args.draw, faces) if args.draw else []
    keypoints = predict_pixels(model, faces)
    # Every input is checked before anything is written, so a bad row leaves no partial output.
    submission = (submission_table(args.lookup, read_table(args.lookup, LOOKUP_COLUMNS), args.inputs[0], faces,
                                   keypoints) if args.lookup else None)
    write_text(args.output, predictions_table(faces, keypoints).to_csv(index=False, float_format="%.4f"))
    print(f"predict: {args.net} on {len(faces.names)} faces -> {args.output}")
    if submission is not None:
        write_text(args.submission, submission.to_csv(index=False, float_format="%.4f"))
        print(f"predict: {len(submission)} rows of {args.lookup} -> {args.submission}")
    if pictures:
        draw_all(pictures, faces, keypoints)
        print(f"predict: {len(pictures)} pictures of the keypoints -> {args.draw}")


if __name__ == "__main__":
    main()
