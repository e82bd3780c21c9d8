"""Trained weights: saved and loaded apart from any training state; loading never unpickles code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.model import KeypointNet


def host_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the CPU in the default layout: loadable on any machine, with or without a GPU."""
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def save_model(path: Path, model: torch.nn.Module) -> None:
    with atomic_write(path) as temporary:
        torch.save(host_state_dict(model), temporary)


def load_model(path: Path, device: torch.device | str = "cpu") -> KeypointNet:
    """The trained net in evaluation mode, on `device`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file (train it first with `dvc repro`)")
    state = load_tensors(path)
    model = KeypointNet()
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise PipelineError(f"{path}: not a KeypointNet state_dict ({str(error).splitlines()[0]})") from None
    return model.to(device).eval()


def load_tensors(path: Path):
    """torch.load onto the CPU, restricted to tensors and plain data: a file that carries code is refused unread.

    Always the CPU: a file saved on a GPU then loads on a machine without one, and the caller
    moves what it loaded to its own device.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PipelineError(
            f"{path}: holds objects other than tensors and plain data; refusing to unpickle it "
            "(only files the pipeline wrote load)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise PipelineError(f"{path}: not a readable PyTorch file ({str(error).splitlines()[0]})") from None
