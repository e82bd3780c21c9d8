"""Pictures of faces and keypoints; matplotlib without a display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.files import atomic_write  # noqa: E402
from pipeline.kaggle import KEYPOINTS  # noqa: E402

DRAWN_FACE_ZOOM = 4  # a 96-pixel face is too small to see its points on a screen


def face_grid(path: Path, images: np.ndarray, keypoints: np.ndarray, title: str,
              predicted: np.ndarray | None = None, columns: int = 4) -> None:
    """Draw faces (n, 96, 96) with keypoints (n, 30) in pixels; predictions, if given, as crosses."""
    n = len(images)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows + 0.4), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= n:
            continue
        axis.imshow(images[index], cmap="gray", vmin=0, vmax=255)
        axis.scatter(keypoints[index, 0::2], keypoints[index, 1::2], s=9, c="lime", edgecolors="none")
        if predicted is not None:
            axis.scatter(predicted[index, 0::2], predicted[index, 1::2], s=14, c="red", marker="x", linewidths=1)
    figure.suptitle(title)
    _save(figure, path)


def learning_curves(path: Path, curves: dict[str, pd.DataFrame], baseline_rmse_px: float) -> None:
    """Each net's train (dashed) and valid (solid) RMSE px (columns epoch, train_rmse_px,
    valid_rmse_px) on a log scale.

    The mean-shape baseline is drawn too: a net that has not escaped that plateau has learnt no faces.
    """
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (net, curve), colour in zip(curves.items(), _colours()):
        axis.plot(curve["epoch"], curve["train_rmse_px"], "--", color=colour, label=f"{net} train")
        axis.plot(curve["epoch"], curve["valid_rmse_px"], "-", color=colour, label=f"{net} valid")
    axis.axhline(baseline_rmse_px, color="grey", linestyle=":", label="mean-shape baseline (test)")
    axis.set_yscale("log")
    # Plain numbers: on a log axis matplotlib would otherwise label 20 px as 2 x 10^1.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)
    _epochs_axis(axis)
    axis.set_ylabel("RMSE (px)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    axis.set_title("Learning curves")
    _save(figure, path)


def schedules(path: Path, histories: dict[str, pd.DataFrame]) -> None:
    """The learning rate and momentum each net trained with, epoch by epoch."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for column, axis in zip(("learning_rate", "momentum"), axes):
        for (net, history), colour, style in zip(histories.items(), _colours(), ("-", "--", ":", "-.")):
            axis.plot(history["epoch"], history[column], style, color=colour, label=net)
        _epochs_axis(axis)
        axis.set_title(column.replace("_", " "))
        axis.grid(True, alpha=0.3)
        axis.legend()
    _save(figure, path)


def keypoint_errors(path: Path, per_keypoint_rmse_px: dict[str, dict[str, float]]) -> None:
    """Horizontal bars of the test RMSE per keypoint, one bar per net (or baseline) in each group."""
    labels = list(per_keypoint_rmse_px)
    height = 0.8 / len(labels)
    positions = np.arange(len(KEYPOINTS))
    figure, axis = plt.subplots(figsize=(7, 0.13 * len(KEYPOINTS) * len(labels) + 1.5))
    for index, (label, colour) in enumerate(zip(labels, _colours())):
        values = [per_keypoint_rmse_px[label][name] for name in KEYPOINTS]
        axis.barh(positions + index * height, values, height, color=colour, label=label)
    axis.set_yticks(positions + height * (len(labels) - 1) / 2, KEYPOINTS)
    axis.invert_yaxis()
    axis.set_xlabel("test RMSE (px)")
    axis.grid(True, axis="x", alpha=0.3)
    axis.legend()
    axis.set_title("Test error per keypoint")
    _save(figure, path)


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray) -> Image.Image:
    """A 96x96 uint8 face, enlarged, with its keypoints (30 pixels, x then y) as red dots."""
    zoom = DRAWN_FACE_ZOOM
    picture = Image.fromarray(image).convert("RGB").resize((image.shape[1] * zoom, image.shape[0] * zoom))
    pen = ImageDraw.Draw(picture)
    # +0.5: a keypoint at x lies on the centre of pixel x, as imshow draws it in face_grid.
    for x, y in (keypoints.reshape(-1, 2) + 0.5) * zoom:
        pen.ellipse((x - zoom, y - zoom, x + zoom, y + zoom), fill=(255, 0, 0))
    return picture


def _epochs_axis(axis) -> None:
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colours() -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    try:
        with atomic_write(path) as temporary:
            figure.savefig(temporary, dpi=80, format="png")
    finally:
        plt.close(figure)
