"""The prediction command: keypoints for face images or a Kaggle test.csv, and a Kaggle submission.

    python -m pipeline.predict [--net NET] [--output CSV] [--draw DIR] IMAGE [IMAGE ...]
    python -m pipeline.predict [--net NET] [--output CSV] [--draw DIR] test.csv
                               [--lookup IdLookupTable.csv [--submission CSV]]
    python -m pipeline.predict --net models:/facial-keypoints@champion IMAGE [IMAGE ...]

Run from the project root: the model is <paths.models>/<net>.pt, as params.yaml says, or the
MLflow model a models:/ URI names in the project's tracking store. It runs on
the CPU, which predicts even Kaggle's 1783 test faces in seconds. It reads and predicts
--batch-size faces at a time: its memory is that of a batch, whatever the number of faces.

What a good input is, and the pixels the keypoints are given in (each image's own, the aspect
ratio kept by padding): GOOD_INPUT below, the epilog of --help.

Images of every mode Pillow opens keep their real range in the conversion to gray (the first frame of
a file with several):
  - 8-bit grayscale ("L") and black and white ("1") are read as they are;
  - colour (RGB, palette, CMYK, YCbCr, HSV; LAB through littlecms to sRGB) becomes RGB, then
    Pillow's "L", the ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B;
  - an image with transparency (an alpha channel, or a transparent colour) is first laid over a
    white background, so a transparent face is seen on white, not on whatever the hidden pixels hold;
  - 16-bit grayscale (I;16, I;16B, I;16L) scales 0..65535 to 0..255: divided by 257 and rounded;
  - 32-bit integers ("I") must be 0 or more: up to 255 they are read as 8-bit levels, up to 65535
    as 16-bit ones, and larger ones are refused;
  - 32-bit floats ("F") must be finite: within 0..1 they are multiplied by 255, within 0..255
    read as they are (rounded), and any other range is refused, naming the range found.
A file that is not an image, or one refused above, stops the command with one line naming it.
No output (--output, --submission, a picture of --draw) may be an input or another output: that
is refused in one line before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageCms, ImageOps

from pipeline.base.composite import composite_checksum, load_composite
from pipeline.base.config import Config, load_config
from pipeline.base.errors import PipelineError
from pipeline.base.files import atomic_write, read_json, write_text
from pipeline.base.reporting import reports_errors
from pipeline.base.text import counted
from pipeline.base.weights import load_model
from pipeline.evaluation.metrics import PREDICTION_BATCH, predict
from pipeline.evaluation.plots import draw_keypoints
from pipeline.faces import kaggle
from pipeline.faces.data import images_of, pixels_of, unscale_keypoints
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS, LOOKUP_COLUMNS, check_rows, integer_column, read_table
from pipeline.tracking import registry
from pipeline.tracking.registry import is_model_uri
from pipeline.tracking.store import TrackingError, connect, store_exists, tracking_uri
from pipeline.tracking.trained_by import WEIGHTS_TAG, run_of_weights

# A test.csv compressed as such (test.csv.gz) is still meant as a CSV: its check says how to decompress it.
COMPRESSED_SUFFIXES = (".gz", ".zip", ".bz2", ".xz", ".zst")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Pillow converts LAB to no other mode; littlecms turns it into sRGB.
LAB_TO_SRGB = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
GOOD_INPUT = ("A good input is a face cropped as Kaggle's are: the face filling the picture from the eyebrows to the "
              "chin, upright, seen from the front. Each image is turned as its EXIF orientation says, made gray, "
              "padded to a square with its edge pixels (the aspect ratio kept) and scaled to 96x96; the keypoints "
              "come back in the pixels of the image as viewers show it, (0, 0) the centre of its top-left pixel.")


@dataclass(frozen=True)
class NamedFaces:
    """Faces to predict: names (an ImageId of test.csv or an image's path) and uint8 (n, 96, 96) pixels."""

    names: list[str]
    images: np.ndarray


@dataclass(frozen=True)
class Frame:
    """Where the net's 96x96 face lies in an image: the image padded to a square of `side` pixels,
    with its own pixels from column `left` and row `top`, then scaled to 96."""

    side: int
    left: int = 0
    top: int = 0

    def to_image(self, keypoints: np.ndarray) -> np.ndarray:
        """Keypoints (30 pixels of the 96x96 face, x then y) in the image's pixels. A pixel's centre is
        its coordinate in both, as Pillow scales images: pixel i of 96 spans side/96 of the square's."""
        points = (keypoints.reshape(-1, 2) + 0.5) * (self.side / IMAGE_SIZE) - 0.5 - (self.left, self.top)
        return points.reshape(keypoints.shape)


# test.csv's faces are the net's own 96x96 pixels.
FACE_FRAME = Frame(IMAGE_SIZE)


def open_gray(path: Path) -> Image.Image:
    """An image file as 8-bit grayscale at its own size, turned as viewers show it (EXIF orientation);
    main() has checked the path (check_input)."""
    try:
        # Pillow warns of an image larger than it trusts with a warning of its own and its source line,
        # and refuses one twice that large: the first is said in one line here, the second refused in one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                warn_if_huge(path, image)
                return grayscale(path, ImageOps.exif_transpose(image))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise PipelineError(f"{path}: not a readable image ({error})") from None


def face_of(gray: Image.Image) -> tuple[np.ndarray, Frame]:
    """The net's uint8 (96, 96) face of a gray image, padded to a square with its edge pixels, and where
    that face lies in the image."""
    width, height = gray.size
    frame = Frame(max(width, height), (max(width, height) - width) // 2, (max(width, height) - height) // 2)
    if width != height:
        pixels = np.asarray(gray)
        gray = Image.fromarray(np.pad(pixels, ((frame.top, frame.side - height - frame.top),
                                               (frame.left, frame.side - width - frame.left)), mode="edge"))
    if frame.side != IMAGE_SIZE:
        gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8), frame


def read_face(path: Path) -> tuple[np.ndarray, Frame]:
    """An image file's face as uint8 (96, 96), and where it lies in the image."""
    return face_of(open_gray(path))


def check_input(path: Path, expected: str, named_in_output: bool = False) -> None:
    """An input that is not a file, or an image whose name the output cannot hold, refused in one line
    before any work.

    A file name that is not UTF-8 (bytes of another encoding) is refused rather than written
    escaped: its ImageId in the UTF-8 output would then name no file, and a table joined on it
    would silently miss the face.
    """
    if path.is_dir():
        raise PipelineError(f"{path}: is a directory, expected {expected}")
    if not path.is_file():
        raise PipelineError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # the name's bytes, undecodable ones as \xNN
    if named_in_output and shown != str(path):
        raise PipelineError(f"{shown}: the file name is not UTF-8, which the ImageId column of the output cannot "
                            "hold; rename the file")


def warn_if_huge(path: Path, image: Image.Image) -> None:
    """One line for an image larger than Pillow trusts (Image.MAX_IMAGE_PIXELS), but not twice that,
    which it refuses: it is read, at the cost of its memory."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit and pixels > limit:
        print(f"warning: {path}: {image.width}x{image.height} pixels, more than the {limit} Pillow trusts "
              f"(it refuses more than {2 * limit}); read all the same", file=sys.stderr)


def grayscale(path: Path, image: Image.Image) -> Image.Image:
    """The image in 8-bit grayscale ("L") with its real range, by the rules of the module's docstring."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(deep_levels(path, image))
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(white, image.convert("RGBA")).convert("L")
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode == "LAB":
        return ImageCms.applyTransform(image, LAB_TO_SRGB).convert("L")
    return image.convert("RGB").convert("L")


def deep_levels(path: Path, image: Image.Image) -> np.ndarray:
    """The uint8 levels of an image of more than 8 bits a pixel: 16-bit, 32-bit integer or float."""
    pixels = np.asarray(image)
    if image.mode == "F":
        levels = float_levels(path, pixels)
    elif image.mode == "I":
        levels = integer_levels(path, pixels)
    else:
        levels = sixteen_bit_levels(pixels)
    # Pillow's conversions ignore a transparent colour of these modes (a 16-bit PNG's tRNS): it
    # becomes white here, as in the other modes.
    if "transparency" in image.info:
        levels[pixels == image.info["transparency"]] = 255
    return levels


def sixteen_bit_levels(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels / 257).astype(np.uint8)


def integer_levels(path: Path, pixels: np.ndarray) -> np.ndarray:
    lowest, highest = int(pixels.min()), int(pixels.max())
    if lowest < 0:
        raise PipelineError(
            f"{path}: a 32-bit integer image with negative values (down to {lowest}), not levels of gray"
        )
    if highest <= 255:
        return pixels.astype(np.uint8)
    if highest <= 65535:
        return sixteen_bit_levels(pixels)
    raise PipelineError(
        f"{path}: a 32-bit integer image with values up to {highest}, more than 16 bits of gray"
    )


def float_levels(path: Path, pixels: np.ndarray) -> np.ndarray:
    if not np.isfinite(pixels).all():
        raise PipelineError(f"{path}: a floating-point image with NaN or infinite values")
    lowest, highest = float(pixels.min()), float(pixels.max())
    if lowest >= 0 and highest <= 1:
        return pixels_of(pixels.astype(np.float64))
    if lowest >= 0 and highest <= 255:
        return np.rint(pixels).astype(np.uint8)
    raise PipelineError(
        f"{path}: a floating-point image with values in {lowest:g}..{highest:g}, neither 0..1 nor 0..255"
    )


def image_batches(paths: list[Path], batch_size: int) -> Iterator[tuple[NamedFaces, list[Frame]]]:
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        faces, frames = zip(*(read_face(path) for path in batch))
        yield NamedFaces([str(path) for path in batch], np.stack(faces)), list(frames)


def test_csv_batches(path: Path, batch_size: int) -> Iterator[tuple[NamedFaces, list[Frame]]]:
    for image_ids, images in kaggle.read_test_csv(path, batch_size):
        yield NamedFaces(image_ids, images), [FACE_FRAME] * len(image_ids)


def predict_pixels(model, faces: NamedFaces) -> np.ndarray:
    """Keypoints (n, 30) in pixels, the images scaled to [0, 1] as the net was trained on them."""
    return unscale_keypoints(predict(model, images_of(faces.images[:, None])))


def predict_all(keypoints_of: Callable[[NamedFaces], np.ndarray], description: Callable[[], str],
                batches: Iterator[tuple[NamedFaces, list[Frame]]]) -> tuple[list[str], np.ndarray]:
    """Every face's name and keypoints in its image's pixels, a batch at a time; which training the net
    comes from is said once the first batch is read."""
    names, keypoints = [], []
    for faces, frames in batches:
        if not names:
            print(f"predict: {description()}", flush=True)
        names += faces.names
        keypoints += [frame.to_image(points) for frame, points in zip(frames, keypoints_of(faces))]
    return names, np.array(keypoints)


def predictions_table(names: list[str], keypoints: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(keypoints, columns=KEYPOINT_COLUMNS)
    table.insert(0, "ImageId", names)
    return table


def submission_table(lookup_path: Path, lookup: pd.DataFrame, test_path: Path, image_ids: list[str],
                     keypoints: np.ndarray) -> pd.DataFrame:
    """The Location of each RowId of the lookup table, in pixels clipped to the image. The ids are
    matched as integers of any size, and RowId is written as the lookup table gives it."""
    wanted = integer_column(lookup_path, lookup, "ImageId")
    row_of = {int(image_id): row for row, image_id in enumerate(image_ids)}
    rows = np.array([row_of.get(int(image_id), -1) for image_id in wanted])
    check_rows(lookup_path, rows < 0, lambda row: f"ImageId {wanted[row]} is not in {test_path}")
    columns = pd.Index(KEYPOINT_COLUMNS).get_indexer(lookup["FeatureName"].str.strip())
    check_rows(lookup_path, columns < 0, lambda row: f"unknown FeatureName {lookup['FeatureName'].iloc[row]!r}")
    return pd.DataFrame({
        "RowId": integer_column(lookup_path, lookup, "RowId"),
        "Location": np.clip(keypoints[rows, columns], 0, IMAGE_SIZE),
    })


def picture_names(folder: Path, names: list[str]) -> list[Path]:
    """<folder>/<name>.png per face, after the image's file name or its ImageId, checked to be distinct."""
    stems = [Path(name).stem for name in names]
    repeated = pd.Series(stems).duplicated().to_numpy()
    if repeated.any():
        name = names[int(np.argmax(repeated))]
        raise PipelineError(f"{name}: another input has the same file name, so --draw would overwrite its picture")
    return [folder / f"{stem}.png" for stem in stems]


def check_apart(outputs: list[tuple[str, Path]], inputs: list[Path]) -> None:
    """Refuse, in one line, an output that is an input (the same file, by any name or link) or
    another output: nothing the user gave is ever written over."""
    identities = {(status.st_dev, status.st_ino): path for path in inputs for status in [path.stat()]}
    seen: dict[Path, str] = {}
    for option, path in outputs:
        if path.exists():
            status = path.stat()
            replaced = identities.get((status.st_dev, status.st_ino))
            if replaced is not None:
                raise PipelineError(f"{option} {path}: is the input {replaced}, which predict never writes over: "
                                    "give another path")
        where = path.resolve()
        if where in seen:
            raise PipelineError(f"{option} {path}: is also where {seen[where]} goes: give each output its own path")
        seen[where] = f"{option} {path}"


def draw_all(paths: list[Path], images: Iterator[np.ndarray], keypoints: np.ndarray) -> None:
    for path, image, points in zip(paths, images, keypoints):
        with atomic_write(path) as temporary:
            draw_keypoints(image, points).save(temporary, format="PNG")


def originals(paths: list[Path]) -> Iterator[np.ndarray]:
    """The image files as predict read them, at their own size: gray, turned as viewers show them."""
    return (np.asarray(open_gray(path)) for path in paths)


def is_csv_name(path: Path) -> bool:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    return suffixes[-1:] == [".csv"] or (suffixes[-2:-1] == [".csv"] and suffixes[-1] in COMPRESSED_SUFFIXES)


def check_output(option: str, path: Path, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, before the work whose result it would hold."""
    if folder and path.is_file():
        raise PipelineError(f"{option} {path}: is a file, expected a directory")
    if not folder and path.is_dir():
        raise PipelineError(f"{option} {path}: is a directory, expected a file name")
    blocking = next((parent for parent in path.parents if parent.is_file()), None)
    if blocking is not None:
        raise PipelineError(f"{option} {path}: {blocking} is a file, not a directory")


def model_description(path: Path, net: str, model: torch.nn.Module) -> str:
    """Which training the net's weights come from: models/<net>.json and the MLflow run tagged with them.

    `dvc exp run`, `dvc exp apply` and `dvc checkout` replace models/ without a word, so the
    command says which net it uses. A missing or damaged file is said in the same line: the
    weights themselves were checked, and still predict.
    """
    remedy = f"restore it with `git restore {path}` or train the net again with `dvc repro`"
    try:
        info = read_json(path, remedy)
        epochs, data_hash = info["config"]["train"]["max_epochs"], info["data_hash"]
    except (KeyError, TypeError):
        return (f"{net}, of an unknown training: {path}: damaged: config.train.max_epochs or data_hash is "
                f"missing; {remedy}")
    except PipelineError as error:
        return f"{net}, of an unknown training: {error}"
    # The epoch whose weights the training kept, where models/<net>.json records one (older files do not).
    kept = f", weights of epoch {info['kept_epoch']}" if "kept_epoch" in info else ""
    return f"{net} ({epochs} epochs{kept}, data {data_hash}, {training_run(net, model)})"


def training_run(net: str, model: torch.nn.Module) -> str:
    """The MLflow run that trained these weights, or why it is not known; never an error, since the net
    predicts all the same. A store that does not exist yet is not created."""
    if not store_exists():
        return f"no MLflow store at {tracking_uri()}"
    try:
        connect()
        run = run_of_weights(net, model)
    except TrackingError as error:
        return f"MLflow run not known: {error}"
    return f"MLflow run {run.info.run_id}" if run else f"trained by no run of {tracking_uri()}"


def workspace_weights(config: Config) -> dict[str, set[str]]:
    """The checksums of each net's weights in models/, one per seed of train.seeds, as their .json
    files record them (nets without any left out: nothing to compare an alias with); and each composite's
    checksum of its nets' weights under each seed, which its versions are tagged with."""
    recorded: dict[str, set[str]] = {}
    for net in config.nets:
        for seed in config.train.seeds:
            with contextlib.suppress(PipelineError):
                weights = read_json(config.paths.model_info(net, config.files_seed(seed)), "").get(WEIGHTS_TAG)
                if weights:
                    recorded.setdefault(net, set()).add(weights)
    for name, members in config.composites.items():
        for seed in config.train.seeds:
            with contextlib.suppress(PipelineError, KeyError):
                weights = {member: read_json(config.paths.model_info(member, config.files_seed(seed)), "")[WEIGHTS_TAG]
                           for member in members}
                recorded.setdefault(name, set()).add(composite_checksum(config, name, weights))
    return recorded


def load_predictor(config: Config, net: str) -> tuple[Callable[[NamedFaces], np.ndarray], Callable[[], str]]:
    """The keypoints in pixels of faces by `net`, a net of params.yaml (models/<net>.pt) or an MLflow
    models:/ URI, and the line saying which training it comes from, looked up once the inputs are read.

    A models:/ URI loads the MLflow model once its files are checked (registry.load), which takes the
    same uint8 faces and gives the same pixels as the net of its weights does here; an alias whose
    weights are not the workspace's model of its net is said in one line.
    """
    if is_model_uri(net):
        loaded = registry.load(net)
        registry.warn_if_not_workspace(net, loaded, workspace_weights(config))
        return (lambda faces: loaded.model.predict(faces.images)[list(KEYPOINT_COLUMNS)].to_numpy(),
                lambda: f"{net} ({loaded.described()})")
    if net in config.composites:
        # Its nets' own files (the first seed's trainings), side by side: the model evaluate registered for it.
        members = config.composites[net]
        composite = load_composite(config, net)
        return (lambda faces: predict_pixels(composite, faces),
                lambda: f"{net}, of " + "; ".join(model_description(config.paths.model_info(member), member, model)
                                                  for member, model in zip(members, composite.members)))
    if net not in config.predictors and net in config.nets:
        users = ", ".join(name for name, members in config.composites.items() if net in members)
        raise PipelineError(f"--net {net}: predicts {len(config.nets[net].keypoints)} of the 15 keypoints "
                            f"(nets.{net}.keypoints): name a net of all 15 or a composite"
                            f"{f' of it ({users})' if users else ''} instead")
    config.net(net)
    weights = load_model(config.paths.model(net), "cpu")
    return (lambda faces: predict_pixels(weights, faces),
            lambda: model_description(config.paths.model_info(net), net, weights))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Predict the 15 facial keypoints of face images or of a Kaggle test.csv.",
        epilog=GOOD_INPUT,
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="face images (PNG, JPG, TIFF, ...), or one test.csv with columns ImageId,Image")
    parser.add_argument("--net", default="net5",
                        help="the trained net to use: a net of params.yaml, its weights in models/ (default: net5), "
                             "a composite of params.yaml (its nets' weights side by side), "
                             "or a model of the MLflow Model Registry, such as models:/facial-keypoints@champion")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"),
                        help="the keypoints in each image's pixels, one row per image (default: predictions.csv)")
    parser.add_argument("--draw", type=Path, metavar="DIR",
                        help="also write each image here, at its own size, with its keypoints")
    parser.add_argument("--lookup", type=Path, metavar="CSV",
                        help="Kaggle's IdLookupTable.csv: write a submission for test.csv")
    parser.add_argument("--submission", type=Path, default=Path("submission.csv"),
                        help="where --lookup writes RowId,Location (default: submission.csv)")
    parser.add_argument("--batch-size", type=positive, default=PREDICTION_BATCH, metavar="N",
                        help=f"faces read and predicted at once: the command's memory (default: {PREDICTION_BATCH})")
    return parser.parse_args(argv)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


@reports_errors(memory_knobs="lower --batch-size")
def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    is_test_csv = [is_csv_name(path) for path in args.inputs]
    if any(is_test_csv) and len(args.inputs) > 1:
        raise PipelineError("give either one test.csv or face images, not both or several CSV files")
    if args.lookup and not any(is_test_csv):
        raise PipelineError("--lookup needs the test.csv its ImageIds refer to")
    check_output("--output", args.output)
    if args.lookup:
        check_output("--submission", args.submission)
    if args.draw:
        check_output("--draw", args.draw, folder=True)
    for path in args.inputs:
        check_input(path, "a test.csv" if any(is_test_csv) else "an image file", named_in_output=not any(is_test_csv))
    if args.lookup:
        check_input(args.lookup, "Kaggle's IdLookupTable.csv")
    inputs = [*args.inputs, *([args.lookup] if args.lookup else [])]
    outputs = [("--output", args.output), *([("--submission", args.submission)] if args.lookup else [])]
    check_apart(outputs, inputs)
    keypoints_of, description = load_predictor(load_config(), args.net)

    def batches() -> Iterator[tuple[NamedFaces, list[Frame]]]:
        if any(is_test_csv):
            return test_csv_batches(args.inputs[0], args.batch_size)
        return image_batches(args.inputs, args.batch_size)

    names, keypoints = predict_all(keypoints_of, description, batches())
    # Every input is checked before anything is written, so a bad row leaves no partial output.
    lookup = read_table(args.lookup, LOOKUP_COLUMNS, dtype=str, keep_default_na=False) if args.lookup else None
    submission = submission_table(args.lookup, lookup, args.inputs[0], names, keypoints) if args.lookup else None
    pictures = picture_names(args.draw, names) if args.draw else []
    check_apart([*outputs, *(("--draw", picture) for picture in pictures)], inputs)
    write_text(args.output, predictions_table(names, keypoints).to_csv(index=False, float_format="%.4f"))
    print(f"predict: {args.net} on {counted(len(names), 'face')} -> {args.output}")
    if submission is not None:
        write_text(args.submission, submission.to_csv(index=False, float_format="%.4f"))
        print(f"predict: {len(submission)} rows of {args.lookup} -> {args.submission}")
    if pictures:
        faces = (face for batch, _ in batches() for face in batch.images)
        draw_all(pictures, faces if any(is_test_csv) else originals(args.inputs), keypoints)
        print(f"predict: {counted(len(pictures), 'picture')} of the keypoints -> {args.draw}")


if __name__ == "__main__":
    main()
