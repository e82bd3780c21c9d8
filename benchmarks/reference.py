"""The plain eager PyTorch port of the seed, the yardstick for the project's training loop.

Deliberately naive: conv -> ReLU -> pool in the seed's order, contiguous NCHW tensors, a
DataLoader over a TensorDataset, and each batch's loss read back to the host at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.base.model import N_OUTPUTS


def reference_net() -> nn.Sequential:
    """The seed's layers and Lasagne's initialisation (Glorot-uniform weights, zero biases)."""
    net = nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, kernel_size=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 11 * 11, 500), nn.ReLU(),
        nn.Linear(500, 500), nn.ReLU(),
        nn.Linear(500, N_OUTPUTS),
    )
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net


def load_keypoint_net_weights(net: nn.Sequential, source: nn.Module | Mapping[str, torch.Tensor]) -> None:
    """Copy a KeypointNet (or its state_dict) into `net`.

    Both networks hold the same six weighted layers in the same order, only under other names
    (KeypointNet splits them into `features` and `head` and pools before the ReLU), so the
    tensors are paired by position and each pair must agree in shape.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    own_names = list(net.state_dict())
    if len(state) != len(own_names):
        raise ValueError(f"expected {len(own_names)} tensors, got {len(state)}")
    renamed = {}
    for own_name, (name, tensor) in zip(own_names, state.items()):
        expected = net.state_dict()[own_name].shape
        if tensor.shape != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, {own_name} needs {tuple(expected)}")
        renamed[own_name] = tensor
    # load_state_dict copies into the existing parameters, so they stay contiguous NCHW even
    # when the source was channels_last.
    net.load_state_dict(renamed)


def make_loader(images: torch.Tensor, targets: torch.Tensor, batch_size: int = 128,
                shuffle: bool = True, generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(net: nn.Module, lr: float, momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=True)


def train_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> list[float]:
    """One SGD epoch; returns every batch's MSE loss."""
    net.train()
    losses = []
    for images, targets in loader:
        optimizer.zero_grad()
        loss = F.mse_loss(net(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
