"""User-facing errors: one line that names the key, file or row at fault.

The CLI prints ``MloraError`` messages without a traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType


class MloraError(Exception):
    """A problem with the user's input or environment, reported as one line.

    ``quiet``: another process reports it (data parallel: rank 0 prints what all ranks raise).
    """

    quiet = False


class ConfigError(MloraError):
    """An invalid configuration key or value."""


class DataError(MloraError):
    """An unreadable data file, or a row missing a field."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), so a
    library's multi-line error still reads as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) ends a command as Ctrl-C does: its cleanup runs
    (temporary files removed, one line said) instead of the process vanishing mid-write.
    Training replaces both with ``GracefulStop`` (finish the step, write a checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code_of(body: Callable[[], int], interrupted_code: int = 130) -> int:
    """Run a command's body for its exit code: a ``MloraError`` prints as its one line and
    gives 2; Ctrl-C or SIGTERM gives ``interrupted_code`` (130, with a line; 0, silently, for
    a server)."""
    try:
        with sigterm_as_ctrl_c():
            return body()
    except MloraError as exc:
        if not exc.quiet:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted_code:
            print("error: interrupted", file=sys.stderr)
        return interrupted_code
