"""Pictures of faces and keypoints; matplotlib without a display.

Figures are made without pyplot: pyplot keeps global state and picks a GUI backend where a
display is, and a Figure saved to a file needs neither.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator


def _writable_matplotlib_folder() -> None:
    """Give matplotlib a folder it can write (MPLCONFIGDIR), where its default ones cannot be written
    (HOME read-only or missing): it would otherwise warn in every process that draws, and build its
    font cache again each time. A folder the user chose is kept.

    Run on import, before matplotlib's, which reads the variable once: this module is the only one
    that imports matplotlib.
    """
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = Path(os.environ.get("HOME") or "/")
    defaults = [Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "matplotlib",
                Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "matplotlib"]
    if not all(_writable(folder) for folder in defaults):
        os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / f"matplotlib-{os.getuid()}")


def _writable(folder: Path) -> bool:
    """Matplotlib's own test of its folders: made if missing, then writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


_writable_matplotlib_folder()

import numpy as np  # noqa: E402 - after MPLCONFIGDIR is set
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.base.files import atomic_write
from pipeline.evaluation.colours import BASELINE_COLOUR, net_colour
from pipeline.faces.kaggle import KEYPOINTS

# A picture drawn smaller than this (a 96-pixel face) is enlarged by a whole factor: its points would
# be too small to see on a screen.
DRAWN_MIN_SIZE = 384
MAX_TICKS = 10  # labels on a log axis, beyond which they crowd
# The figures' heights leave room for two rows of legend above the axes (learning_curves: a column
# per net, its train and valid lines); each row more adds this much.
LEGEND_ROWS_ROOM = 2
LEGEND_ROW_INCHES = 0.25


