"""Files a crash, a full disk or a second process cannot leave half-written, folders of files
published as one unit, and the lock that keeps two trainings of one net apart."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from pipeline.base.errors import PipelineError, describe, os_failure
from pipeline.base.interrupts import publishing

TEMPORARY_SUFFIX = ".tmp"
# renameat2()'s flag that swaps two paths in one step (linux/fs.h), and its "relative to the working
# directory" (AT_FDCWD).
RENAME_EXCHANGE = 2
AT_FDCWD = -100


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path`, on disk, only if the block completes.

    The name is the process's own, so that two writers of one file never share it; the bytes are
    flushed to the disk before the rename, so that a power cut leaves the old file or the new one,
    never an empty one. Any OSError (a full disk, a read-only folder, a folder where the file
    belongs) becomes one line naming `path`, and the old file stays.
    """
    path = Path(path)
    temporary = _temporary_beside(path)
    try:
        make_folder(path.parent)
        _remove_abandoned_temporaries(path)
        yield temporary
        _flush_to_disk(temporary)
        with publishing(path):
            temporary.replace(path)
        _flush_to_disk(path.parent)
    except OSError as error:
        raise PipelineError(f"{path}: not written: {describe(error)}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside the folder `path`; it replaces `path` whole, on disk,
    only if the block completes.

    For files that are only right together (arrays and the summary that vouches for them): a reader
    sees the old set or the new one, never new files beside old ones, and a kill or a full disk
    leaves the old set whole. The block writes plain files: they are flushed here, and an OSError is
    one line naming `path`, not the temporary folder. Temporary folders left by a `kill -9` are
    removed by the next publication of `path`.
    """
    path = Path(path)
    temporary = _temporary_beside(path)
    try:
        make_folder(path.parent)
        _remove_abandoned_temporaries(path)
        temporary.mkdir()
        yield temporary
        for child in temporary.iterdir():
            _flush_to_disk(child)
        _flush_to_disk(temporary)
        with publishing(path):
            _swap_in(temporary, path)
        _flush_to_disk(path.parent)
    except OSError as error:
        raise PipelineError(f"{path}: not written: {describe(error)}") from None
    finally:
        # After the swap, the temporary name holds the old set.
        shutil.rmtree(temporary, ignore_errors=True)


def _temporary_beside(path: Path) -> Path:
    """A name of this process's own beside `path`, so that two writers of one path never share it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _swap_in(new: Path, path: Path) -> None:
    """Put the folder `new` in the place of `path`, in one step where `path` exists: the two names
    swap (Linux's renameat2), so that no moment lacks `path`; `new`'s name then holds the old folder.

    Where the system cannot swap (not Linux, some overlay and network file systems), two renames:
    for an instant `path` is missing, which a reader reports as missing, never as a mix.
    """
    if not path.exists():
        new.rename(path)
        return
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None and renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(path),
                                           RENAME_EXCHANGE) == 0:
        return
    code = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if code not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        raise OSError(code, os.strerror(code), str(path))
    aside = _temporary_beside(path)
    path.rename(aside)
    new.rename(path)
    aside.rename(new)


def make_folder(folder: Path) -> None:
    """mkdir -p, saying which file is in the way where mkdir would only say "File exists"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        blocker = next(part for part in [folder, *folder.parents] if part.exists() and not part.is_dir())
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder") from None


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_abandoned_temporaries(path: Path) -> None:
    """Delete the temporary files and folders of `path` left by processes that died (kill -9) while
    writing it."""
    for temporary in path.parent.glob(f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"):
        writer = temporary.name.removeprefix(f".{path.name}.").partition("-")[0]
        if writer.isdigit() and not process_is_alive(int(writer)):
            if temporary.is_dir() and not temporary.is_symlink():
                shutil.rmtree(temporary)
            else:
                temporary.unlink(missing_ok=True)


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text)


def write_bytes(path: Path, content: bytes | memoryview) -> None:
    with atomic_write(path) as temporary:
        temporary.write_bytes(content)


def write_json(path: Path, content: dict) -> None:
    write_text(path, json_text(content))


def json_text(content: dict) -> str:
    """The layout of every JSON file the pipeline writes."""
    return json.dumps(content, indent=2) + "\n"


def read_json(path: Path, remedy: str) -> dict:
    """A JSON object the pipeline wrote; a missing or damaged file is named, followed by `remedy`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file ({remedy})")
    try:
        content = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: damaged: not valid JSON ({describe(error)}); {remedy}") from None
    if not isinstance(content, dict):
        raise PipelineError(f"{path}: damaged: not a JSON object; {remedy}")
    return content


@contextlib.contextmanager
def exclusive_lock(path: Path, work: str) -> Iterator[None]:
    """Hold `path` as the lock of `work` for the block, or stop at once naming the process that holds it.

    The operating system releases the lock when its process ends, however it ends, so the lock
    of a dead process never blocks. The file names its holder, for the message of the next process.
    """
    path = Path(path)

    def name_the_holder(descriptor: int) -> None:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)

    # Kept on release: the next process reads its holder's line only while the file is there.
    lock = FileLock(path, timeout=0, preserve_lock_file=True, on_acquired=name_the_holder)
    try:
        make_folder(path.parent)
        lock.acquire()
    except Timeout:
        holder = _read_holder(path) or "another process"
        raise PipelineError(f"{work} is already running: {holder} holds {path}") from None
    except OSError as error:
        raise os_failure(error, f"taking the lock of {work}") from None
    try:
        yield
    finally:
        lock.release()


def _read_holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""
