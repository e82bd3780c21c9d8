"""fit(): one epoch function for training and validation, one history of per-epoch dicts, the
hooks (Callback) through which everything else takes part, and the logger (MetricLogger) that
each finished epoch's row is handed to.

Read fit() top to bottom: the schedules set each epoch's hyperparameters, one pass trains and one
validates, and the loop itself completes the row (the best valid loss so far, the epoch whose
weights the training keeps) before anything else sees it. Callbacks read rows; none edits them.

Under torch.distributed every rank runs the same loop on its share of each global batch.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.base.errors import PipelineError
from pipeline.faces.data import FaceSet, loss_to_rmse_px
from pipeline.training.graphs import CapturedSteps
from pipeline.training.schedule import linear

# Validation batches: inference needs no stored activations, so 1024 faces take about 1.2 GB at
# the first convolution; beyond that the launches saved no longer matter.
EVAL_BATCH_ROWS = 1024

Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DeviceFaces:
    """A face set on the training device, images in the layout the model runs fastest on."""

    images: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, faces: FaceSet, device: torch.device,
           memory_format: torch.memory_format = torch.channels_last) -> "DeviceFaces":
        images = torch.from_numpy(faces.X).to(device).contiguous(memory_format=memory_format)
        return cls(images, torch.from_numpy(faces.y).to(device))

    def __len__(self) -> int:
        return len(self.images)


class Callback:
    """Hooks of the training loop; each does nothing unless a subclass says otherwise.

    A callback with state of its own, which a resumed training needs back (KeepBest's weights),
    returns it from state_dict() and takes it back in load_state_dict(), as Lightning's callbacks
    do; checkpoint.Checkpoint saves it under state_key. An empty state_dict() means none.
    """

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

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


class MetricLogger(Protocol):
    """Where fit() hands each epoch's finished row, step = epoch (torchtune's MetricLoggerInterface).

    A resumed training hands its earlier epochs' rows again first: a logger keeps no step twice.
    Whoever makes the logger closes it (close() stores what is still queued)."""

    def log_row(self, row: dict, step: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class Trainer:
    """What fit() needs. `batch_size` is the global batch, whatever the number of ranks."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_epochs: int
    batch_size: int
    generator: torch.Generator
    augment: Augment | None = None
    augment_generator: torch.Generator | None = None
    # Optimizer hyperparameters annealed linearly over max_epochs: name -> (first epoch's value, last's).
    schedules: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The weights a training ends with: the lowest valid loss's (a callback, KeepBest, keeps them) or the last epoch's.
    keep_best: bool = True
    bf16: bool = False
    # Targets may be unlabelled (NaN): the loss is the mean over the labelled coordinates only (masked_loss).
    masked: bool = False
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    # Replay each training step from a CUDA graph (graphs.CapturedSteps); needs an optimizer that
    # reads its hyperparameters from the device (optim.NesterovSGD).
    cuda_graphs: bool = False
    # Set by a callback (early stopping) to end the training before max_epochs; fit() checks it before each epoch.
    should_stop: bool = False
    # The epoch of the lowest valid loss so far and that loss (0 and infinity before the first epoch):
    # fit() keeps them, derived from the history, so that a resumed training has them too.
    best_epoch: int = field(default=0, init=False)
    best_valid_loss: float = field(default=math.inf, init=False)
    _captured_steps: CapturedSteps | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        known = self.optimizer.param_groups[0]
        for name in self.schedules:
            if not isinstance(known.get(name), (int, float)):
                numeric = sorted(key for key, value in known.items() if isinstance(value, (int, float)))
                raise PipelineError(f"train.schedules.{name}: the optimizer has no hyperparameter {name!r} "
                                    f"(it has {', '.join(numeric)})")

    @property
    def network(self) -> nn.Module:
        """The model itself, unwrapped from DistributedDataParallel."""
        return getattr(self.model, "module", self.model)

    def notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def step(self, images: torch.Tensor, targets: torch.Tensor, global_rows: int) -> torch.Tensor:
        """One SGD step on a batch, eager or replayed from a graph: the same kernels either way."""
        if not self.cuda_graphs:
            return train_step(self, images, targets, global_rows)
        if self._captured_steps is None:
            self._captured_steps = CapturedSteps(self.optimizer.sync)
        return self._captured_steps(functools.partial(train_step, self), images, targets, global_rows)


def batches(trainer: Trainer, data: DeviceFaces, batch_size: int,
            train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The epoch's batches, shuffled and augmented when `train`: this rank's share of each global
    batch, and the global batch's size.

    Every rank draws the same global batch and the same flips (same seeds), then keeps its own
    share, so the batches, the flips and hence the mathematics do not depend on the number of ranks.
    """
    order = torch.randperm(len(data), generator=trainer.generator, device=trainer.generator.device) if train else None
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        images, targets = data.images[rows], data.targets[rows]
        if train and trainer.augment is not None:
            images, targets = trainer.augment(images, targets, trainer.augment_generator)
        global_rows = len(images)
        if trainer.world_size > 1:
            images = images.tensor_split(trainer.world_size)[trainer.rank]
            targets = targets.tensor_split(trainer.world_size)[trainer.rank]
        yield images, targets, global_rows


def batch_loss(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor, global_rows: int) -> torch.Tensor:
    """The global batch's mean squared error, scaled by the number of ranks because
    DistributedDataParallel averages the ranks' gradients: shares of unequal size then still weigh
    each face equally."""
    # No autocast cache: a CUDA graph would otherwise capture weights cast before the step's update.
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=trainer.bf16, cache_enabled=False):
        predicted = trainer.model(images)
    if trainer.masked:
        return masked_loss(predicted.to(targets.dtype), targets)
    return F.mse_loss(predicted.to(targets.dtype), targets, reduction="sum") * (
        trainer.world_size / (global_rows * targets.shape[1]))


def masked_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean squared error over the labelled coordinates of `targets` (NaN where unlabelled), which
    alone pass a gradient back: an unlabelled coordinate's is exactly zero, whatever the net predicts.

    Multiplied by the mask rather than indexed, so that the batch's shapes stay fixed (a CUDA graph
    replays it) and nothing waits for the host. Under torchrun each rank takes the mean of its own share,
    and DistributedDataParallel averages those: shares with fewer labels weigh as much as the others."""
    labelled = ~targets.isnan()
    differences = (predicted - targets.nan_to_num()) * labelled
    return differences.square().sum() / labelled.sum().clamp(min=1)


def train_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor, global_rows: int) -> torch.Tensor:
    loss = batch_loss(trainer, images, targets, global_rows)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    return loss.detach()


