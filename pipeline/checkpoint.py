"""Trained weights and resumable training states; loading never unpickles arbitrary objects."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.utils.serialization

from pipeline.callbacks import Callback
from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.model import KeypointNet

if TYPE_CHECKING:
    from pipeline.loop import Trainer


def save_model(path: Path, model: torch.nn.Module) -> None:
    with atomic_write(path) as temporary:
        torch.save({key: value.cpu().contiguous() for key, value in model.state_dict().items()}, temporary)


def load_model(path: Path, device: torch.device | str = "cpu") -> KeypointNet:
    """The trained net in evaluation mode, on `device`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file (train it first with `dvc repro`)")
    state = _load_tensors(path, device)
    model = KeypointNet()
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise PipelineError(f"{path}: not a KeypointNet state_dict ({str(error).splitlines()[0]})") from None
    return model.to(device).eval()


def _load_tensors(path: Path, device: torch.device | str = "cpu"):
    """torch.load restricted to tensors and plain data: a file that carries code is refused unread."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise PipelineError(
            f"{path}: holds objects other than tensors and plain data; refusing to unpickle it "
            "(only files the pipeline wrote load)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise PipelineError(f"{path}: not a readable PyTorch file ({str(error).splitlines()[0]})") from None


# The training state: enough to continue a training exactly where its last finished epoch left it.
STATE_FORMAT = 1


def fingerprint(settings: dict) -> str:
    """A short hash of everything that shapes a training; a checkpoint resumes only a match."""
    text = json.dumps({**settings, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _copy(value):
    """A deep copy on the host of a state's tensors, so that training can go on while it is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value


def training_state(trainer: Trainer, settings_hash: str, run_id: str | None) -> dict:
    """Everything a training needs to go on exactly where its last finished epoch left it."""
    generators = {"torch": torch.get_rng_state(), "shuffle": trainer.generator.get_state()}
    if trainer.augment_generator is not None:
        generators["augment"] = trainer.augment_generator.get_state()
    if torch.cuda.is_available():
        generators["cuda"] = torch.cuda.get_rng_state_all()
    return _copy({
        "format": STATE_FORMAT,
        "fingerprint": settings_hash,
        "mlflow_run_id": run_id,
        "history": [dict(row) for row in trainer.history],
        "model": trainer.network.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "generators": generators,
    })


def write_training_state(path: Path, state: dict) -> None:
    """Atomically: a kill at any moment leaves the previous whole state, never half of this one."""
    # Without the zip format's CRC32, which for 64 MB costs four times the CPU of the write itself,
    # taken from the training beside it; the atomic rename already guarantees a whole file.
    with atomic_write(path) as temporary, torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        torch.save(state, temporary)


def read_training_state(path: Path) -> dict | None:
    """The saved state, or None when there is none; never unpickles anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = _load_tensors(path)
    except PipelineError as error:
        raise PipelineError(f"{error}; delete it to train from the first epoch") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this version; delete it to train from the first epoch")
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
    """Save the training state after every epoch, written while the next epoch runs.

    Copying the state takes milliseconds; writing its 64 MB takes 50-200 ms, a twentieth of an
    epoch on a CPU and more than a whole epoch on a GPU, so a thread writes it, and training
    never waits for it: an epoch that ends while the last write is still going is not saved
    (the next one will be), and the end of training saves the last epoch whatever happened.
    Use as a context manager, which waits for the last write.
    """

    def __init__(self, path: Path, settings_hash: str, run_id: str | None = None):
        self.path, self.settings_hash, self.run_id = Path(path), settings_hash, run_id
        self.saved_epochs = 0
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.saved_epochs = len(trainer.history)  # a resumed training's earlier epochs are in the file

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        if self._writer is not None and self._writer.is_alive():
            return
        self._save(trainer, in_background=True)

    def on_train_end(self, trainer: Trainer, history: list[dict]) -> None:
        self.wait()
        if self.saved_epochs < len(history):
            self._save(trainer, in_background=False)

    def _save(self, trainer: Trainer, in_background: bool) -> None:
        self.wait()
        state = training_state(trainer, self.settings_hash, self.run_id)
        self.saved_epochs = len(trainer.history)
        if in_background:
            self._writer = threading.Thread(target=self._write, args=(state,), name="checkpoint writer")
            self._writer.start()
        else:
            write_training_state(self.path, state)

    def _write(self, state: dict) -> None:
        try:
            write_training_state(self.path, state)
        except BaseException as error:  # noqa: BLE001 - reported in the training's thread by wait()
            self._failure = error

    def wait(self) -> None:
        """Until the last write is on disk; its failure, if any, becomes the training's."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise PipelineError(f"{self.path}: the checkpoint could not be written ({failure})")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.wait()
        elif self._writer is not None:
            self._writer.join()  # keep the last saved epoch; the error in flight is the one to report
