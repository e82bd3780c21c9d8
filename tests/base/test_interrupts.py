"""Ctrl-C and SIGTERM as one KeyboardInterrupt, held back while an output takes its place, and the
outputs an interrupt's line names (pipeline/base/interrupts.py); the programs' lines are test_reporting's."""

import os
import signal
import time

import pytest

from pipeline.base.files import write_text
from pipeline.base.interrupts import interrupted, interrupts_handled, publishing


def test_an_interrupt_while_an_output_takes_its_place_waits_for_it_and_names_it(tmp_path):
    with pytest.raises(KeyboardInterrupt), interrupts_handled():
        with publishing(tmp_path / "out.txt"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the signal's handler has run
            (tmp_path / "out.txt").write_text("whole")
        time.sleep(10)  # never reached
    assert f"it kept {tmp_path / 'out.txt'} (each written whole)" in str(interrupted("program"))


def test_an_interrupt_names_only_the_outputs_published_since_the_handling_began(tmp_path):
    """A program's main() run twice in one process (as the tests run them) names its own run's outputs."""
    for name in ("first.txt", "second.txt"):
        with interrupts_handled():
            write_text(tmp_path / name, "whole")
    assert str(interrupted("program")) == (f"program interrupted; of this run it kept {tmp_path / 'second.txt'} "
                                           "(each written whole) and wrote nothing else: run it again for the rest")
