"""``D/metrics.jsonl``: written as the run goes (append-only, flushed), read while it runs.

Crash safety: each batch of rows is one ``write`` followed by a flush, so a killed process
leaves every row it wrote, at worst plus one torn last line (no newline). The trainer writes
the rows of every step up to a checkpoint *before* that checkpoint is queued (and fsyncs them),
so a complete checkpoint at global step G always has its rows 1..G on disk.

Exactly once on ``--resume``: the run resumes at G, so ``start(resume_step=G)`` drops this
run's rows past G (those steps run again) and a torn last line: they end the file (one run
writes into a folder at a time), so the file is cut there; if another run has trained into the
folder since, the file is rewritten atomically without them. Other runs' rows and lines the
reader cannot parse are kept as they were. A fresh run drops its own earlier rows (a run with
the same id is the same computation, restarted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from mlora.core.atomic import WriteError, atomic_write_text
from mlora.core.errors import MloraError
from mlora.training.metrics.rows import METRICS_FILE


class MetricsFileError(MloraError):
    """A metrics file that is missing, empty or has a row that is not a JSON object."""


def metrics_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / METRICS_FILE


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _dropped(lines: list[str], run: str, resume_step: int | None) -> list[bool]:
    """For each line: whether a (re)start of run ``run`` at ``resume_step`` drops it (its own
    rows past the step, all of them on a fresh start: None; and blank lines)."""
    out = []
    for line in lines:
        row = _parse(line)
        ours = row is not None and row.get("run") == run
        past = ours and (resume_step is None or row.get("global_step", 0) > resume_step)
        out.append(past or not line.strip())
    return out


class MetricsFile:
    """The appending writer of one run's rows into ``D/metrics.jsonl`` (rank 0 only).

    Args:
        output_dir: the run's ``--dir``.
        run: the run's id (``RunIdentity.run_id``), written into every row.
    """

    def __init__(self, output_dir: str | Path, run: str) -> None:
        self.path = metrics_path(output_dir)
        self.run = run
        self._handle: IO[str] | None = None

    def start(self, resume_step: int | None) -> None:
        """Drop this run's rows a resume at ``resume_step`` writes again (all of them on a fresh
        start: None), then open for appending.

        Raises:
            WriteError: the file cannot be read or written (one line naming it).
        """
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
            lines = data.decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise WriteError(self.path, getattr(exc, "strerror", None) or str(exc)) from None
        torn = lines.pop()  # "" after a final newline; else a write the crash cut short
        dropped = _dropped(lines, self.run, resume_step)
        if torn or any(dropped):
            first = dropped.index(True) if any(dropped) else len(lines)
            if all(dropped[first:]):  # the usual case: the rows to drop end the file
                keep = sum(len(line.encode("utf-8")) + 1 for line in lines[:first])
                try:
                    os.truncate(self.path, keep)
                except OSError as exc:
                    raise WriteError(self.path, exc.strerror or str(exc)) from None
            else:  # another run trained here since: rewrite without the dropped rows
                kept = [line for line, drop in zip(lines, dropped, strict=True) if not drop]
                atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            self._handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise WriteError(self.path, exc.strerror or str(exc)) from None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` (JSON objects) in one write, flushed to the operating system."""
        text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        if not text or self._handle is None:
            return
        try:
            self._handle.write(text)
            self._handle.flush()
        except OSError as exc:
            raise WriteError(self.path, exc.strerror or str(exc)) from None

    def sync(self) -> None:
        """Make the rows written so far durable (before a checkpoint that counts on them)."""
        if self._handle is not None:
            try:
                os.fsync(self._handle.fileno())
            except OSError as exc:
                raise WriteError(self.path, exc.strerror or str(exc)) from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics file, in file order (a last line still being written
    is left out).

    Raises:
        MetricsFileError: the file is missing, unreadable, holds no row, or a complete line
            is not a JSON object (naming file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetricsFileError(
            f"{path}: no metrics file (a training run writes it into its --dir)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MetricsFileError(f"cannot read {path}: {reason}") from None
    rows = []
    lines = text.split("\n")[:-1]  # the part after the last newline is still being written
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            raise MetricsFileError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    if not rows:
        raise MetricsFileError(f"{path}: no rows yet (the run has not logged a step)")
    return rows


class MetricsTail:
    """Follows a metrics file that a run is still writing: each ``read`` parses only the bytes
    appended since the last one (a file that got shorter, cut by a ``--resume``, or replaced,
    is read again from the start).

    Raises (from ``read``):
        MetricsFileError: as ``read_metrics``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._identity: tuple[int, int] | None = None
        self._lines = 0

    def read(self) -> list[dict[str, Any]]:
        """Every complete row so far, in file order (the same list, grown)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            raise MetricsFileError(
                f"{self.path}: no metrics file (a training run writes it into its --dir)"
            ) from None
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            self.rows, self._offset, self._lines, self._identity = [], 0, 0, identity
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError as exc:
            raise MetricsFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a last line still being written waits
        for line in complete.decode("utf-8", errors="replace").split("\n")[:-1]:
            self._lines += 1
            if not line.strip():
                continue
            row = _parse(line)
            if row is None:
                raise MetricsFileError(f"{self.path}: line {self._lines} is not a JSON object")
            self.rows.append(row)
        self._offset += len(complete)
        if not self.rows:
            raise MetricsFileError(f"{self.path}: no rows yet (the run has not logged a step)")
        return self.rows
