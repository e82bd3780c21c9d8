"""The training loop's callbacks: the console table, the best epoch's weights and early stopping."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from pipeline.base.weights import copy_into
from pipeline.training.loop import Callback, Trainer


class EpochTable(Callback):
    """The seed's console table; on a terminal, the best losses in colour and a progress bar.
    Every epoch's line ends with the time left, estimated (eta)."""

    COLUMNS = ("epoch", "train loss", "valid loss", "train/val", "dur", "eta")
    GREEN, CYAN, RESET = "\033[32m", "\033[36m", "\033[0m"
    PROGRESS_AFTER_SECONDS = 2.0  # short epochs would only flicker

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        # The NO_COLOR convention, and terminals that declare they cannot show colour.
        self.colour = self.interactive and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.epoch_started = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.interactive:
            self._write("  ".join(f"{title:>10}" for title in self.COLUMNS) + "\n")
            self._write("  ".join("-" * 10 for _ in self.COLUMNS) + "\n")

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        self.epoch_started = time.perf_counter()

    def on_batch_end(self, trainer: Trainer, batch: int, n_batches: int) -> None:
        if self.interactive and time.perf_counter() - self.epoch_started > self.PROGRESS_AFTER_SECONDS:
            done = round(20 * batch / n_batches)
            self._write(f"\r  [{'#' * done}{'.' * (20 - done)}] {batch}/{n_batches}")

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        row = history[-1]
        eta = self._eta(history, trainer.max_epochs)
        if not self.interactive:
            self._write(
                f"epoch {row['epoch']}/{trainer.max_epochs} train_loss {row['train_loss']:.6f} "
                f"valid_loss {row['valid_loss']:.6f} train/val {row['train_valid_ratio']:.4f} "
                f"valid_rmse_px {row['valid_rmse_px']:.3f} lr {row['learning_rate']:.6g} "
                f"momentum {row['momentum']:.6g} {row['epoch_seconds']:.2f}s eta {eta}\n"
            )
            return
        best_train = min(earlier["train_loss"] for earlier in history)
        best_valid = min(earlier["valid_loss"] for earlier in history)
        train = self._mark(f"{row['train_loss']:10.6f}", row["train_loss"] == best_train, self.CYAN)
        valid = self._mark(f"{row['valid_loss']:10.6f}", row["valid_loss"] == best_valid, self.GREEN)
        self._write(
            f"\r{row['epoch']:>10}  {train}  {valid}  {row['train_valid_ratio']:10.4f}  "
            f"{row['epoch_seconds']:9.2f}s  {eta:>10}\n"
        )

    @staticmethod
    def _eta(history: list[dict], max_epochs: int) -> str:
        """The epochs to go times the mean epoch so far, as h:mm:ss or m:ss: until max_epochs, so an
        early stop (train.patience) comes sooner. A resumed training's history holds the epochs
        before the stop with their own times, so they count too."""
        mean = sum(row["epoch_seconds"] for row in history) / len(history)
        minutes, seconds = divmod(round((max_epochs - history[-1]["epoch"]) * mean), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"

    def _mark(self, text: str, best: bool, colour: str) -> str:
        return f"{colour}{text}{self.RESET}" if best and self.colour else text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class KeepBest(Callback):
    """With train.keep: best, the weights of the epoch with the lowest valid loss, as skorch's
    Checkpoint(monitor="valid_loss_best") and Lightning's ModelCheckpoint(monitor="valid_loss") keep
    them, but in memory on the training device; the net gets them back when the training ends.

    A new best epoch (its row's valid_loss_best, which fit() sets) has its weights copied into a
    buffer on the device: no allocation, no wait for the host. The weights are this callback's
    state (state_dict, saved by checkpoint.Checkpoint), so a resumed training keeps the same ones.
    """

    def __init__(self):
        self.weights: dict | None = None  # the best epoch's state_dict (None: no epoch yet)

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.weights is not None:
            # Restored from a checkpoint, on the CPU: onto the training device, where later bests are copied.
            device = next(iter(trainer.network.state_dict().values())).device
            self.weights = {key: value.to(device) for key, value in self.weights.items()}

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        if history[-1]["valid_loss_best"]:
            self.weights = copy_into(self.weights, trainer.network.state_dict())

    def on_train_end(self, trainer: Trainer, history: list[dict]) -> None:
        if self.weights is not None:
            trainer.network.load_state_dict(self.weights)

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]


class EarlyStopping(Callback):
    """Stop the training once `patience` epochs in a row have brought no new lowest valid loss
    (skorch's EarlyStopping on valid_loss): the last epoch is then the best one plus `patience`.

    Derived from fit()'s best epoch, itself derived from the history, so a resumed training stops
    where an unbroken one does; one that had already stopped runs no further epoch. The schedules
    keep their max_epochs span.
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.patience = patience

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.history:
            self._stop_if_patience_ran_out(trainer, trainer.history[-1]["epoch"])

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        self._stop_if_patience_ran_out(trainer, history[-1]["epoch"])

    def _stop_if_patience_ran_out(self, trainer: Trainer, epoch: int) -> None:
        if epoch - trainer.best_epoch >= self.patience and epoch < trainer.max_epochs:
            trainer.should_stop = True
