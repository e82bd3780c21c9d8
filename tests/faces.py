"""Faces made up for tests of the training loop."""

import numpy as np

from pipeline.data import FaceSet


def bright_square_faces(n, seed):
    """Images with one bright square whose position is the target: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, 1, 96, 96), dtype=np.float32)
    y = np.zeros((n, 30), dtype=np.float32)
    for i in range(n):
        row, column = rng.integers(10, 80, size=2)
        X[i, 0, row:row + 8, column:column + 8] = 1
        y[i, 0::2] = (column + 4 - 48) / 48
        y[i, 1::2] = (row + 4 - 48) / 48
    return FaceSet(X, y)
