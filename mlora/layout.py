"""The batch layout: which contiguous segment of a packed batch belongs to which adapter.

Rows are grouped by adapter, so adapter ``i`` owns rows ``[start_i, end_i)``; once the batch is
flattened to ``[B*T, hidden]`` it owns tokens ``[start_i*T, end_i*T)``. The same description
serves padded training batches, evaluation and generation (T = 1 per decoding step). Rows that
no segment covers run through the base model only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSegment:
    """Rows ``[start, end)`` of the batch use adapter ``adapter``."""

    adapter: str
    start: int
    end: int


@dataclass(frozen=True)
class BatchLayout:
    """The segments of one batch of ``num_rows`` rows, in row order and non-overlapping."""

    segments: tuple[AdapterSegment, ...]
    num_rows: int

    def __post_init__(self) -> None:
        cursor = 0
        for seg in self.segments:
            if not cursor <= seg.start < seg.end <= self.num_rows:
                raise ValueError(
                    f"segments must be ordered, non-empty and within {self.num_rows} rows"
                )
            cursor = seg.end

    @classmethod
    def from_row_adapters(cls, row_adapters: Sequence[str | None]) -> BatchLayout:
        """Group consecutive rows with the same adapter (``None``: base model) into segments."""
        segments: list[AdapterSegment] = []
        start = 0
        for i in range(1, len(row_adapters) + 1):
            if i == len(row_adapters) or row_adapters[i] != row_adapters[start]:
                name = row_adapters[start]
                if name is not None:
                    segments.append(AdapterSegment(name, start, i))
                start = i
        return cls(tuple(segments), len(row_adapters))

    @property
    def adapters(self) -> list[str]:
        return [seg.adapter for seg in self.segments]


class LayoutContext:
    """The layout of the pass in flight, shared by every adapter-aware layer of one model.

    The trainer sets it before the forward pass and keeps it until backward has finished, so
    that recomputation during gradient checkpointing sees the same segments.
    """

    def __init__(self) -> None:
        self.layout: BatchLayout | None = None

    @contextmanager
    def use(self, layout: BatchLayout | None) -> Iterator[None]:
        previous, self.layout = self.layout, layout
        try:
            yield
        finally:
            self.layout = previous
