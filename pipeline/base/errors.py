"""The error types a user sees, and any exception turned into the one line that reports it."""

from __future__ import annotations

import errno


class PipelineError(Exception):
    """A problem with the user's input or the machine: reported as one line, never as a traceback."""

    exit_code = 2


class Interrupted(PipelineError):
    """Stopped by Ctrl-C or SIGTERM, with what was done kept."""

    exit_code = 130  # the shell's code for a process ended by SIGINT


# What allocators say when a request cannot be met: torch's on the CPU ("can't allocate memory"),
# CUDA's ("out of memory"), C++'s (std::bad_alloc). Python's and numpy's are MemoryErrors.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "bad_alloc")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: a MemoryError (numpy's _ArrayMemoryError too), the
    system's ENOMEM, or a RuntimeError of torch's allocators."""
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in OUT_OF_MEMORY_MESSAGES))


def describe(error: BaseException) -> str:
    """The cause in a few words: the system's own for an OSError ("No space left on device"),
    else the first line of the message, else the error's type."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def os_failure(error: OSError, doing: str = "") -> PipelineError:
    """An OSError as one line naming the path, what was being done and the cause."""
    paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
    where = " -> ".join(paths) or "a file"
    return PipelineError(f"{where}: {doing + ' failed: ' if doing else ''}{describe(error)}")


def out_of_memory(program: str, knobs: str) -> PipelineError:
    """A failed allocation as one line naming the settings that size it (`knobs`) and the machine's memory."""
    return PipelineError(f"{program}: out of memory: {knobs}, or free memory (other programs, ulimit -v)")
