"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then stop.

Killing a process in the middle of an optimizer step would lose everything since the last
checkpoint. While training runs, :class:`GracefulStop` turns the first SIGINT/SIGTERM into a
request that the trainer honours after the current step (it writes a resumable checkpoint and
raises :class:`TrainingInterrupted`); a second signal interrupts at once (atomic writes keep the
files on disk valid either way).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import ClassVar

from mlora.core.errors import MloraError

logger = logging.getLogger("mlora")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(MloraError):
    """Training stopped on a signal after writing a checkpoint; the message says where."""

    exit_code = 130


class GracefulStop:
    """Context manager that records SIGINT/SIGTERM instead of dying (main thread only).

    They nest: a whole training command holds one (a signal while the model loads, or while
    the last files are written, is recorded too) and the step loop holds its own, which
    starts with the request an enclosing one already received, so the run stops at its first
    step boundary with a checkpoint that ``--resume`` continues exactly.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"`` once one was received, else ``None``.
    """

    _active: ClassVar[list[GracefulStop]] = []  # entered and not exited, outermost first

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        for stop in self._active:  # the enclosing ones learn it too
            stop.signal_name = stop.signal_name or name
        self.signal_name = name
        logger.warning(
            "%s received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)",
            self.signal_name,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            if self._active:
                self.signal_name = self._active[-1].signal_name  # received before this stage
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._active.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self._previous:
            self._active.remove(self)
        self._previous.clear()
