"""Any exception as the one line that reports it (pipeline/base/errors.py)."""

import errno
import os

from pipeline.base.errors import describe, os_failure


def test_an_os_error_is_one_line_naming_the_paths_what_was_done_and_the_systems_cause():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "models/net4.pt.tmp", None, "models/net4.pt")
    assert str(os_failure(full, "renaming")) == ("models/net4.pt.tmp -> models/net4.pt: renaming failed: "
                                                 "No space left on device")
    assert str(os_failure(OSError(errno.EIO, os.strerror(errno.EIO)))) == "a file: Input/output error"


def test_a_cause_is_the_first_line_of_its_message_or_else_its_type():
    assert describe(ValueError("bad value\n  with details")) == "bad value"
    assert describe(ValueError()) == "ValueError"
