"""Checkpoint writes off the training loop's critical path: one worker thread, a short queue.

The loop snapshots what it saves (CPU copies) and hands a job to the writer; the next step runs
while the files are written. Jobs run in submission order (a run-level cut is written after the
checkpoint folders it names). At most one job waits behind the one being written: a loop that
saves faster than the disk writes waits at ``submit`` instead of piling up snapshots in memory.

The first job that fails stops the writer: later jobs are dropped (they may name a folder that
was never written) and the error is raised in the training thread by the next ``check``,
``submit`` or ``flush``, as the one-line error the write would have raised there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

Job = Callable[[], object]
_STOP = object()


class BackgroundWriter:
    """Runs write jobs on one thread, in order; ``flush`` waits for them and re-raises a failure.

    Args:
        enabled: False runs each job at once in the caller (processes that write nothing, or
            callers that want the writes inline).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jobs: queue.Queue[object] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.flush()
        finally:  # (when already failing: wait for the pending writes, keep the first error)
            self.close()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after a failure, later jobs are dropped
                    job()  # type: ignore[operator]
            except BaseException as exc:  # raised again in the training thread
                self._error = exc
            finally:
                self._jobs.task_done()

    def check(self) -> None:
        """Raise the error of a failed job, once (later calls pass: the run is stopping)."""
        error = self._error
        if error is None or isinstance(error, _Reported):
            return
        self._error = _Reported(error)
        raise error

    def submit(self, job: Job) -> None:
        """Queue ``job`` (waits while another job is already waiting)."""
        self.check()
        if isinstance(self._error, _Reported):
            return  # the run is stopping on that error; write nothing more
        if not self.enabled:
            job()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mlora-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every queued job is written; raise the error of one that failed."""
        if self._thread is not None:
            self._jobs.join()
        self.check()

    def close(self) -> None:
        """Wait for the queued jobs and stop the thread, without raising their error (the
        caller is already handling one)."""
        if self._thread is None:
            return
        self._jobs.join()
        self._jobs.put(_STOP)
        self._thread.join()
        self._thread = None


class _Reported(Exception):
    """Marks an error that ``check`` has raised already."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
