"""One error type for everything a user can get wrong, and the wrapper that reports it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """A problem with the user's input or the machine: reported as one line, never as a traceback."""

    exit_code = 2


class Interrupted(PipelineError):
    """Stopped by Ctrl-C or SIGTERM, with what was done kept."""

    exit_code = 130  # the shell's code for a process ended by SIGINT


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


def reports_errors(main: Callable[..., None]) -> Callable[..., None]:
    """A PipelineError or an OSError (a full disk, a read-only directory, ...) escaping a stage's
    main() becomes one line on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        except OSError as error:
            print(f"error: {os_failure(error)}", file=sys.stderr)
            sys.exit(PipelineError.exit_code)

    return wrapper