def run_epoch(trainer: Trainer, data: DeviceFaces, train: bool) -> torch.Tensor:
    """One pass over `data`: an SGD epoch when `train`, else an evaluation. Returns the mean loss as
    a tensor on the device: summed there and never read inside the epoch, so a GPU never waits for
    the host (fit reads both passes' losses at once)."""
    trainer.model.train(train)
    world_size = trainer.world_size
    # Validation needs no gradients, so few large batches: fewer launches, the same sum.
    batch_size = trainer.batch_size if train else max(trainer.batch_size, EVAL_BATCH_ROWS)
    n_batches = math.ceil(len(data) / batch_size)
    total = torch.zeros((), dtype=data.targets.dtype, device=data.targets.device)
    with torch.set_grad_enabled(train):
        for batch, (images, targets, global_rows) in enumerate(batches(trainer, data, batch_size, train), 1):
            if train:
                loss = trainer.step(images, targets, global_rows)
                trainer.notify("on_batch_end", batch, n_batches)
            else:
                loss = batch_loss(trainer, images, targets, global_rows)
            total += loss * (global_rows / world_size)
    if world_size > 1:
        dist.all_reduce(total)
    return total / len(data)


def anneal(trainer: Trainer, epoch: int) -> None:
    """Set each scheduled hyperparameter to its value for `epoch`, in every param group, before the
    epoch runs (NesterovSGD copies the numbers to the device as its next step begins)."""
    for name, (start, stop) in trainer.schedules.items():
        value = linear(start, stop, trainer.max_epochs, epoch)
        for group in trainer.optimizer.param_groups:
            group[name] = value


def lowest_valid_loss(history: list[dict]) -> tuple[int, float]:
    """The epoch of the lowest valid loss and that loss: the first such epoch, since a tie is no new
    best; (0, infinity) before any epoch."""
    best_epoch, best_loss = 0, math.inf
    for row in history:
        if row["valid_loss"] < best_loss:
            best_epoch, best_loss = row["epoch"], row["valid_loss"]
    return best_epoch, best_loss


def fit(trainer: Trainer, train: DeviceFaces, valid: DeviceFaces, logger: MetricLogger | None = None) -> list[dict]:
    """Train up to max_epochs (a resumed training from the epoch after its history's last), handing each
    epoch's row to the callbacks and the logger; returns the history."""
    trainer.best_epoch, trainer.best_valid_loss = lowest_valid_loss(trainer.history)
    if logger is not None:
        for row in trainer.history:  # a resumed training's earlier epochs, which the run may lack
            logger.log_row(row, step=row["epoch"])
    trainer.notify("on_train_begin")
    for epoch in range(len(trainer.history) + 1, trainer.max_epochs + 1):
        if trainer.should_stop:  # a resumed training may have stopped already (on_train_begin says so)
            break
        anneal(trainer, epoch)
        trainer.notify("on_epoch_begin", epoch)
        hyperparameters = trainer.optimizer.param_groups[0]
        started = time.perf_counter()
        # The one wait for the device in an epoch.
        train_loss, valid_loss = torch.stack([run_epoch(trainer, train, train=True),
                                              run_epoch(trainer, valid, train=False)]).tolist()
        if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
            raise PipelineError(
                f"training diverged in epoch {epoch}: train loss {train_loss}, valid loss {valid_loss} "
                "(a smaller learning rate, train.schedules.lr, may help)"
            )
        new_best = valid_loss < trainer.best_valid_loss  # a tie is no new best: the earlier epoch stays
        if new_best:
            trainer.best_epoch, trainer.best_valid_loss = epoch, valid_loss
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "train_valid_ratio": train_loss / valid_loss,
            "valid_rmse_px": float(loss_to_rmse_px(valid_loss)),
            "learning_rate": hyperparameters["lr"],
            "momentum": hyperparameters.get("momentum", 0.0),
            "epoch_seconds": time.perf_counter() - started,
            # skorch's flag, as a number so that MLflow logs it.
            "valid_loss_best": 1.0 if new_best else 0.0,
            "kept_epoch": trainer.best_epoch if trainer.keep_best else epoch,
        }
        # Queued for the logger before the history has it: a stop in between leaves the epoch to be
        # computed again, identically, on resuming, and the logger keeps its first row.
        if logger is not None:
            logger.log_row(row, step=epoch)
        trainer.history.append(row)
        trainer.notify("on_epoch_finished", trainer.history)
    trainer.notify("on_train_end", trainer.history)
    return trainer.history
