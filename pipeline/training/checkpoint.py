"""Resumable training states: one callback restores a training or starts it afresh, then saves it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import torch

from pipeline.base.errors import PipelineError, describe
from pipeline.base.weights import copy_into, load_checked, on_host, save_checked
from pipeline.training.loop import Callback, Trainer

# The training state: enough to continue a training exactly where its last finished epoch left it
# (4: with the callbacks' states, such as the best epoch's weights; 5: the caller's `extra` dict).
STATE_FORMAT = 5
RESTART = "delete it to train from the first epoch"


def fingerprint(settings: dict) -> str:
    """A short hash of everything that shapes a training; a checkpoint resumes only a match."""
    text = json.dumps({**settings, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generator_states(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every generator the training draws from. Dropout draws from torch's global generator of the
    training device: the CPU's, or on a GPU the device's own (which CUDA graphs replay from, see
    graphs.py); the CPU's is kept on a GPU too, as the weights' initialisation left it."""
    states = {"torch": torch.get_rng_state(), "shuffle": trainer.generator.get_state()}
    device = trainer.generator.device
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if trainer.augment_generator is not None:
        states["augment"] = trainer.augment_generator.get_state()
    return states


def restore_generators(trainer: Trainer, states: dict[str, torch.Tensor]) -> None:
    """generator_states' generators set back as they were saved."""
    torch.set_rng_state(states["torch"])
    trainer.generator.set_state(states["shuffle"])
    device = trainer.generator.device
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    if trainer.augment_generator is not None:
        trainer.augment_generator.set_state(states["augment"])


def callback_states(trainer: Trainer) -> dict[str, dict]:
    """The callbacks' own states by state_key (Lightning's layout); those without one take no room."""
    return {callback.state_key: state for callback in trainer.callbacks if (state := callback.state_dict())}


def write_training_state(path: Path, state: dict) -> None:
    """Atomically: a kill or a power cut at any moment leaves the previous whole state, never half of this one."""
    save_checked(path, on_host(state))


