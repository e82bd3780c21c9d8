"""The wording of messages: a count with its noun, and a value shown cut short."""

from __future__ import annotations

import reprlib

# The most of a value that a message shows: a value pasted by mistake (a file's content, an expanded
# YAML alias) would otherwise make a line of megabytes.
MAX_SHOWN = 80


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


def counted(count: int, noun: str) -> str:
    """A count and its noun for a message: "1 face", "4 faces"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
