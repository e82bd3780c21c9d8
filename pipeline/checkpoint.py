"""Trained weights and resumable training states; loading never unpickles arbitrary objects."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from pipeline.callbacks import Callback
from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.loop import Trainer
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


# The training state: enough to continue a training exactly where its last finished epoch left it.
STATE_FORMAT = 1


def fingerprint(settings: dict) -> str:
    """A short hash of everything that shapes a training; a checkpoint resumes only a match."""
    text = json.dumps({**settings, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _generator_states(trainer: Trainer) -> dict:
    states = {"torch": torch.get_rng_state(), "shuffle": trainer.generator.get_state()}
    if trainer.augment_generator is not None:
        states["augment"] = trainer.augment_generator.get_state()
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_training_state(path: Path, trainer: Trainer, settings_hash: str, run_id: str | None) -> None:
    """Write the state after an epoch; atomically, so a kill at any moment leaves the last whole one."""
    state = {
        "format": STATE_FORMAT,
        "fingerprint": settings_hash,
        "mlflow_run_id": run_id,
        "history": trainer.history,
        "model": trainer.network.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "generators": _generator_states(trainer),
    }
    with atomic_write(path) as temporary:
        torch.save(state, temporary)


def read_training_state(path: Path) -> dict | None:
    """The saved state, or None when there is none; never unpickles anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise PipelineError(
            f"{path}: not a readable training checkpoint ({str(error).splitlines()[0]}); "
            "delete it to train from the first epoch"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this version; delete it to train afresh")
    return state


def restore_training_state(trainer: Trainer, state: dict) -> None:
    trainer.network.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    generators = state["generators"]
    torch.set_rng_state(generators["torch"])
    trainer.generator.set_state(generators["shuffle"])
    if trainer.augment_generator is not None:
        trainer.augment_generator.set_state(generators["augment"])
    if "cuda" in generators and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(generators["cuda"])
    trainer.history = list(state["history"])


class Checkpointer(Callback):
    """Save the training state after every epoch, before anything else hears of the epoch.

    Saving first means an epoch the tracking store knows of is always in the checkpoint too;
    an epoch the store missed is logged when the training resumes.
    """

    def __init__(self, path: Path, settings_hash: str, run_id: str | None):
        self.path, self.settings_hash, self.run_id = Path(path), settings_hash, run_id

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        save_training_state(self.path, trainer, self.settings_hash, self.run_id)
