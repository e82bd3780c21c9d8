"""One error type for everything a user can get wrong, and the wrapper that reports it."""

from __future__ import annotations

import contextlib
import errno
import functools
import reprlib
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator


class PipelineError(Exception):
    """A problem with the user's input or the machine: reported as one line, never as a traceback."""

    exit_code = 2


# The most of a value that a message shows: a value pasted by mistake (a file's content, an expanded
# YAML alias) would otherwise make a line of megabytes.
MAX_SHOWN = 80
# What allocators say when a request cannot be met: torch's on the CPU ("can't allocate memory"),
# CUDA's ("out of memory"), C++'s (std::bad_alloc). Python's and numpy's are MemoryErrors.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "bad_alloc")


def _short_repr() -> reprlib.Repr:
    # reprlib stops early in long strings and deep or wide containers: the full repr is never built.
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = MAX_SHOWN
    short.maxlevel, short.maxlist, short.maxdict = 3, 8, 8
    return short


_SHORT_REPR = _short_repr()


def shown(value) -> str:
    """The repr of a value for a message, cut to about MAX_SHOWN characters."""
    try:
        text = _SHORT_REPR.repr(value)
    except ValueError:  # an integer of more digits than Python converts to text (sys.int_info)
        text = f"an integer of {value.bit_length()} bits"
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 3]}..."


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: a MemoryError (numpy's _ArrayMemoryError too), the
    system's ENOMEM, or a RuntimeError of torch's allocators."""
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in OUT_OF_MEMORY_MESSAGES))


class Interrupted(PipelineError):
    """Stopped by Ctrl-C or SIGTERM, with what was done kept."""

    exit_code = 130  # the shell's code for a process ended by SIGINT


class _Outputs:
    """The outputs the running program has published whole (pipeline.base.files), in order, and an
    interrupt held back while one of them takes its place."""

    def __init__(self):
        self.written: list[Path] = []
        self.publishing = False
        self.interrupt_held = False


_outputs = _Outputs()


@contextlib.contextmanager
def publishing(path: Path) -> Iterator[None]:
    """The step that puts an output in its place (a rename). Ctrl-C or SIGTERM within it takes effect
    after it, once the output is recorded, so that an interrupt's line names every output published."""
    _outputs.publishing = True
    try:
        yield
        _outputs.written.append(Path(path))
    finally:
        _outputs.publishing = False
        held, _outputs.interrupt_held = _outputs.interrupt_held, False
    if held:
        raise KeyboardInterrupt


def counted(count: int, noun: str) -> str:
    """A count and its noun for a message: "1 face", "4 faces"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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


def interrupted(program: str) -> Interrupted:
    """What an interrupted program kept: the outputs it had published (each whole, since every output
    is written to a temporary file and renamed), and nothing else of this run."""
    kept = list(dict.fromkeys(str(path) for path in _outputs.written if path.exists()))
    if not kept:
        return Interrupted(f"{program} interrupted; nothing of this run was written: run it again")
    return Interrupted(f"{program} interrupted; of this run it kept {', '.join(kept)} (each written whole) and"
                       " wrote nothing else: run it again for the rest")


@contextlib.contextmanager
def interrupts_handled() -> Iterator[None]:
    """Ctrl-C, and SIGTERM (a scheduler, `kill` or DVC stopping the job) the same way, raise
    KeyboardInterrupt in the block, except while an output is taking its place (publishing)."""
    def interrupt(signum, frame):
        if _outputs.publishing:
            _outputs.interrupt_held = True
        else:
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def out_of_memory(program: str, knobs: str) -> PipelineError:
    return PipelineError(f"{program}: out of memory: {knobs}, or free memory (other programs, ulimit -v)")


def reports_errors(main: Callable[..., None] | None = None, *, memory_knobs: str = "") -> Callable[..., None]:
    """A PipelineError or an OSError (a full disk, a read-only directory, ...) escaping a program's
    main() becomes one line on stderr and a non-zero exit; Ctrl-C and SIGTERM become one line saying
    what the run kept, and exit 130 (a program may say it more precisely with its own Interrupted).
    A failed allocation becomes one line naming memory and `memory_knobs`, the settings that size it
    (`@reports_errors(memory_knobs="lower train.batch_size")`).

    The imports before main() (torch, MLflow: a few seconds) are not covered: an interrupt there
    writes Python's traceback, or nothing for SIGTERM, but nothing of the run has been written yet.
    """
    if main is None:
        return functools.partial(reports_errors, memory_knobs=memory_knobs)
    program = Path(main.__code__.co_filename).stem  # its module's name, also where it runs as __main__
    knobs = memory_knobs or "give it less data"

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        _outputs.written.clear()
        try:
            with interrupts_handled():
                return main(*args, **kwargs)
        except KeyboardInterrupt:
            failure = interrupted(program)
        except PipelineError as error:
            failure = error
        except OSError as error:
            failure = out_of_memory(program, knobs) if is_out_of_memory(error) else os_failure(error)
        except (MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            failure = out_of_memory(program, knobs)
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(failure.exit_code)

    return wrapper
