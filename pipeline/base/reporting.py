"""The wrapper of every program's main(): whatever a user can cause ends as one line and an exit code."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from pipeline.base.errors import Interrupted, PipelineError, is_out_of_memory, os_failure, out_of_memory
from pipeline.base.interrupts import interrupt_came, interrupted, interrupts_handled


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
        try:
            with interrupts_handled():
                result = main(*args, **kwargs)
                if interrupt_came():  # one Python ignored: the program ends as stopped all the same
                    raise KeyboardInterrupt
                return result
        except KeyboardInterrupt:
            failure = interrupted(program)
        except PipelineError as error:
            # After an interrupt that a library swallowed, its next call fails for it (SQLAlchemy: "Can't
            # reconnect until invalid transaction is rolled back"): the stop is what the user asked for.
            failure = interrupted(program) if interrupt_came() and not isinstance(error, Interrupted) else error
        except OSError as error:
            failure = out_of_memory(program, knobs) if is_out_of_memory(error) else os_failure(error)
        except (MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            failure = out_of_memory(program, knobs)
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(failure.exit_code)

    return wrapper
