"""The callback protocol of the training loop, the annealing callback and the console table."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

from pipeline.errors import PipelineError
from pipeline.schedule import linear

if TYPE_CHECKING:
    from pipeline.loop import Trainer


class Callback:
    """Hooks of the training loop; each does nothing unless a subclass says otherwise."""

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_batch_end(self, trainer: Trainer, batch: int, n_batches: int) -> None:
        pass

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        pass

    def on_train_end(self, trainer: Trainer, history: list[dict]) -> None:
        pass


class AdjustHyperparameter(Callback):
    """Set an optimizer hyperparameter (lr, momentum, weight_decay, ...) linearly over the epochs."""

    def __init__(self, name: str, start: float, stop: float):
        self.name, self.start, self.stop = name, start, stop

    def on_train_begin(self, trainer: Trainer) -> None:
        known = trainer.optimizer.param_groups[0]
        if self.name not in known or not isinstance(known[self.name], (int, float)):
            numeric = sorted(key for key, value in known.items() if isinstance(value, (int, float)))
            raise PipelineError(
                f"train.schedules.{self.name}: the optimizer has no hyperparameter {self.name!r} "
                f"(it has {', '.join(numeric)})"
            )

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        value = linear(self.start, self.stop, trainer.max_epochs, epoch)
        for group in trainer.optimizer.param_groups:
            group[self.name] = value


class EpochTable(Callback):
    """The seed's console table; on a terminal, the best losses in colour and a progress bar."""

    COLUMNS = ("epoch", "train loss", "valid loss", "train/val", "dur")
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
        if not self.interactive:
            self._write(
                f"epoch {row['epoch']}/{trainer.max_epochs} train_loss {row['train_loss']:.6f} "
                f"valid_loss {row['valid_loss']:.6f} train/val {row['train_valid_ratio']:.4f} "
                f"valid_rmse_px {row['valid_rmse_px']:.3f} lr {row['learning_rate']:.6g} "
                f"momentum {row['momentum']:.6g} {row['epoch_seconds']:.2f}s\n"
            )
            return
        best_train = min(earlier["train_loss"] for earlier in history)
        best_valid = min(earlier["valid_loss"] for earlier in history)
        train = self._mark(f"{row['train_loss']:10.6f}", row["train_loss"] == best_train, self.CYAN)
        valid = self._mark(f"{row['valid_loss']:10.6f}", row["valid_loss"] == best_valid, self.GREEN)
        self._write(
            f"\r{row['epoch']:>10}  {train}  {valid}  {row['train_valid_ratio']:10.4f}  "
            f"{row['epoch_seconds']:9.2f}s\n"
        )

    def _mark(self, text: str, best: bool, colour: str) -> str:
        return f"{colour}{text}{self.RESET}" if best and self.colour else text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
