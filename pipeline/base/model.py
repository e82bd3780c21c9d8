"""The seed's convolutional network (net4 and net5 share it) and the tutorial's variants of it:
dropout (net6) and wider dense layers (net7). No I/O here."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from pipeline.base.shapes import HIDDEN

N_OUTPUTS = 30
# Dropout rates after the three pooling blocks and after the first dense layer: none, as in the seed's nets.
NO_DROPOUT = (0.0, 0.0, 0.0, 0.0)
# The weights whose rows are the dense layers' width, and those whose rows are the outputs: the options
# of the network its weights give.
FIRST_DENSE_WEIGHT = "head.1.weight"
OUTPUT_WEIGHT = "head.5.weight"
OUTPUT_LAYER = "head.5."


class KeypointNet(nn.Module):
    """conv32 3x3 -> pool -> conv64 2x2 -> pool -> conv128 2x2 -> pool -> hidden -> hidden -> 30.

    Each block max-pools before the ReLU: the two commute (both are monotone), so the result is
    the seed's conv -> ReLU -> pool, but the ReLU touches a quarter of the values, which matters
    because the early activations dominate the time on a CPU.

    `dropout` gives the rates after the three blocks and after the first dense layer (the
    tutorial's net6: 0.1, 0.2, 0.3, 0.5). A Dropout module exists only where a rate is above 0,
    so a net without dropout is the seed's, module for module, and draws the same random numbers.

    `outputs` is two per keypoint it predicts: 30 for all 15, fewer for a specialist of a group.
    """

    def __init__(self, hidden: int = HIDDEN, dropout: Sequence[float] = NO_DROPOUT, outputs: int = N_OUTPUTS):
        super().__init__()
        if len(dropout) != len(NO_DROPOUT):
            raise ValueError(f"dropout takes {len(NO_DROPOUT)} rates, got {list(dropout)}")
        self.hidden, self.dropout = hidden, tuple(dropout)
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3), nn.MaxPool2d(2), _relu(dropout[0]),
            nn.Conv2d(32, 64, kernel_size=2), nn.MaxPool2d(2), _relu(dropout[1]),
            nn.Conv2d(64, 128, kernel_size=2), nn.MaxPool2d(2), _relu(dropout[2]),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 11 * 11, hidden), _relu(dropout[3]),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, outputs),
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


def start_from(model: KeypointNet, trained: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy another net's trained weights into every layer of `model` but the output layer, which keeps its
    fresh Glorot weights (the tutorial's load_weights_from): what a net learnt of all the keypoints starts
    a net of some of them, whose outputs are others. Returns the names of the weights copied."""
    state = model.state_dict()
    copied = [name for name in state if not name.startswith(OUTPUT_LAYER)]
    model.load_state_dict({**state, **{name: trained[name] for name in copied}})
    return copied


def parameter_count(**options) -> int:
    """The parameters of KeypointNet(**options), counted on PyTorch's meta device: none is allocated, so
    a net too large for the machine is counted as quickly as any other."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in KeypointNet(**options).parameters())


def _relu(rate: float) -> nn.Module:
    """A ReLU, followed by dropout if `rate` is above 0, in one slot of its Sequential: every net's
    weights keep the seed's names (head.1.weight, ...), whatever its dropout."""
    relu = nn.ReLU(inplace=True)
    return nn.Sequential(relu, nn.Dropout(rate)) if rate > 0 else relu


def for_inference(state_dict: Mapping[str, torch.Tensor]) -> KeypointNet:
    """The network that these trained weights load into, for evaluation and prediction.

    Built from the weights alone, so that any weights file loads without its training's record:
    their shapes give the dense layers' width and the outputs, and dropout, which does nothing in evaluation mode,
    is left out.
    """
    return KeypointNet(hidden=state_dict[FIRST_DENSE_WEIGHT].shape[0], outputs=state_dict[OUTPUT_WEIGHT].shape[0])
