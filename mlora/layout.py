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

import torch

from mlora.aux_losses import AuxLossCollector


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
        # (B*T,) bool, True at real (non-padding) tokens of the pass; None: all tokens are real.
        self.token_mask: torch.Tensor | None = None
        self.aux_losses = AuxLossCollector()

    def set(self, layout: BatchLayout | None, token_mask: torch.Tensor | None = None) -> None:
        """Set the pass's layout and its real-token mask together, so no mask outlives its
        layout (``set(None)`` clears both)."""
        self.layout, self.token_mask = layout, token_mask

    def adapter_token_mask(self, adapter: str) -> torch.Tensor | None:
        """Real-token mask of ``adapter``'s segment, for modules that see only its tokens.

        None when there is no mask or the adapter does not own exactly one segment (then treat
        every token as real).
        """
        layout = self.layout
        if self.token_mask is None or layout is None:
            return None
        owned = [seg for seg in layout.segments if seg.adapter == adapter]
        if len(owned) != 1:
            return None
        per_row = self.token_mask.numel() // layout.num_rows
        return self.token_mask[owned[0].start * per_row : owned[0].end * per_row]

    @contextmanager
    def use(
        self, layout: BatchLayout | None, token_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """``set`` for the duration of a ``with`` block, then restore what was set before."""
        previous = self.layout, self.token_mask
        self.set(layout, token_mask)
        try:
            yield
        finally:
            self.set(*previous)
