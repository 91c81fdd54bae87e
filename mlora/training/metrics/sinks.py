"""Where a run's metric rows go: the per-step interface the trainer reports to, and the fan-out
(``log_lines.py``'s ``MetricsSink`` gets the log interval's summary, for the log
line; a ``RowSink`` gets every optimizer step's row).

The trainer hands finished rows (host values, read once per log interval) to one ``RowSinks``;
each sink does one thing with them: the metrics file, a tracker, the progress bar. A sink never
sees device tensors, so none can add a host sync to the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlora.training.metrics.metrics_file import MetricsFile
from mlora.training.metrics.rows import RunRow, StepRow, ValidationRow


@dataclass(frozen=True)
class RunStart:
    """What a sink may need to know when the loop starts.

    Attributes:
        output_dir: the run's ``--dir``.
        run: the run's id (names its rows, its tracker group).
        adapters: each adapter's config as JSON (trackers record it as parameters).
        resume_step: the global step a resume continues from (None: a fresh start).
        positions: each adapter's optimizer steps done at the start (0 on a fresh start).
    """

    output_dir: Path
    run: str
    adapters: dict[str, dict[str, Any]]
    resume_step: int | None = None
    positions: dict[str, int] = field(default_factory=dict)


class RowSink(Protocol):
    """Something that receives a run's rows (all methods are called on rank 0 only)."""

    def start(self, run: RunStart) -> None: ...

    def log_steps(self, rows: Sequence[StepRow]) -> None: ...

    def log_validation(self, rows: Sequence[ValidationRow]) -> None: ...

    def log_run(self, row: RunRow) -> None: ...

    def sync(self) -> None:
        """Make what was logged so far durable (called before each checkpoint)."""

    def close(self, finished: bool) -> None:
        """End the run's output (``finished``: the run completed, else it stopped early)."""


class MetricsFileSink:
    """Rows into ``D/metrics.jsonl`` (see ``metrics_file.py`` for resume and crash safety)."""

    def __init__(self) -> None:
        self.file: MetricsFile | None = None

    def start(self, run: RunStart) -> None:
        self.file = MetricsFile(run.output_dir, run.run)
        self.file.start(run.resume_step)

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        self._write([row.to_json() for row in rows])

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        self._write([row.to_json() for row in rows])

    def log_run(self, row: RunRow) -> None:
        self._write([row.to_json()])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.file is not None:
            self.file.write(rows)

    def sync(self) -> None:
        if self.file is not None:
            self.file.sync()

    def close(self, finished: bool) -> None:
        if self.file is not None:
            self.file.close()


class RowSinks:
    """Every sink of a run, called in order (the metrics file first: it is the record)."""

    def __init__(self, sinks: Sequence[RowSink] = ()) -> None:
        self.sinks = list(sinks)
        self.started = False

    def add(self, sink: RowSink) -> None:
        self.sinks.append(sink)

    def start(self, run: RunStart) -> None:
        for sink in self.sinks:
            sink.start(run)
        self.started = True

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        if rows:
            for sink in self.sinks:
                sink.log_steps(rows)

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        if rows:
            for sink in self.sinks:
                sink.log_validation(rows)

    def log_run(self, row: RunRow) -> None:
        for sink in self.sinks:
            sink.log_run(row)

    def sync(self) -> None:
        for sink in self.sinks:
            sink.sync()

    def close(self, finished: bool) -> None:
        """Close every sink, in order."""
        if not self.started:
            return
        self.started = False
        with ExitStack() as stack:  # every sink is closed, even when an earlier one fails
            for sink in reversed(self.sinks):
                stack.callback(sink.close, finished)
