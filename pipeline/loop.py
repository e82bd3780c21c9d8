"""fit(): one epoch function for training and validation, one history of per-epoch dicts."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.callbacks import Callback
from pipeline.data import KEYPOINT_SCALE, FaceSet
from pipeline.errors import PipelineError

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_epochs: int
    batch_size: int
    generator: torch.Generator
    augment: Augment | None = None
    bf16: bool = False
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def run_epoch(trainer: Trainer, data: Tensors, train: bool) -> float:
    """One pass over `data`: an SGD epoch when `train`, else an evaluation. Returns the mean loss.

    Losses are summed on the device and read once at the end, so a GPU never waits for the host
    inside the epoch.
    """
    model, batch_size = trainer.model, trainer.batch_size
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
                images, targets = trainer.augment(images, targets)
            with torch.autocast(data.images.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
                predicted = model(images)
            loss = F.mse_loss(predicted.float(), targets)
            if train:
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
                trainer.notify("on_batch_end", batch + 1, n_batches)
            total += loss.detach() * len(images)
    return total.item() / len(data)


def fit(trainer: Trainer, train: Tensors, valid: Tensors) -> list[dict]:
    trainer.notify("on_train_begin")
    for epoch in range(len(trainer.history) + 1, trainer.max_epochs + 1):
        trainer.notify("on_epoch_begin", epoch)
        hyperparameters = trainer.optimizer.param_groups[0]
        started = time.perf_counter()
        train_loss = run_epoch(trainer, train, train=True)
        valid_loss = run_epoch(trainer, valid, train=False)
        if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
            raise PipelineError(
                f"training diverged in epoch {epoch}: train loss {train_loss}, valid loss {valid_loss}"
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
