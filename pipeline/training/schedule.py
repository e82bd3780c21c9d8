"""Hyperparameter schedules over the epochs, as pure functions."""

from __future__ import annotations


def linear(start: float, stop: float, max_epochs: int, epoch: int) -> float:
    """The value used during `epoch` (1-based): the first epoch uses start, the last uses stop.

    The seed's AdjustVariable sets the value for the next epoch in on_epoch_finished from
    linspace(...)[epoch - 1], so there every value arrives one epoch late and stop is never used.
    Here the schedule is applied before the epoch, as its own description intends.

    The same float as numpy.linspace(start, stop, max_epochs)[epoch - 1], computed for this epoch
    alone: an array of every epoch's value would take memory and time in proportion to max_epochs,
    on every epoch.
    """
    if not 1 <= epoch <= max_epochs:
        raise ValueError(f"epoch {epoch} is outside 1..{max_epochs}")
    if max_epochs == 1:
        return float(start)
    if epoch == max_epochs:
        return float(stop)
    # numpy.linspace's arithmetic, operation for operation, so that every value is the same bits.
    intervals, delta = max_epochs - 1, stop - start
    step = delta / intervals
    if step == 0:  # numpy's path for a step that underflows (gh-5437)
        return (epoch - 1) / intervals * delta + start
    return (epoch - 1) * step + start
