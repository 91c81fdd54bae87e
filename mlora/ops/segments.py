"""Split a flat activation into token segments and join per-segment results, copy-free backward.

Slicing ``x[start:end]`` once per segment makes autograd allocate a zero tensor of the WHOLE
input for each slice in backward and sum them: time and memory grow with the number of
segments. ``torch.cat`` of the pieces has the mirror problem in forward. These two autograd
functions do the same work with one buffer: ``split_segments`` returns views and, in backward,
writes every piece's gradient into one input-gradient buffer; ``join_segments`` writes pieces
into one output buffer and hands each piece a view of the output gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Ranges = tuple[tuple[int, int], ...]


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ranges: Ranges) -> tuple[torch.Tensor, ...]:
        ctx.ranges, ctx.shape = ranges, x.shape
        return tuple(x[start:end] for start, end in ranges)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        present = [g for g in grads if g is not None]
        if not present:
            return None, None
        grad_x = present[0].new_zeros(ctx.shape)
        for (start, end), grad in zip(ctx.ranges, grads, strict=True):
            if grad is not None:
                grad_x[start:end] = grad
        return grad_x, None


class _Join(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ranges: Ranges, total: int, *pieces: torch.Tensor) -> torch.Tensor:
        ctx.ranges = ranges
        out = pieces[0].new_zeros((total, *pieces[0].shape[1:]))
        for (start, end), piece in zip(ranges, pieces, strict=True):
            out[start:end] = piece
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *(grad[start:end] for start, end in ctx.ranges))


def split_segments(x: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Row ranges ``[start, end)`` of ``x`` (N, ...) as views; one gradient buffer in backward.

    Args:
        x: (N, ...) activation.
        ranges: ordered, non-overlapping row ranges.

    Returns:
        One (end - start, ...) tensor per range.
    """
    return _Split.apply(x, tuple(ranges))


def join_segments(
    pieces: Sequence[torch.Tensor], ranges: Sequence[tuple[int, int]], total: int
) -> torch.Tensor:
    """One (total, ...) tensor with ``pieces[i]`` at rows ``ranges[i]`` and zeros elsewhere.

    Args:
        pieces: (end - start, ...) tensors of one dtype and device.
        ranges: ordered, non-overlapping row ranges, one per piece.
        total: rows of the result.
    """
    return _Join.apply(tuple(ranges), total, *pieces)
