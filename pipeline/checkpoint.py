"""Saving and loading trained weights; loading never unpickles arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.model import KeypointNet


def save_model(path: Path, model: torch.nn.Module) -> None:
    with atomic_write(path) as temporary:
        torch.save({key: value.cpu().contiguous() for key, value in model.state_dict().items()}, temporary)


def load_model(path: Path, device: torch.device | str = "cpu") -> KeypointNet:
    """The trained net in evaluation mode, on `device`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file (train it first with `dvc repro`)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model = KeypointNet()
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, EOFError) as error:
        raise PipelineError(f"{path}: not a KeypointNet state_dict ({str(error).splitlines()[0]})") from None
    return model.to(device).eval()
