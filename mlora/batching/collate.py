"""Collate rows of several adapters into one step batch with its token layout.

Three forms, the same layout semantics (token offsets over the flattened ``(rows, width)`` pass):

stream
    every row of the step end to end in one batch row, in group order: no padding at all.
    ``position_ids`` restart per row, ``sequences`` gives each row's token range, and the model
    must attend per row (``mlora.ops.varlen_attention``, chosen by
    ``mlora.batching.packing.use_stream`` where a probe finds it exact): rows never see each
    other, so this is as isolated as bins.
packed
    each adapter's rows fill bins of the step's longest row (first fit decreasing); a bin is one
    row of the batch, with ``position_ids`` restarting at 0 for every packed row and no
    attention mask, so transformers keeps the packed rows apart (a block-diagonal causal mask
    for sdpa / eager / flex, flash-attention's varlen path). Bins never mix adapters: a
    non-finite activation of one adapter cannot reach another's through attention (masked
    attention still multiplies 0 by the masked values), and attention costs no more than the
    padded batch (a bin is no wider than the longest row). Only bin tails are padding; they
    sit after every real token of their bin, so causal attention never lets a real token see
    them. (An all-ones mask or a KV cache would let packed rows attend to each other: never
    pass one.)
padded
    one row per batch row, right-padded to the longest row, with an attention mask.

Label bookkeeping (which flattened positions carry a next-token label, and which segment owns
them) is computed here on the host, so the training step itself never syncs with the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora.batching.dispatcher import MicroBatchShard
from mlora.batching.layout import BatchLayout, PassState
from mlora.data.rows import IGNORE_INDEX, TokenizedRow


@dataclass
class LossBatch:
    """One pass's tensors on the model's device; label indices are prepared on the host.

    Attributes:
        input_ids: (bins, W) packed or (B, T) padded.
        attention_mask: (B, T) padded; None packed.
        position_ids: (bins, W) packed (restarting at 0 per packed row); None padded.
        layout: token layout of the pass (segment ``i`` = group ``i`` of ``collate``).
        head_layout: token layout over the gathered supervised positions (for ``lm_head``).
        positions: (N,) flat token index of each position whose next token is supervised,
            grouped by segment.
        targets: (N,) the supervised next tokens.
        owners: (N,) segment index of each supervised position.
        position_rows: (N,) row (in collate order) of each supervised position.
        token_counts: (S,) supervised tokens per segment (float).
        token_mask: (tokens,) bool, real tokens; None when every token is real.
        token_rows: (tokens,) row of every token of the pass (-1 at padding).
        token_real_index: (tokens,) each token's canonical index among its segment's real
            tokens (``canonical_token_index``), so random draws skip padding and ignore the
            packing order (``mlora.batching.randomness.RealRows``); None: no padding, rows in order.
        head_real_index: (N,) each supervised position's canonical index among its segment's
            supervised positions, for the ``lm_head`` pass (as ``token_real_index``); None
            when the positions are already in canonical order.
        padded_tokens: how many tokens of the pass are padding.
        token_tasks: (tokens,) long, the task label of every token's row (MeteoRA's gate loss;
            -1 at padding and unlabelled rows); None when no row has one.
        sequences: one stream (``collate(stream=True)``): each row's ``(start, end)`` token
            range, for per-row attention; None in bins or padded rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    layout: BatchLayout
    head_layout: BatchLayout
    positions: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    position_rows: torch.Tensor
    token_counts: torch.Tensor
    token_mask: torch.Tensor | None
    token_rows: torch.Tensor
    token_real_index: torch.Tensor | None
    head_real_index: torch.Tensor | None
    padded_tokens: int
    token_tasks: torch.Tensor | None = None
    sequences: tuple[tuple[int, int], ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def pass_state(self) -> PassState:
        """The state the layers read during this batch's backbone pass (forward, backward)."""
        return PassState(
            self.layout, self.token_mask, self.token_rows, self.token_real_index, self.token_tasks
        )

    def head_pass_state(self) -> PassState:
        """The state of the ``lm_head`` pass over the gathered supervised positions."""
        return PassState(self.head_layout, token_real_index=self.head_real_index)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows into bins of at most ``capacity`` tokens: first fit, longest rows first.

    First-fit decreasing leaves far less padding than filling bins in row order when lengths
    are long-tailed (a few long rows, many short ones). The order it puts rows in does not
    matter to the math: random draws and expert dispatch follow each token's *canonical*
    index (``canonical_token_index``), the place it has when the segment's rows are laid end
    to end in their given order, so an adapter's masks do not depend on the other adapters of
    the step (which set ``capacity``: the step's longest row) nor on this packing.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in order
        length = lengths[i]
        for k, left in enumerate(room):
            if length <= left:
                bins[k].append(i)
                room[k] -= length
                break
        else:
            bins.append([i])
            room.append(capacity - length)
    return bins


def canonical_token_index(
    token_rows: torch.Tensor,
    positions_in_row: torch.Tensor,
    lengths: Sequence[int],
    segment_of_row: Sequence[int],
) -> torch.Tensor:
    """(tokens,) each real token's index among its segment's real tokens in row order.

    Row ``i`` of a segment starts at the summed lengths of the segment's earlier rows (rows in
    the order given to ``collate``); padding (row -1) gets 0, its draws are never used.
    """
    starts: list[int] = []
    cursor, previous = 0, None
    for length, segment in zip(lengths, segment_of_row, strict=True):
        if segment != previous:
            cursor, previous = 0, segment
        starts.append(cursor)
        cursor += length
    row_start = torch.tensor(starts, dtype=torch.long)
    real = token_rows >= 0
    return torch.where(real, row_start[token_rows.clamp_min(0)] + positions_in_row, 0)


def _segment_numbers(names: Sequence[str | None]) -> list[int]:
    """The layout segment of each group: consecutive groups of one adapter share a segment
    (``BatchLayout.from_lengths`` merges them); base-model groups are each their own."""
    numbers: list[int] = []
    for g, name in enumerate(names):
        same = g > 0 and name is not None and names[g - 1] == name
        numbers.append(numbers[-1] if same else (numbers[-1] + 1 if numbers else 0))
    return numbers


def _rank_within_segments(keys: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Each entry's rank by ``keys`` among the entries of its segment (``segments`` ascending,
    keys unique within a segment)."""
    order = torch.argsort(segments * (int(keys.max()) + 1 if keys.numel() else 1) + keys)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    first = torch.searchsorted(segments, segments)  # index of each segment's first entry
    return rank - first


def collate(
    groups: Sequence[tuple[str | None, Sequence[TokenizedRow]]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    packed: bool = True,
    shards: Sequence[MicroBatchShard] | None = None,
    stream: bool = False,
) -> LossBatch:
    """Put the rows of each ``(adapter, rows)`` group into one batch, groups contiguous.

    Args:
        groups: the rows of each segment, in segment order (adapter None: the base model).
        pad_token_id: fills padded positions.
        device: where the tensors go.
        packed: pack each group's rows into bins (default), or one padded row per row.
        stream: with ``packed``: every row end to end in one batch row, no padding at all; the
            model must attend per row (``mlora.ops.varlen_attention``, ``LossBatch.sequences``).
        shards: data parallel: group ``i`` is this rank's share ``shards[i]`` of a micro-batch
            (one group per adapter). Each adapter's noise is then drawn for the whole
            micro-batch (tokens, and supervised positions for ``lm_head``) and each token takes
            its own, so the masks do not depend on the sharding. None: groups are whole.

    Returns:
        A ``LossBatch`` whose segment ``i`` is group ``i``; ``position_rows`` count rows in
        the order given.
    """
    rows = [row for _, group in groups for row in group]
    lengths = [len(row) for row in rows]
    stream = stream and packed
    width = sum(lengths) if stream else max(lengths)
    bins: list[list[int]] = [list(range(len(rows)))] if stream else []  # as indices into rows
    segment_tokens = [sum(len(r) for r in group) for _, group in groups] if stream else []
    first = 0
    for _, group in [] if stream else groups:
        sizes = [len(r) for r in group]
        local = pack_rows(sizes, width) if packed else [[i] for i in range(len(group))]
        bins += [[first + i for i in b] for b in local]
        segment_tokens.append(len(local) * width)
        first += len(group)
    total = width * len(bins)

    ids = torch.full((total,), pad_token_id, dtype=torch.long)
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    positions_in_row = torch.zeros(total, dtype=torch.long)
    token_rows = torch.full((total,), -1, dtype=torch.long)  # -1: padding
    token_tasks = torch.full((total,), -1, dtype=torch.long)  # -1: padding or no label
    for k, members in enumerate(bins):
        cursor = k * width
        for i in members:
            end = cursor + lengths[i]
            ids[cursor:end] = torch.tensor(rows[i].input_ids)
            labels[cursor:end] = torch.tensor(rows[i].labels)
            positions_in_row[cursor:end] = torch.arange(lengths[i])
            token_rows[cursor:end] = i
            token_tasks[cursor:end] = rows[i].task
            cursor = end
    real = token_rows >= 0
    # position t predicts token t+1 of the same row: supervised where that token has a label
    next_supervised = torch.zeros(total, dtype=torch.bool)
    next_supervised[:-1] = (labels[1:] != IGNORE_INDEX) & (token_rows[1:] == token_rows[:-1])
    positions = next_supervised.nonzero(as_tuple=True)[0]  # (N,) ascending: grouped by segment
    group_of_row = torch.tensor([g for g, (_, group) in enumerate(groups) for _ in group])
    position_rows = token_rows[positions]
    owners = group_of_row[position_rows]
    counts = torch.bincount(owners, minlength=len(groups))
    names = [name for name, _ in groups]
    real_counts = [sum(len(row) for row in group) for _, group in groups]
    windows = head_windows = None
    if shards is not None:
        windows = [(s.tokens_before, s.tokens_total) for s in shards]
        head_windows = [(s.supervised_before, s.supervised_total) for s in shards]
    layout = BatchLayout.from_lengths(
        list(zip(names, segment_tokens, strict=True)),
        real_counts,
        windows,
    )
    head_layout = BatchLayout.from_lengths(
        list(zip(names, counts.tolist(), strict=True)), windows=head_windows
    )
    move = {"device": device, "non_blocking": True}
    shape = (len(bins), width)
    padded_tokens = total - sum(lengths)
    real_index = head_index = None
    in_order = [i for b in bins for i in b] == list(range(len(rows)))
    if padded_tokens or not in_order or shards is not None:  # draws follow canonical indices
        segment_of_group = torch.tensor(_segment_numbers(names))
        segment_of_row = segment_of_group[group_of_row].tolist()
        real_index = canonical_token_index(token_rows, positions_in_row, lengths, segment_of_row)
        if not in_order or shards is not None:
            head_index = _rank_within_segments(real_index[positions], segment_of_group[owners])
    return LossBatch(
        input_ids=ids.view(shape).to(**move),
        # a stream passes an all-ones mask: transformers then builds none (rows are kept
        # apart by the attention function), where no mask would make it build a T x T one
        attention_mask=(
            torch.ones(shape, dtype=torch.long, device=device)
            if stream
            else None
            if packed
            else real.view(shape).long().to(**move)
        ),
        position_ids=positions_in_row.view(shape).to(**move) if packed else None,
        layout=layout,
        head_layout=head_layout,
        positions=positions.to(**move),
        targets=labels[positions + 1].to(**move),
        owners=owners.to(**move),
        position_rows=position_rows.to(**move),
        token_counts=counts.float().to(**move),
        token_mask=real.to(**move) if padded_tokens else None,
        token_rows=token_rows.to(**move),
        token_real_index=None if real_index is None else real_index.to(**move),
        head_real_index=None if head_index is None else head_index.to(**move),
        padded_tokens=padded_tokens,
        token_tasks=token_tasks.to(**move) if any(r.task >= 0 for r in rows) else None,
        sequences=_row_ranges(lengths) if stream else None,
    )


def _row_ranges(lengths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Each row's ``(start, end)`` token range when the rows lie end to end."""
    ends = list(itertools.accumulate(lengths))
    return tuple((end - n, end) for n, end in zip(lengths, ends, strict=True))
