"""One random stream per adapter, so an adapter's dropout never depends on its neighbours.

Dropout masks and MixLoRA router jitter of adapter X are drawn from a ``torch.Generator``
seeded from (seed, X) alone. Layers draw in model order, so adapter X consumes its stream in the
same order whether it trains alone or beside others: concurrent training equals isolated
training with dropout on. The global RNG is never touched by adapter layers.

The trainer restarts X's stream at every micro-batch of X from (seed, X, micro-batch index)
(``start_pass``), so the masks of a micro-batch do not depend on what was drawn before: under
data parallel a rank that holds none of X's rows in a step (and draws nothing) stays in step
with the others, and each rank draws the noise of X's whole micro-batch and keeps the window
of its own rows (``RealRows``), so N processes draw exactly the masks one process draws.

The trainer seeds each adapter's stream, saves the states in checkpoints (``state_dict``) and
gradient checkpointing snapshots and restores them around a recomputation (``get_state`` /
``set_state``), so ``--resume`` and recompute replay the same masks.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_SEED = 0


def stream_seed(seed: int, adapter: str, device: torch.device) -> int:
    """The seed of ``adapter``'s stream on ``device``'s kind (CPU and CUDA streams differ)."""
    key = f"{adapter}\0{device.type}".encode()
    return (seed * 1_000_003 + zlib.crc32(key)) % (2**63)


def pass_seed(stream: int, index: int) -> int:
    """The seed of a stream restarted for micro-batch ``index`` (``start_pass``)."""
    return (stream + (index + 1) * 0x9E3779B97F4A7C15) % (2**63)


class AdapterGenerators:
    """A ``torch.Generator`` per (adapter, device), created on first use from its seed."""

    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}
        self._passes: dict[str, int] = {}
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}

    def _stream_seed(self, adapter: str, device: torch.device) -> int:
        stream = stream_seed(self._seeds.get(adapter, DEFAULT_SEED), adapter, device)
        index = self._passes.get(adapter)
        return stream if index is None else pass_seed(stream, index)

    def start_pass(self, adapter: str, index: int) -> None:
        """Restart ``adapter``'s streams for its micro-batch number ``index`` (0-based, counted
        over the whole run), so its draws depend on (seed, adapter, index) only."""
        self._passes[adapter] = index
        for (name, device), generator in self._generators.items():
            if name == adapter:
                generator.manual_seed(self._stream_seed(name, device))

    def seed(self, adapter: str, seed: int) -> None:
        """(Re)start ``adapter``'s streams from ``seed``."""
        self._seeds[adapter] = seed
        self._passes.pop(adapter, None)
        for key in [k for k in self._generators if k[0] == adapter]:
            del self._generators[key]

    def forget(self, adapter: str) -> None:
        """Drop ``adapter``'s seed and streams (the adapter was removed)."""
        self.seed(adapter, DEFAULT_SEED)
        del self._seeds[adapter]

    def get(self, adapter: str, device: torch.device) -> torch.Generator:
        """``adapter``'s generator on ``device`` (created from the adapter's seed)."""
        device = torch.device(device)  # a tensor's device: always indexed on CUDA
        key = (adapter, device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._stream_seed(adapter, device))
            self._generators[key] = generator
        return generator

    def get_state(self) -> dict[tuple[str, torch.device], torch.Tensor]:
        """Every existing stream's state (for gradient checkpointing's recomputation)."""
        return {key: g.get_state() for key, g in self._generators.items()}

    def set_state(self, state: dict[tuple[str, torch.device], torch.Tensor]) -> None:
        """Put the streams back as ``get_state`` found them; streams born since are dropped."""
        for key in [k for k in self._generators if k not in state]:
            del self._generators[key]
        for key, value in state.items():
            generator = self._generators.get(key)
            if generator is None:
                generator = self._generators[key] = torch.Generator(device=key[1])
            generator.set_state(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"ADAPTER/DEVICE": state}`` of every stream, for a checkpoint file."""
        return {f"{name}/{device}": g.get_state() for (name, device), g in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore streams saved by ``state_dict`` (adapters absent from it start fresh)."""
        restored = {}
        for key, value in state.items():
            name, device = key.rsplit("/", 1)
            restored[(name, torch.device(device))] = value
        self.set_state(restored)


KEEP_LEVELS = 1 << 16
"""Dropout draws are 16-bit: a unit is kept when its draw is below round((1 - p) * 2**16)."""


def keep_levels(p: float) -> int:
    """``K = round((1 - p) * 2**16)`` (at least 1): a unit is kept when its 16-bit draw is
    below it."""
    return max(1, round((1 - p) * KEEP_LEVELS))


def keep_scale(p: float) -> float:
    """The multiplier of a kept unit, ``2**16 / K``: the inverse of the keep rate used."""
    return KEEP_LEVELS / keep_levels(p)


