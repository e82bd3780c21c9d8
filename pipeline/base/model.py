"""The seed's convolutional network (net4 and net5 share it). No I/O here."""

from __future__ import annotations

import torch
from torch import nn

N_OUTPUTS = 30


class KeypointNet(nn.Module):
    """conv32 3x3 -> pool -> conv64 2x2 -> pool -> conv128 2x2 -> pool -> 500 -> 500 -> 30.

    Each block max-pools before the ReLU: the two commute (both are monotone), so the result is
    the seed's conv -> ReLU -> pool, but the ReLU touches a quarter of the values, which matters
    because the early activations dominate the time on a CPU.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, kernel_size=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 11 * 11, 500), nn.ReLU(inplace=True),
            nn.Linear(500, 500), nn.ReLU(inplace=True),
            nn.Linear(500, N_OUTPUTS),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Lasagne's defaults, which the seed relied on: Glorot-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
