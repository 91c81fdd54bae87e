"""Collate rows of several adapters into one step batch with its token layout.

Two forms, the same layout semantics (token offsets over the flattened ``(rows, width)`` pass):

packed
    each adapter's rows, in order, fill bins of the step's longest row (next fit); a bin is one
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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora.data import IGNORE_INDEX, TokenizedRow
from mlora.layout import BatchLayout


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
        token_real_index: (tokens,) each token's index among its segment's real tokens, so
            random draws skip padding (``mlora.randomness.RealRows``); None without padding.
        padded_tokens: how many tokens of the pass are padding.
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
    padded_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Consecutive rows into bins of at most ``capacity`` tokens (next fit, order kept).

    Keeping the order means a segment's real tokens come in the same order however much
    padding the bins leave, so the adapter's random draws (made for real tokens, in order) and
    expert dispatch order do not depend on the other adapters of the step (which set
    ``capacity``: the step's longest row).
    """
    bins: list[list[int]] = []
    room = 0
    for i, length in enumerate(lengths):
        if not bins or length > room:
            bins.append([])
            room = capacity
        bins[-1].append(i)
        room -= length
    return bins


def collate(
    groups: Sequence[tuple[str | None, Sequence[TokenizedRow]]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    packed: bool = True,
    windows: Sequence[tuple[int, int]] | None = None,
) -> LossBatch:
    """Put the rows of each ``(adapter, rows)`` group into one batch, groups contiguous.

    Args:
        groups: the rows of each segment, in segment order (adapter None: the base model).
        pad_token_id: fills padded positions.
        device: where the tensors go.
        packed: pack each group's rows into bins (default), or one padded row per row.
        windows: per group, ``(tokens before, tokens in all)`` when its rows are one rank's
            share of a larger micro-batch (data parallel): the adapter's noise is drawn for
            all the micro-batch's tokens and each token takes its own, so the masks do not
            depend on the sharding. None: each group is whole.

    Returns:
        A ``LossBatch`` whose segment ``i`` is group ``i``; ``position_rows`` count rows in
        the order given.
    """
    rows = [row for _, group in groups for row in group]
    lengths = [len(row) for row in rows]
    width = max(lengths)
    bins: list[list[int]] = []  # batch rows, as indices into ``rows``
    bins_per_group: list[int] = []
    first = 0
    for _, group in groups:
        sizes = [len(r) for r in group]
        local = pack_rows(sizes, width) if packed else [[i] for i in range(len(group))]
        bins += [[first + i for i in b] for b in local]
        bins_per_group.append(len(local))
        first += len(group)
    total = width * len(bins)

    ids = torch.full((total,), pad_token_id, dtype=torch.long)
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    positions_in_row = torch.zeros(total, dtype=torch.long)
    token_rows = torch.full((total,), -1, dtype=torch.long)  # -1: padding
    for k, members in enumerate(bins):
        cursor = k * width
        for i in members:
            end = cursor + lengths[i]
            ids[cursor:end] = torch.tensor(rows[i].input_ids)
            labels[cursor:end] = torch.tensor(rows[i].labels)
            positions_in_row[cursor:end] = torch.arange(lengths[i])
            token_rows[cursor:end] = i
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
    drawn = real_counts if windows is None else [total for _, total in windows]
    layout = BatchLayout.from_lengths(
        [(name, n * width) for name, n in zip(names, bins_per_group, strict=True)],
        drawn,
        keep_real=windows is not None,
    )
    head_layout = BatchLayout.from_lengths(list(zip(names, counts.tolist(), strict=True)))
    move = {"device": device, "non_blocking": True}
    shape = (len(bins), width)
    padded_tokens = total - sum(lengths)
    real_index = None
    if padded_tokens or windows is not None:  # each token's index among its segment's real
        group_of_token = torch.repeat_interleave(  # tokens (see RealRows)
            torch.arange(len(groups)), torch.tensor(bins_per_group) * width
        )
        before = torch.tensor([0, *real_counts[:-1]]).cumsum(0)  # real tokens before a group
        if windows is not None:  # ... among the whole micro-batch's tokens
            before -= torch.tensor([start for start, _ in windows])
        real_index = (real.long().cumsum(0) - 1 - before[group_of_token]).clamp_min(0)
    return LossBatch(
        input_ids=ids.view(shape).to(**move),
        attention_mask=None if packed else real.view(shape).long().to(**move),
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
        padded_tokens=padded_tokens,
    )