def read_training_state(path: Path) -> dict | None:
    """The saved state, on the CPU, or None when there is none; never unpickles anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        return None
    state = load_checked(path, RESTART)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PipelineError(f"{path}: not a training checkpoint of this version; {RESTART}")
    return state


class Checkpoint(Callback):
    """The resumable state of one training: skorch's LoadInitState and Checkpoint in one callback.

    `resume()` restores the saved state if it was saved with the same settings (their
    fingerprint), else the training starts afresh. While training, every finished epoch's
    weights, optimizer state, random generators and callbacks' states (`callback_states`: the
    best epoch's weights) are copied on the training device (one pass over 96 MB:
    microseconds on a GPU, milliseconds on a CPU); a thread writes such a copy to disk
    at most every `interval_seconds`, so the loop never waits for the disk and a long training
    writes a few hundred MB, not a checkpoint per epoch. The last epoch is written at the end of
    the training, and the last finished epoch when it stops on an interrupt or an error (use the
    callback as a context manager around the training). `extra` is saved with
    the state and restored with it, unread: the caller's own (the train stage keeps its MLflow run there).
    """

    def __init__(self, path: Path, settings: dict, interval_seconds: float, saves: bool = True):
        self.path, self.interval_seconds, self.saves = Path(path), interval_seconds, saves
        self.fingerprint = fingerprint(settings)
        self.extra: dict = {}
        self.saved_epochs = 0
        # The training's history, not the trainer: a trainer kept here would be in a cycle (trainer ->
        # callbacks -> checkpoint -> trainer), which holds a GPU training's graphs until gc runs.
        self._history: list[dict] = []
        # Two copies of finished epochs' states on the training device, taking turns, so that a
        # stop during one copy still finds the previous epoch whole in the other.
        self._epoch_states: list[dict | None] = [None, None]
        self._epochs = [0, 0]  # which epoch each copy holds (0: none)
        self._latest = 0  # the copy of the last finished epoch
        self._writer_state: dict | None = None  # the copy a writer thread is writing, in host memory
        self._writer_source: int | None = None  # which epoch copy the device may still be reading for it
        self._writer_copied: torch.cuda.Event | None = None  # on a GPU: the host copy's end
        self._copy_stream: torch.cuda.Stream | None = None  # on a GPU: the host copies' stream
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._last_write = 0.0

    def resume(self, trainer: Trainer) -> bool:
        """Restore the saved training into `trainer`, if one was saved with these settings."""
        state = read_training_state(self.path)
        if state is None:
            return False
        if state["fingerprint"] != self.fingerprint:
            if self.saves:
                print(f"{self.path} was saved with other settings, data or code: training afresh")
            return False
        trainer.network.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        restore_generators(trainer, state["generators"])
        saved = state["callbacks"]
        for callback in trainer.callbacks:
            if callback.state_dict():
                if callback.state_key not in saved:
                    raise PipelineError(f"{self.path}: holds no state of the callback {callback.state_key}; {RESTART}")
                callback.load_state_dict(saved[callback.state_key])
        trainer.history = list(state["history"])
        self.extra = dict(state["extra"])
        self.saved_epochs = len(trainer.history)
        return True

    def on_train_begin(self, trainer: Trainer) -> None:
        self._history = trainer.history
        if self.saves and next(trainer.network.parameters()).is_cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        self.saved_epochs = len(trainer.history)  # a resumed training's earlier epochs are in the file
        self._last_write = time.monotonic()

    def on_epoch_finished(self, trainer: Trainer, history: list[dict]) -> None:
        if not self.saves:
            return
        spare = 1 - self._latest
        self._epochs[spare] = 0  # until the copy is whole
        if self._writer_copied is not None and self._writer_source == spare:
            # The device still reads that copy for the host's: it waits for it (on the device; the
            # host goes on), which on a GPU is done long before, an epoch later.
            torch.cuda.current_stream().wait_event(self._writer_copied)
        self._epoch_states[spare] = copy_into(self._epoch_states[spare], {
            "model": trainer.network.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "generators": generator_states(trainer),
            # The best epoch's weights among them: a pass over 32 MB more, on the device like the rest.
            "callbacks": callback_states(trainer),
        })
        self._epochs[spare] = len(history)
        self._latest = spare
        self._report_failure()
        due = time.monotonic() - self._last_write >= self.interval_seconds
        if due and (self._writer is None or not self._writer.is_alive()):
            self._write_in_background()

    def on_train_end(self, trainer: Trainer, history: list[dict]) -> None:
        if self.saves:
            self._wait()
            self._write_last_epoch()

    def _state(self, tensors: dict, epochs: int) -> dict:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "extra": dict(self.extra),
            "history": [dict(row) for row in self._history[:epochs]],
            **tensors,
        }

    def _write_in_background(self) -> None:
        self._copy_to_host(self._latest)
        state = self._state(self._writer_state, self._epochs[self._latest])
        self._last_write = time.monotonic()
        self._writer = threading.Thread(target=self._write, args=(state, self._writer_copied),
                                        name="checkpoint writer", daemon=True)
        self._writer.start()

    def _copy_to_host(self, source: int) -> None:
        """A copy of an epoch's state of its own, in host memory, since the next epochs overwrite the
        device's copies while the thread writes. On a GPU it goes into pinned buffers on a stream of
        its own, queued after the epoch's work, so that neither the host nor the training's stream
        waits for it; its event tells the writer thread when it is there."""
        state = self._epoch_states[source]
        if self._copy_stream is None:
            self._writer_state = copy_into(self._writer_state, state)
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._copy_stream):
            self._writer_state = copy_into(self._writer_state, state, host=True)
            self._writer_copied = torch.cuda.Event()
            self._writer_copied.record()
        self._writer_source = source

    def _write(self, state: dict, copied: torch.cuda.Event | None) -> None:
        """In the writer thread: a failure is kept for the training's thread to report."""
        try:
            if copied is not None:
                copied.synchronize()
            self._save(state)
        except BaseException as error:  # noqa: BLE001 - reported in the training's thread
            self._failure = error

    def _save(self, state: dict) -> None:
        write_training_state(self.path, state)
        self.saved_epochs = max(self.saved_epochs, len(state["history"]))

    def _write_last_epoch(self) -> None:
        """The last finished epoch, now, unless the file already has it."""
        epochs = self._epochs[self._latest]
        if epochs > self.saved_epochs:
            try:
                self._save(self._state(self._epoch_states[self._latest], epochs))
            except Exception as error:  # noqa: BLE001 - a second Ctrl-C still stops at once
                raise self._unwritten(error) from None

    def _wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._report_failure()

    def _report_failure(self) -> None:
        """A failed write becomes the training's error."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise self._unwritten(failure)

    def _unwritten(self, error: BaseException) -> PipelineError:
        if isinstance(error, PipelineError):
            return error  # it names the file and the cause already
        return PipelineError(f"{self.path}: the checkpoint could not be written: {describe(error)}")

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None or not self.saves:
            return
        # Stopped by an interrupt or an error: keep the last finished epoch. The error in flight is
        # the one to report, not a second failure to write.
        try:
            self._wait()
            self._write_last_epoch()
        except PipelineError:
            pass
