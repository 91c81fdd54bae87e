"""Independent references for the adapter-layer tests, written from the math on plain tensors.

Nothing here calls mlora's layers or its dropout code: the dropout rule is rebuilt from its
documented description (README "Randomness"; ``mlora.batching.randomness.fill_keep``) with shifts
instead of dtype views, and the LoRA / DoRA / mixture-of-experts deltas are the papers' (and PEFT's,
MoE-PEFT's) formulas over weight tensors the tests read out of the modules.
"""

from __future__ import annotations

import torch

KEEP_LEVELS = 65536  # 16-bit draws


def keep_multipliers(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted-dropout multipliers by mlora's documented rule: four 16-bit draws from each
    64-bit ``random_`` word over the whole int64 range, low bits first, a unit kept when its
    draw is below K = round((1 - p) * 2**16), kept units scaled by 2**16 / K.

    Args:
        shape: the dropped tensor's shape; units are drawn in its row-major order.
        p: drop probability.
        generator: the adapter's stream (consumed exactly as the layer consumes it).
    """
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=generator.device)
    words.random_(-(2**63), None, generator=generator)
    draws = torch.stack([(words >> (16 * j)) & 0xFFFF for j in range(4)], dim=1).reshape(-1)
    kept = round((1 - p) * KEEP_LEVELS)
    return (draws[:n] < kept).view(shape).float() * (KEEP_LEVELS / kept)


def twin_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in ``generator``'s current state (what the layer will draw next)."""
    return torch.Generator(device=generator.device).set_state(generator.get_state())


def lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    base_weight: torch.Tensor | None = None,
    base_no_bias: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """What LoRA (or DoRA) adds to the frozen layer's output, from the weight tensors.

    LoRA: ``s * B A drop(x)``. DoRA (Liu et al. 2024, PEFT's form): with the detached row norm
    ``n = ||W + s B A||`` and ``g = m / n``, ``(g - 1) * W drop(x) + g * s * B A drop(x)``; without
    dropout PEFT reuses the base output ``W x`` (``base_no_bias``) for ``W drop(x)``.

    Args:
        x: (N, in) input; lora_a (r, in), lora_b (out, r).
        base_weight: (out, in) W, needed for DoRA.
        base_no_bias: (N, out) the frozen output without its bias (DoRA without dropout).
        magnitude: (out,) DoRA's m; None for LoRA.
        keep: (N, in) dropout multipliers; None when no dropout is applied.
    """
    dropped = x if keep is None else x * keep
    lora = scaling * (dropped @ lora_a.T @ lora_b.T)
    if magnitude is None:
        return lora
    assert base_weight is not None
    norm = torch.linalg.norm(base_weight + scaling * (lora_b @ lora_a), dim=1).detach()
    gain = magnitude / norm
    base = dropped @ base_weight.T if keep is not None else base_no_bias
    assert base is not None
    return (gain - 1) * base + gain * lora
