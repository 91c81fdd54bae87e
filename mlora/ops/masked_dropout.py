"""LoRA dropout as a 1-byte mask: the dropped input rebuilt from it on demand.

The math, exactly. Given a bool ``mask`` (T, in) and row ranges with scales
``[(start_g, end_g, s_g)]`` (sorted, non-overlapping), the inverted-dropout multipliers are::

    keep[t, i] = mask[t, i] * s_g     for t in [start_g, end_g)
    keep[t, i] = mask[t, i]           for t in no range (mask True there: no dropout)

and an adapted projection's LoRA branch takes ``x * keep``
(``mlora.ops.segmented_lora.dropout_segmented_lora``), formed by ``dropped_input`` without the
multipliers themselves: ``x`` times the mask's bytes, then each range times ``s``, which rounds
exactly as ``x * keep`` (``x * 1`` and ``x * 0`` are exact) in two passes where building ``keep``
first takes three, one of them the slow bool-to-float conversion.

Why: written plainly, autograd keeps the (T, in) fp32 multipliers (for the gradient of ``x``)
and the branch keeps the (T, in) fp32 dropped input (for A's gradient): 8 bytes a unit, per
projection, per layer, until backward. ``x`` itself is kept alive anyway by the layer that
made it, and q/k/v share it. Keeping ``x`` and the mask alone (1 byte a unit) and rebuilding
``x * keep`` in backward gives the same gradients, bit for bit, for one more elementwise pass
over the input.
"""

from __future__ import annotations

import functools

import torch

KeepRanges = tuple[tuple[int, int, float], ...]
"""``(start, end, scale)`` row ranges whose kept units are multiplied by ``scale``."""


def keep_multipliers(mask: torch.Tensor, ranges: KeepRanges, dtype: torch.dtype) -> torch.Tensor:
    """(T, in) inverted-dropout multipliers in ``dtype`` from the bool mask (see module docstring).

    ``mask.to(dtype) * s`` gives exactly the values ``fill_keep`` writes (0, or ``s`` rounded
    to ``dtype``), so the dropped input is bit for bit the plain path's.
    """
    keep = mask.to(dtype)
    for start, end, scale in ranges:
        keep[start:end].mul_(scale)
    return keep


def dropped_input(x: torch.Tensor, mask: torch.Tensor, ranges: KeepRanges) -> torch.Tensor:
    """``x * keep_multipliers(mask, ranges, x.dtype)``, bit for bit, without the multipliers."""
    return _scale_ranges_(torch.mul(x, _bytes(mask)), ranges)


def scale_by_keep_(values: torch.Tensor, mask: torch.Tensor, ranges: KeepRanges) -> torch.Tensor:
    """``values *= keep_multipliers(mask, ranges, values.dtype)`` in place, bit for bit."""
    return _scale_ranges_(values.mul_(_bytes(mask)), ranges)


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """The bool mask read as uint8: a float tensor times uint8 promotes in the vectorized
    loop, times bool it takes a slow conversion."""
    return mask.view(torch.uint8)


def _scale_ranges_(values: torch.Tensor, ranges: KeepRanges) -> torch.Tensor:
    """Each range's rows times its scale, as ``keep`` holds it; returns ``values``."""
    for start, end, scale in ranges:
        values[start:end].mul_(_rounded(scale, values.dtype))
    return values


@functools.cache
def _rounded(scale: float, dtype: torch.dtype) -> float:
    """``scale`` rounded to ``dtype`` as ``keep`` holds it: a half-precision tensor times a
    Python float would otherwise use the float at fp32 precision."""
    return torch.tensor(scale, dtype=dtype).item()
