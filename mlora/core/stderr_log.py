"""A log handler that writes to whatever ``sys.stderr`` is at the time of each record.

``logging.StreamHandler(sys.stderr)`` keeps the stream it was given. When a caller later swaps
``sys.stderr`` (a notebook cell's capture, pytest's capsys, ``contextlib.redirect_stderr``) and
closes the old one, every later record fails with "I/O operation on closed file"; looking the
stream up per record follows the swap, as ``logging.lastResort`` does.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class CurrentStderrHandler(logging.StreamHandler):
    """``StreamHandler`` on the current ``sys.stderr``, resolved per record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets it: ignored
        pass