def draw_keep_mask(
    shape: torch.Size, p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(shape) bool: True where a unit is kept, with probability ``K / 2**16`` (``keep_levels``).

    Why not ``bernoulli_``: on CPU it costs one generator call per element. Here one 64-bit
    ``random_`` word over the whole int64 range gives four 16-bit draws, about 4x cheaper on
    CPU, on any device, from the adapter's own generator; every step after the draw is one
    contiguous elementwise pass (picking three lanes of four cost as much as drawing).
    """
    kept = keep_levels(p)
    n = shape.numel()
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits uniform
    draws = words.view(torch.int16)[:n]  # little-endian: draw j of a word is its bits 16j..16j+15
    # int16 holds the 16 bits b signed; flipping the sign bit orders them as b - 2**15
    return ((draws ^ -(KEEP_LEVELS // 2)) < kept - KEEP_LEVELS // 2).view(shape)


def fill_keep(out: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` with inverted-dropout multipliers: 0, or ``keep_scale(p)`` where
    ``draw_keep_mask`` keeps the unit (within 8e-6 of 1 - p; unbiased: the scale is the
    inverse of the rate actually used)."""
    keep = draw_keep_mask(out.shape, p, generator, out.device)
    return out.copy_(keep).mul_(keep_scale(p))


@dataclass(frozen=True)
class RealRows:
    """Where a segment's real (non-padding) tokens are: noise is drawn for them alone.

    Attributes:
        index: (n,) position of each of the segment's tokens among its real tokens (padding:
            any valid index, its noise is never used).
        count: real tokens of the segment.
        window: ``(before, total)``: the segment is one rank's share of a micro-batch of
            ``total`` real tokens, starting at token ``before`` (data parallel). Noise is drawn
            for all ``total`` and the segment keeps its own, so the sharding changes no mask.
    """

    index: torch.Tensor
    count: int
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class SegmentRandom:
    """One adapter's random stream over one segment's tokens.

    Noise is drawn for the real tokens only, in order, and spread over the segment's rows, so an
    adapter's masks do not depend on how much padding the batch put inside its segment (which
    depends on the other adapters of the step).
    """

    generator: torch.Generator | None
    rows: RealRows | None = None
    window: tuple[int, int] | None = None  # canonical tokens that are one rank's share: plain()

    def _spread(
        self, like: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.rows is None:
            if self.window is None:
                return fill(like.new_empty(like.shape))
            before, total = self.window  # draw for the whole micro-batch, keep this rank's part
            drawn = fill(like.new_empty((total, *like.shape[1:])))
            return drawn[before : before + like.shape[0]]
        before, count = (0, self.rows.count) if self.rows.window is None else self.rows.window
        drawn = fill(like.new_empty((count, *like.shape[1:])))
        return drawn.index_select(0, self.rows.index + before if before else self.rows.index)

    def canonical_order(self, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(count,) where each real token sits, in canonical order; None: already canonical.

        Layers that draw per routed token (MoE experts) gather their real tokens in this order,
        draw with ``plain()`` and scatter back, so neither padding nor packing order reaches
        their draws. Device-side (no host sync); padding goes to a spare slot that is cut off.
        """
        if self.rows is None:
            return None
        index, count = self.rows.index, self.rows.count
        if token_mask is not None:
            index = torch.where(token_mask, index, count)
        where = torch.arange(index.numel(), device=index.device)
        return index.new_empty(count + 1).scatter_(0, index, where)[:count]

    def plain(self) -> SegmentRandom:
        """The same stream for the segment's real tokens already in canonical order (as
        ``canonical_order`` gives them): no spread, but a data-parallel window is kept, so
        per-token draws (router jitter, FFN dropout) are those of one process."""
        window = None if self.rows is None else self.rows.window
        return SegmentRandom(self.generator, window=window)

    def stream(self) -> SegmentRandom:
        """The bare stream: draws in call order for tensors that are not the segment's tokens
        (MoE (token, expert) pairs grouped by expert; their order depends on the sharding)."""
        return SegmentRandom(self.generator)

    def keep(self, like: torch.Tensor, p: float) -> torch.Tensor:
        """Inverted-dropout multipliers shaped like ``like``: 0, or the inverse keep rate
        (see ``fill_keep``)."""
        return self._spread(like, lambda t: fill_keep(t, p, self.generator))

    def keep_mask(self, like: torch.Tensor, p: float) -> torch.Tensor:
        """The draws of ``keep`` as a bool mask shaped like ``like`` (1 byte a unit, not 4): True
        where kept. ``keep`` equals ``keep_mask(...) * keep_scale(p)``, the same draws."""
        flags = torch.empty(like.shape, dtype=torch.bool, device=like.device)
        return self._spread(flags, lambda t: draw_keep_mask(t.shape, p, self.generator, t.device))

    def uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Uniform noise in [low, high) shaped like ``like``."""
        return self._spread(like, lambda t: t.uniform_(low, high, generator=self.generator))
