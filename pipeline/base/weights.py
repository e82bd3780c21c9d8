"""Trained weights and other tensor files: saved with a checksum, loaded onto the CPU, checked,
and never unpickling code."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.serialization

from pipeline.base.errors import PipelineError, describe, is_out_of_memory
from pipeline.base.files import write_bytes
from pipeline.base.model import KeypointNet, for_inference

MODEL_REMEDY = "restore it with `dvc checkout` or train the net again with `dvc repro`"


def map_tensors(function: Callable[[Any, Any], Any], value, like=None,
                entering: Callable[[Any], None] = lambda container: None):
    """`value` rebuilt with every leaf (a tensor, a dict's key, any other value) replaced by
    function(leaf, its counterpart in `like` or None), in order; `entering` sees each dict, list and
    tuple before what it holds.

    The one walk over nested states (state_dicts, optimizers' states, checkpoints): copying them,
    moving them to the host and checksumming them all follow it, so they agree on what a state holds.
    """
    if isinstance(value, dict):
        entering(value)
        like = like if isinstance(like, dict) else {}
        # A key before its item, as the checksum feeds them.
        return {function(key, None): map_tensors(function, item, like.get(key), entering)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        entering(value)
        like = like if isinstance(like, (list, tuple)) and len(like) == len(value) else [None] * len(value)
        return type(value)(map_tensors(function, item, old, entering) for item, old in zip(value, like))
    return function(value, like)


def on_host(value):
    """`value` with every tensor on the CPU, as torch.save writes them."""
    return map_tensors(lambda leaf, _: leaf.cpu() if isinstance(leaf, torch.Tensor) else leaf, value)


def host_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the CPU in the default layout: loadable on any machine, with or without a GPU."""
    return map_tensors(lambda leaf, _: leaf.detach().cpu().contiguous() if isinstance(leaf, torch.Tensor) else leaf,
                       model.state_dict())


def save_model(path: Path, model: torch.nn.Module) -> None:
    save_checked(path, host_state_dict(model))


def weights_checksum(model: torch.nn.Module) -> str:
    """The checksum save_model stores with the weights: it names a trained net wherever its weights are."""
    return checksum(host_state_dict(model))


def load_model(path: Path, device: torch.device | str = "cpu") -> KeypointNet:
    """The trained net in evaluation mode, on `device`, whatever its width and dropout
    (model.for_inference: the weights say all that inference needs)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file (train it first with `dvc repro`)")
    state = load_checked(path, MODEL_REMEDY)
    try:
        model = for_inference(state)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        if is_out_of_memory(error):
            raise  # the machine's failure, not the file's: reports_errors names memory
        raise PipelineError(f"{path}: not a KeypointNet state_dict ({describe(error)})") from None
    return model.to(device).eval()


def checksum(content) -> str:
    """SHA-256 of every tensor's bytes, dtype and shape and of every other value, in order.

    Computed over what was saved rather than over the file, so it is kept inside the file.
    """
    digest = hashlib.sha256()

    def container(value) -> None:
        digest.update(f"{'dict' if isinstance(value, dict) else type(value).__name__} {len(value)};".encode())

    def leaf(value, _):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())
        return value

    map_tensors(leaf, content, entering=container)
    return digest.hexdigest()


def save_checked(path: Path, content) -> None:
    """Save tensors and plain data (on the CPU) with their checksum, atomically and flushed to disk.

    Serialised in memory first: torch.save writing to a full disk fails with an internal
    assertion, where a plain write names the cause ("No space left on device"). Without the zip
    format's CRC32, which the checksum supersedes.
    """
    buffer = io.BytesIO()
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        torch.save({"sha256": checksum(content), "content": content}, buffer)
    write_bytes(path, buffer.getbuffer())


def load_checked(path: Path, remedy: str):
    """What save_checked saved at `path`, on the CPU, after its checksum matched.

    A file that is empty, cut short or changed on disk is named as damaged, followed by `remedy`;
    one that carries code is refused unread. Always onto the CPU: a file saved on a GPU loads on
    a machine without one, and the caller moves what it loaded to its own device.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise PipelineError(f"{path}: damaged: the file is empty (a write was cut off); {remedy}")
        if not zipfile.is_zipfile(path):
            raise PipelineError(f"{path}: damaged: not a PyTorch file; {remedy}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise PipelineError(
                f"{path}: holds objects other than tensors and plain data; refusing to unpickle it "
                "(only files the pipeline wrote load)"
            ) from None
        raise PipelineError(f"{path}: damaged: {describe(error)}; {remedy}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        if is_out_of_memory(error):
            raise  # the machine's failure, not the file's: reports_errors names memory
        raise PipelineError(f"{path}: damaged: {describe(error)}; {remedy}") from None
    if not isinstance(saved, dict) or set(saved) != {"sha256", "content"}:
        raise PipelineError(f"{path}: not written by this version of the pipeline (it has no checksum); {remedy}")
    if checksum(saved["content"]) != saved["sha256"]:
        raise PipelineError(f"{path}: damaged: its content does not match its checksum; {remedy}")
    return saved["content"]


def copy_into(target, value, host: bool = False):
    """A copy of `value`'s tensors, written into `target`'s tensors of the same shape where it has them.

    Reusing the buffers keeps the copy of an epoch's state to one pass over memory, with no
    allocation; on a GPU it stays on the device and the training does not wait for it. With `host`,
    the copy goes into host memory, pinned where the tensor is on a GPU, and is queued without
    waiting (non_blocking): the caller marks its end with an event and waits for that before reading.
    """
    def copy(tensor, old):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        device = torch.device("cpu") if host else tensor.device
        if not (isinstance(old, torch.Tensor) and old.shape == tensor.shape and old.dtype == tensor.dtype
                and old.device == device and old.stride() == tensor.stride()):
            old = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device,
                                      pin_memory=host and tensor.is_cuda)
        return old.copy_(tensor.detach(), non_blocking=host and tensor.is_cuda)

    return map_tensors(copy, value, like=target)
