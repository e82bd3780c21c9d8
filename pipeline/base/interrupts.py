"""Ctrl-C and SIGTERM as one KeyboardInterrupt, held back while an output takes its place, and the
outputs published whole so far, which an interrupt's line names."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Iterator

from pipeline.base.errors import Interrupted


class _Outputs:
    """The outputs the running program has published whole (pipeline.base.files), in order, an
    interrupt held back while one of them takes its place, and whether any interrupt came."""

    def __init__(self):
        self.written: list[Path] = []
        self.publishing = False
        self.interrupt_held = False
        self.interrupt_came = False


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


def interrupted(program: str) -> Interrupted:
    """What an interrupted program kept: the outputs it had published (each whole, since every output
    is written to a temporary file and renamed), and nothing else of this run."""
    kept = list(dict.fromkeys(str(path) for path in _outputs.written if path.exists()))
    if not kept:
        return Interrupted(f"{program} interrupted; nothing of this run was written: run it again")
    return Interrupted(f"{program} interrupted; of this run it kept {', '.join(kept)} (each written whole) and"
                       " wrote nothing else: run it again for the rest")


def interrupt_came() -> bool:
    """Whether Ctrl-C or SIGTERM came in the block of interrupts_handled. Python ignores an exception
    raised where it cannot propagate (in a __del__ or a weakref callback: "Exception ignored in"), so a
    signal that lands there raises nothing, and the program goes on unless it asks this."""
    return _outputs.interrupt_came


@contextlib.contextmanager
def interrupts_handled() -> Iterator[None]:
    """Ctrl-C, and SIGTERM (a scheduler, `kill` or DVC stopping the job) the same way, raise
    KeyboardInterrupt in the block, except while an output is taking its place (publishing).

    The outputs published are counted afresh: an interrupt names those of this block's run only
    (a program's main() called twice in one process, as the tests do).
    """
    def interrupt(signum, frame):
        _outputs.interrupt_came = True
        if _outputs.publishing:
            _outputs.interrupt_held = True
        else:
            raise KeyboardInterrupt

    _outputs.written.clear()
    _outputs.interrupt_came = False
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
