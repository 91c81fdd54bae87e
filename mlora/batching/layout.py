"""The batch layout: which contiguous token segment of a pass belongs to which adapter.

A pass runs a flat sequence of tokens, ``[sum L, hidden]`` once the batch is flattened. Adapter
``i`` owns tokens ``[start_i, end_i)`` of it (``cu_tokens`` offsets). The same description
serves packed training batches (rows concatenated without padding), padded batches (a row of
width T owns tokens ``[b*T, (b+1)*T)``), the supervised positions gathered for ``lm_head`` (its
own layout, offsets = cumulative supervised counts) and generation. Tokens that no segment
covers run through the base model only.

Generation and ``MultiLoraModel.forward`` do not know T up front (prefill, then one token per
row per step): they give a *per-row* layout whose offsets count rows, and each layer expands it
by its own tokens per row (``BatchLayout.for_tokens``). A token layout applied to a pass of
another size is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace

import torch

from mlora.batching.aux_losses import AuxLossCollector
from mlora.batching.randomness import AdapterGenerators, RealRows, SegmentRandom


@dataclass(frozen=True)
class AdapterSegment:
    """Tokens ``[start, end)`` of the pass use adapter ``adapter`` (rows, in a per-row layout).

    ``real``: how many of them are real tokens when the segment holds padding (host-known, so
    random draws can skip padding without a device sync); None: no padding, or unknown.
    ``window``: ``(before, total)`` when the segment's rows are one rank's contiguous share of a
    micro-batch (data parallel): draws are made for all ``total`` tokens of the micro-batch and
    this segment's are those from ``before`` on (``mlora.batching.randomness.RealRows``); None:
    whole.
    """

    adapter: str
    start: int
    end: int
    real: int | None = None
    window: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BatchLayout:
    """The segments of one pass of ``num_tokens`` tokens, in order and non-overlapping.

    Attributes:
        segments: one per adapter segment (an adapter may own several); empty segments allowed.
        num_tokens: tokens of the pass (rows, when ``per_row``).
        per_row: offsets count rows of equal width; layers expand them (``for_tokens``).
    """

    segments: tuple[AdapterSegment, ...]
    num_tokens: int
    per_row: bool = False

    def __post_init__(self) -> None:
        cursor = 0
        for seg in self.segments:
            if not cursor <= seg.start <= seg.end <= self.num_tokens:
                raise ValueError(
                    f"segments must be ordered, non-overlapping and within {self.num_tokens}"
                )
            cursor = seg.end

    @classmethod
    def from_row_adapters(cls, row_adapters: Sequence[str | None]) -> BatchLayout:
        """A per-row layout: consecutive rows with the same adapter (``None``: base model) form
        a segment; each layer expands it to its own tokens per row."""
        groups = [(name, 1) for name in row_adapters]
        return cls._from_groups(groups, per_row=True)

    @classmethod
    def from_lengths(
        cls,
        groups: Sequence[tuple[str | None, int]],
        real: Sequence[int] | None = None,
        windows: Sequence[tuple[int, int]] | None = None,
    ) -> BatchLayout:
        """A token layout from consecutive ``(adapter or None, tokens)`` groups, with each
        group's real (non-padding) token count when some groups hold padding, and each group's
        draw window (``AdapterSegment.window``) when groups are shares of micro-batches (one
        group per adapter then)."""
        layout = cls._from_groups(groups, per_row=False, real=real)
        if windows is None:
            return layout
        named = [w for (name, _), w in zip(groups, windows, strict=True) if name is not None]
        segments = tuple(
            replace(seg, window=w) for seg, w in zip(layout.segments, named, strict=True)
        )
        return cls(segments, layout.num_tokens)

    @classmethod
    def _from_groups(
        cls,
        groups: Sequence[tuple[str | None, int]],
        per_row: bool,
        real: Sequence[int] | None = None,
    ) -> BatchLayout:
        segments: list[AdapterSegment] = []
        cursor = 0
        for i, (name, size) in enumerate(groups):
            count = size if real is None else real[i]
            if name is not None:
                if segments and segments[-1].adapter == name and segments[-1].end == cursor:
                    previous = segments.pop()
                    start, count = previous.start, count + (previous.real or previous.size)
                else:
                    start = cursor
                end = cursor + size
                padded = real is not None and count != end - start
                segments.append(AdapterSegment(name, start, end, count if padded else None))
            cursor += size
        return cls(tuple(segments), cursor, per_row)

    @property
    def adapters(self) -> list[str]:
        return [seg.adapter for seg in self.segments]

    def for_tokens(self, num_tokens: int) -> BatchLayout:
        """This layout over a pass of ``num_tokens`` tokens.

        Raises:
            ValueError: a token layout of another size, or a per-row layout whose rows do not
                divide ``num_tokens``.
        """
        if not self.per_row:
            if num_tokens != self.num_tokens:
                raise ValueError(f"a layout of {self.num_tokens} tokens met {num_tokens} tokens")
            return self
        if self.num_tokens == 0 or num_tokens % self.num_tokens:
            raise ValueError(f"a layout of {self.num_tokens} rows met {num_tokens} tokens")
        width = num_tokens // self.num_tokens
        return BatchLayout(
            tuple(AdapterSegment(s.adapter, s.start * width, s.end * width) for s in self.segments),
            num_tokens,
        )


@dataclass(frozen=True)
class PassState:
    """What one pass gives the adapter-aware layers: its layout and per-token data.

    Built once per pass and never changed; ``LayoutContext.install`` makes it the state the
    layers read for the forward and the backward (activation recompute installs it again), so
    no field can outlive its layout or leak into another pass.

    Attributes:
        layout: the segments of the pass; None: every token runs the base model only.
        token_mask: (N,) bool, True at real (non-padding) tokens; None: all tokens are real.
        token_rows: (N,) long, the row of each token (packed rows have different lengths);
            None: unknown.
        token_real_index: (N,) long, each token's canonical index among its segment's real
            tokens (``RealRows``); None: the segment order is canonical.
        token_tasks: (N,) long, each token's task label for MeteoRA's gate loss (-1: none);
            None: no labels.
    """

    layout: BatchLayout | None = None
    token_mask: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None
    token_real_index: torch.Tensor | None = None
    token_tasks: torch.Tensor | None = None


NO_PASS = PassState()
"""The state between passes: no layout, so adapter-aware layers run the base model only."""


class LayoutContext:
    """The pass in flight, shared by every adapter-aware layer of one model.

    The pass's ``PassState`` is installed for a ``with`` block (``install``, or ``use`` from
    its fields) around the forward, and the trainer keeps it installed through the backward;
    gradient checkpointing captures it at a layer's forward and installs it again for the
    recomputation (``mlora.training.recompute``). The context also holds each adapter's random
    generators (dropout, router jitter: see ``mlora.batching.randomness``) and the router losses
    recorded during the pass (``aux_losses``).
    """

    def __init__(self) -> None:
        self._state: PassState = NO_PASS
        self.aux_losses = AuxLossCollector()
        self.generators = AdapterGenerators()
        self._expanded: tuple[BatchLayout, BatchLayout] | None = None  # (per-row, expanded)

    @contextmanager
    def install(self, state: PassState) -> Iterator[PassState]:
        """Make ``state`` the pass the layers read inside the block, then put back the one
        installed before (blocks nest: MixLoRA runs its other tokens under a state of theirs)."""
        previous = self._state
        self._state = state
        try:
            yield state
        finally:
            self._state = previous

    def use(
        self,
        layout: BatchLayout | None,
        token_mask: torch.Tensor | None = None,
        token_rows: torch.Tensor | None = None,
        token_real_index: torch.Tensor | None = None,
        token_tasks: torch.Tensor | None = None,
    ) -> AbstractContextManager[PassState]:
        """``install`` a ``PassState`` of these fields (a layout alone: generation, tests)."""
        return self.install(
            PassState(layout, token_mask, token_rows, token_real_index, token_tasks)
        )

    @property
    def state(self) -> PassState:
        """The pass installed now (``NO_PASS`` between passes)."""
        return self._state

    @property
    def layout(self) -> BatchLayout | None:
        return self.state.layout

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self.state.token_mask

    @property
    def token_rows(self) -> torch.Tensor | None:
        return self.state.token_rows

    @property
    def token_real_index(self) -> torch.Tensor | None:
        return self.state.token_real_index

    @property
    def token_tasks(self) -> torch.Tensor | None:
        return self.state.token_tasks

    def layout_for(self, num_tokens: int) -> BatchLayout | None:
        """The current layout over a layer input of ``num_tokens`` tokens, or None.

        A per-row layout's expansion is cached for the pass: every layer asks the same.
        """
        layout = self.layout
        if layout is None or not layout.per_row:
            return None if layout is None else layout.for_tokens(num_tokens)
        cached = self._expanded
        if cached is None or cached[0] is not layout or cached[1].num_tokens != num_tokens:
            cached = self._expanded = (layout, layout.for_tokens(num_tokens))
        return cached[1]

    def segment_token_mask(self, seg: AdapterSegment, num_tokens: int) -> torch.Tensor | None:
        """Real-token mask of token segment ``seg`` of a pass of ``num_tokens``, or None (all
        tokens real). ``seg`` comes from ``layout_for(num_tokens)``."""
        return self._segment_slice(self.token_mask, seg, num_tokens)

    def segment_token_tasks(self, seg: AdapterSegment, num_tokens: int) -> torch.Tensor | None:
        """Task label of each token of segment ``seg`` (as ``segment_token_mask``), or None."""
        return self._segment_slice(self.token_tasks, seg, num_tokens)

    def segment_token_rows(
        self, seg: AdapterSegment, num_tokens: int, device: torch.device
    ) -> torch.Tensor | None:
        """Row index of each token of segment ``seg`` (as ``segment_token_mask``), or None
        (the segment is one row). Per-row layouts derive it from the row width."""
        if self.token_rows is None and self.layout is not None and self.layout.per_row:
            width = num_tokens // self.layout.num_tokens
            return torch.arange(seg.start, seg.end, device=device) // width
        return self._segment_slice(self.token_rows, seg, num_tokens)

    def segment_random(
        self, seg: AdapterSegment, num_tokens: int, device: torch.device
    ) -> SegmentRandom:
        """Adapter ``seg.adapter``'s random stream over segment ``seg``: draws are made for its
        real tokens in canonical order (rows end to end, as given to collate) and spread to
        where packing put each token, so padding and packing never change them."""
        generator = self.generators.get(seg.adapter, device)
        index = self._segment_slice(self.token_real_index, seg, num_tokens)
        if index is None:
            return SegmentRandom(generator)
        count = seg.size if seg.real is None else seg.real
        return SegmentRandom(generator, RealRows(index, count, seg.window))

    @staticmethod
    def _segment_slice(
        per_token: torch.Tensor | None, seg: AdapterSegment, num_tokens: int
    ) -> torch.Tensor | None:
        if per_token is None:
            return None
        assert per_token.numel() == num_tokens, "per-token data of another pass"
        return per_token[seg.start : seg.end]
