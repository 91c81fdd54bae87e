"""Attention over a stream of rows without padding: each row attends only to itself.

Packing into bins (``mlora.batching.packing``) still pads every bin to the step's longest row; with
few rows per adapter per step that padding stays large (23% on long-tailed SmolLM2 rows), and every
padded slot costs a full pass through the frozen base. The stream layout puts all of a step's
rows end to end in one batch row, so the linear layers see no padding at all, and attention runs
per row: transformers' own sdpa function on each row's slice, causal, with no mask. That is what
flash-attention's varlen kernels do on a GPU; this is the same contract for any device and for
every model that routes attention through transformers' ``AttentionInterface``.

The function is registered under ``VARLEN_ATTENTION``. Without the row boundaries (keyword
``SEQUENCES_KWARG``, a tuple of ``(start, end)`` per row) it is plain sdpa with the mask it is
given, so generation and padded evaluation on the same model behave exactly as under "sdpa".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import pairwise

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_ATTENTION = "mlora_varlen"
SEQUENCES_KWARG = "mlora_sequences"


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa per row of the stream.

    Args:
        query: (1, heads, T, D); key, value: (1, kv_heads, T, D), T the whole stream.
        attention_mask: ignored when the rows are given (the stream needs none).
        kwargs: ``SEQUENCES_KWARG``: the rows as ``(start, end)`` token ranges covering the
            stream in order; absent: plain sdpa.

    Returns:
        (1, T, heads, D) output, as transformers' attention functions return it, and no weights.
    """
    sequences: Sequence[tuple[int, int]] | None = kwargs.pop(SEQUENCES_KWARG, None)
    if sequences is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kwargs.pop("is_causal", None)  # every row is causal
    window = kwargs.get("sliding_window")  # set by sliding-window layers (Mistral, Qwen2, ...)
    lengths = _row_lengths(sequences, query.shape[2])
    outputs = []
    rows = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    for q, k, v in rows:  # each row's (1, heads, L, D) views
        band = _sliding_mask(q.shape[2], window, query.device)
        outputs.append(
            sdpa_attention_forward(
                module, q, k, v, band, dropout=dropout, scaling=scaling, is_causal=band is None,
                **kwargs,
            )[0]  # (1, L, heads, D)
        )  # fmt: skip
    return torch.cat(outputs, dim=1), None


def _row_lengths(sequences: Sequence[tuple[int, int]], total: int) -> list[int]:
    """Each row's length, for one ``split`` of q, k and v: its backward joins the rows'
    gradients in one ``cat``, where a slice per row would each allocate a zero gradient of the
    whole stream and copy its part in (rows x stream memory traffic).

    Raises:
        ValueError: the rows do not tile the stream in order (``collate`` always makes them so).
    """
    tiled = all(a[1] == b[0] for a, b in pairwise(sequences))
    if not (tiled and sequences[0][0] == 0 and sequences[-1][1] == total):
        raise ValueError(f"rows {list(sequences)} do not tile a stream of {total}")
    return [end - start for start, end in sequences]


def _sliding_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(1, 1, L, L) causal band: token i sees j in (i - window, i], as transformers' sliding
    window; None where the row is no longer than the window (plain causal)."""
    if window is None or length <= window:
        return None
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    return ((j <= i) & (j > i - window)).view(1, 1, length, length)


def streams_rows(hf_model: nn.Module) -> bool:
    """Whether ``hf_model`` attends per row of a stream (``mlora.batching.packing.use_stream``)."""
    return getattr(hf_model.config, "_attn_implementation", None) == VARLEN_ATTENTION


_STREAMING: ContextVar[bool] = ContextVar("mlora_streaming", default=False)


@contextmanager
def streaming() -> Iterator[None]:
    """A forward of one stream: transformers builds no attention mask (the rows are kept apart
    by ``varlen_attention``), so it never reads the mask back to decide whether it can skip it,
    a host sync on a GPU."""
    token = _STREAMING.set(True)
    try:
        yield
    finally:
        _STREAMING.reset(token)


def varlen_mask(*args, **kwargs) -> torch.Tensor | None:
    """sdpa's mask for padded calls; none inside ``streaming``."""
    return None if _STREAMING.get() else sdpa_mask(*args, **kwargs)


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, varlen_mask)
