"""Hyperparameter schedules over the epochs, as pure functions."""

from __future__ import annotations

import numpy as np


def linear(start: float, stop: float, max_epochs: int, epoch: int) -> float:
    """The value used during `epoch` (1-based): the first epoch uses start, the last uses stop.

    The seed's AdjustVariable sets the value for the next epoch in on_epoch_finished from
    linspace(...)[epoch - 1], so there every value arrives one epoch late and stop is never used.
    Here the schedule is applied before the epoch, as its own description intends.
    """
    if not 1 <= epoch <= max_epochs:
        raise ValueError(f"epoch {epoch} is outside 1..{max_epochs}")
    return float(np.linspace(start, stop, max_epochs)[epoch - 1])
