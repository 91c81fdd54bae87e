"""Collate rows of several adapters into one padded step batch with its layout.

Label bookkeeping (which flattened positions carry a next-token label, and which segment owns
them) is computed here on the host, so the training step itself never syncs with the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlora.data import IGNORE_INDEX, TokenizedRow
from mlora.layout import BatchLayout
from mlora.model import LossBatch


def collate(
    groups: Sequence[tuple[str, Sequence[TokenizedRow]]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> LossBatch:
    """Right-pad the rows of each ``(adapter, rows)`` group into one batch, groups contiguous.

    Returns:
        A ``LossBatch`` whose segment ``i`` is group ``i``; token counts are per segment.
    """
    rows = [row for _, group in groups for row in group]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    owner_of_row = []
    for segment, (_, group) in enumerate(groups):
        owner_of_row += [segment] * len(group)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row.input_ids)
        attention_mask[b, : len(row)] = 1
        labels[b, : len(row)] = torch.tensor(row.labels)
    # position t predicts token t+1: supervised where labels[:, t+1] is set
    next_labels = labels[:, 1:]
    rows_idx, cols_idx = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)
    owners = torch.tensor(owner_of_row, dtype=torch.long)[rows_idx]
    counts = torch.bincount(owners, minlength=len(groups)).float()
    layout = BatchLayout.from_row_adapters([name for name, group in groups for _ in group])
    move = {"device": device, "non_blocking": True}
    return LossBatch(
        input_ids=input_ids.to(**move),
        attention_mask=attention_mask.to(**move),
        layout=layout,
        positions=(rows_idx * width + cols_idx).to(**move),
        targets=next_labels[rows_idx, cols_idx].to(**move),
        owners=owners.to(**move),
        token_counts=counts.to(**move),
    )
