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

from mlora.core.errors import MloraError

logger = logging.getLogger("mlora")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(MloraError):
    """Training stopped on a signal after writing a checkpoint; the message says where."""

    exit_code = 130


class GracefulStop:
    """Context manager that records SIGINT/SIGTERM instead of dying (main thread only).

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"`` once one was received, else ``None``.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)",
            self.signal_name,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
