"""fit(): one epoch function for training and validation, one history of per-epoch dicts.

Under torch.distributed every rank runs the same loop on its share of each global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.callbacks import Callback
from pipeline.data import KEYPOINT_SCALE, FaceSet
from pipeline.errors import PipelineError

Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Tensors:
    """A face set on the training device, images in the layout the model runs fastest on."""

    images: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, faces: FaceSet, device: torch.device,
           memory_format: torch.memory_format = torch.channels_last) -> "Tensors":
        images = torch.from_numpy(faces.X).to(device).contiguous(memory_format=memory_format)
        return cls(images, torch.from_numpy(faces.y).to(device))

    def __len__(self) -> int:
        return len(self.images)


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
    bf16: bool = False
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    # Set by a callback (early stopping) to end the training before max_epochs; fit() checks it before each epoch.
    should_stop: bool = False

    @property
    def network(self) -> nn.Module:
        """The model itself, unwrapped from DistributedDataParallel."""
        return getattr(self.model, "module", self.model)

    def notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def run_epoch(trainer: Trainer, data: Tensors, train: bool) -> float:
    """One pass over `data`: an SGD epoch when `train`, else an evaluation. Returns the mean loss.

    Every rank draws the same global batch and the same flips (same seeds), then keeps its own
    share, so the batches, the flips and hence the mathematics do not depend on the number of
    ranks. Losses are summed on the device and read once at the end, so a GPU never waits for
    the host inside the epoch.
    """
    model, batch_size, world_size = trainer.model, trainer.batch_size, trainer.world_size
    model.train(train)
    n_batches = math.ceil(len(data) / batch_size)
    order = torch.randperm(len(data), generator=trainer.generator, device=trainer.generator.device) if train else None
    total = torch.zeros((), device=data.images.device)
    with torch.set_grad_enabled(train):
        for batch in range(n_batches):
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            if order is not None:
                rows = order[rows]
            images, targets = data.images[rows], data.targets[rows]
            if train and trainer.augment is not None:
                images, targets = trainer.augment(images, targets, trainer.augment_generator)
            global_rows = len(images)
            if world_size > 1:
                images = images.tensor_split(world_size)[trainer.rank]
                targets = targets.tensor_split(world_size)[trainer.rank]
            with torch.autocast(data.images.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
                predicted = model(images)
            # The global batch's mean, scaled by the number of ranks because DistributedDataParallel
            # averages the ranks' gradients: shares of unequal size then still weigh each face equally.
            loss = F.mse_loss(predicted.float(), targets, reduction="sum") * (
                world_size / (global_rows * targets.shape[1]))
            if train:
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
                trainer.notify("on_batch_end", batch + 1, n_batches)
            total += loss.detach() * (global_rows / world_size)
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / len(data)


def fit(trainer: Trainer, train: Tensors, valid: Tensors) -> list[dict]:
    trainer.notify("on_train_begin")
    for epoch in range(len(trainer.history) + 1, trainer.max_epochs + 1):
        if trainer.should_stop:  # a resumed training may have stopped already (on_train_begin says so)
            break
        trainer.notify("on_epoch_begin", epoch)
        hyperparameters = trainer.optimizer.param_groups[0]
        started = time.perf_counter()
        train_loss = run_epoch(trainer, train, train=True)
        valid_loss = run_epoch(trainer, valid, train=False)
        if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
            raise PipelineError(
                f"training diverged in epoch {epoch}: train loss {train_loss}, valid loss {valid_loss} "
                "(a smaller learning rate, train.schedules.lr, may help)"
            )
        trainer.history.append({
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "train_valid_ratio": train_loss / valid_loss,
            "valid_rmse_px": math.sqrt(valid_loss) * KEYPOINT_SCALE,
            "learning_rate": hyperparameters["lr"],
            "momentum": hyperparameters.get("momentum", 0.0),
            "epoch_seconds": time.perf_counter() - started,
        })
        trainer.notify("on_epoch_finished", trainer.history)
    trainer.notify("on_train_end", trainer.history)
    return trainer.history
