"""One error type for everything a user can get wrong, and the wrapper that reports it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """A problem with the user's input: reported as one line, never as a traceback."""

    exit_code = 2


class Interrupted(PipelineError):
    """Stopped by Ctrl-C or SIGTERM, with what was done kept."""

    exit_code = 130  # the shell's code for a process ended by SIGINT


def reports_errors(main: Callable[..., None]) -> Callable[..., None]:
    """Turn a PipelineError escaping a stage's main() into one line on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)

    return wrapper