def face_grid(path: Path, images: np.ndarray, keypoints: np.ndarray, title: str,
              predicted: np.ndarray | None = None, columns: int = 4) -> None:
    """Draw faces (n, 96, 96) with keypoints (n, 30) in pixels; predictions, if given, as crosses."""
    n = len(images)
    rows = -(-n // columns)
    figure = Figure(figsize=(2.2 * columns, 2.2 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
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
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for (net, curve), colour, width in zip(curves.items(), _colours(), _widths(len(curves))):
        axis.plot(curve["epoch"], curve["train_rmse_px"], "--", color=colour, linewidth=width, label=f"{net} train")
        axis.plot(curve["epoch"], curve["valid_rmse_px"], "-", color=colour, linewidth=width, label=f"{net} valid")
    # A log axis has no 0: a baseline of no error (every face's keypoints alike, the training
    # faces' mean) is said in the legend, and curves that reach 0 leave a linear axis.
    if baseline_rmse_px > 0:
        axis.axhline(baseline_rmse_px, color=BASELINE_COLOUR, linestyle=":", label="mean-shape baseline (test)")
    else:
        axis.plot([], [], color=BASELINE_COLOUR, linestyle=":", label="mean-shape baseline (test): 0 px, no error")
    drawn = np.concatenate([[baseline_rmse_px], *(curve[["train_rmse_px", "valid_rmse_px"]].to_numpy().ravel()
                                                  for curve in curves.values())])
    positive = drawn[drawn > 0]
    if len(positive) == len(drawn) - (baseline_rmse_px <= 0):
        _log_y_axis(axis, positive.min(), positive.max())
    _epochs_axis(axis)
    axis.set_ylabel("RMSE (px)")
    axis.grid(True, alpha=0.3)
    _legend_above(axis, "Learning curves", columns=len(curves) + 1)  # a column per net, one for the baseline
    _save(figure, path)


def schedules(path: Path, histories: dict[str, pd.DataFrame]) -> None:
    """The learning rate and momentum each net trained with, epoch by epoch."""
    figure = Figure(figsize=(9, 3.5))
    axes = figure.subplots(1, 2)
    for column, axis in zip(("learning_rate", "momentum"), axes):
        for (net, history), colour, style, width in zip(histories.items(), _colours(), ("-", "--", ":", "-."),
                                                        _widths(len(histories))):
            axis.plot(history["epoch"], history[column], style, color=colour, linewidth=width, label=net)
        _epochs_axis(axis)
        axis.set_title(column.replace("_", " "))
        axis.grid(True, alpha=0.3)
        axis.legend()
    _save(figure, path)


def keypoint_errors(path: Path, per_keypoint_rmse_px: dict[str, dict[str, float]]) -> None:
    """Horizontal bars of the test RMSE per keypoint, one bar per net and, last, the baseline in each group."""
    labels = list(per_keypoint_rmse_px)
    colours = [*itertools.islice(_colours(), len(labels) - 1), BASELINE_COLOUR]
    height = 0.8 / len(labels)
    positions = np.arange(len(KEYPOINTS))
    figure = Figure(figsize=(7, 0.13 * len(KEYPOINTS) * len(labels) + 1.5))
    axis = figure.subplots()
    for index, (label, colour) in enumerate(zip(labels, colours)):
        values = [per_keypoint_rmse_px[label][name] for name in KEYPOINTS]
        axis.barh(positions + index * height, values, height, color=colour, label=label)
    axis.set_yticks(positions + height * (len(labels) - 1) / 2, KEYPOINTS)
    axis.invert_yaxis()
    axis.set_xlabel("test RMSE (px)")
    axis.grid(True, axis="x", alpha=0.3)
    _legend_above(axis, "Test error per keypoint", columns=len(labels))
    _save(figure, path)


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray) -> Image.Image:
    """A uint8 gray image of any size, a small one enlarged, with its keypoints (30 pixels of it, x then
    y) as red dots of a size that shows at the picture's size: 4 pixels across a 384-pixel picture."""
    height, width = image.shape
    zoom = max(1, DRAWN_MIN_SIZE // max(height, width))
    picture = Image.fromarray(image).convert("RGB").resize((width * zoom, height * zoom))
    radius = max(height, width) * zoom * 4 / DRAWN_MIN_SIZE
    pen = ImageDraw.Draw(picture)
    # +0.5: a keypoint at x lies on the centre of pixel x, as imshow draws it in face_grid.
    for x, y in (keypoints.reshape(-1, 2) + 0.5) * zoom:
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 0, 0))
    return picture


def _epochs_axis(axis) -> None:
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_above(axis, title: str, columns: int) -> None:
    """The legend between the title and the axes (inside them it covers some curve or bar), in at most
    `columns` columns: fewer where the legend, laid out, would run off the picture, and the figure
    taller by the rows that adds."""
    figure = axis.figure
    renderer = FigureCanvasAgg(figure).get_renderer()
    height, entries = figure.get_figheight(), len(axis.get_legend_handles_labels()[1])
    for columns in range(columns, 0, -1):
        rows = -(-entries // columns)
        legend = axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=columns, frameon=False)
        axis.set_title(title, pad=12 + 18 * rows)  # points: room for the legend's rows
        figure.set_figheight(height + LEGEND_ROW_INCHES * max(0, rows - LEGEND_ROWS_ROOM))
        with warnings.catch_warnings():
            # A legend too wide to lay out warns: it is why this tries fewer columns.
            warnings.simplefilter("ignore", UserWarning)
            figure.tight_layout()
        box = legend.get_window_extent(renderer)
        if box.x0 >= 0 and box.x1 <= figure.bbox.width:
            return


def _colours() -> Iterator[str]:
    """The lines' and bars' colours in the nets' order, as MLflow's UI draws their runs."""
    return map(net_colour, itertools.count())


def _widths(n_lines: int) -> np.ndarray:
    """Line widths from thick to thin: each line is drawn over the ones before it, and nets that
    learn alike have curves that coincide, so a later line must be thinner to leave the earlier
    one showing at its sides."""
    return np.linspace(3.2, 1.2, n_lines) if n_lines > 1 else np.array([1.5])


def _log_y_axis(axis, low: float, high: float) -> None:
    """A log scale labelled with round numbers from the one at or below `low` to the one at or
    above `high`.

    matplotlib's log ticks label powers of ten and their multiples only: curves from 3.6 to 14 px
    would show labels 4 to 10 alone, as if nothing lay above 10.
    """
    decades = range(math.floor(math.log10(low)) - 1, math.floor(math.log10(high)) + 2)
    for steps in ((1, 1.5, 2, 3, 4, 5, 6, 8), (1, 2, 5), (1,)):  # fewer as the range widens
        candidates = [step * 10.0 ** decade for decade in decades for step in steps]
        bottom, top = max(c for c in candidates if c <= low), min(c for c in candidates if c >= high)
        ticks = [c for c in candidates if bottom <= c <= top]
        if len(ticks) <= MAX_TICKS:
            break
    axis.set_yscale("log")
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.set_ylim(bottom / 1.03, top * 1.03)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_write(path) as temporary:
        # No "Software" text: the same picture is then the same bytes whatever matplotlib version drew it.
        figure.savefig(temporary, dpi=80, format="png", metadata={"Software": None})
