"""Pictures of faces and keypoints; matplotlib without a display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


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
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
