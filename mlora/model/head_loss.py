"""The head's per-token loss without the full logits, where the head allows it.

``MultiLoraModel.token_losses`` asks ``chunked_head_losses`` first; None means "compute the full
logits as before": the budget is 0, or the head is something the chunked op does not cover
(a quantized or sharded weight, a DoRA or MoE adapter on ``lm_head``). A plain ``nn.Linear``
head and one wrapped by ``MultiLoraLinear`` with plain LoRA adapters are covered; the LoRA
part enters as low-rank terms (``MultiLoraLinear.low_rank_terms``, the layer's own dropout).
On CUDA a head without LoRA terms uses Liger's kernel where installed (it sizes its own chunks).
"""

from __future__ import annotations

import torch
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.ops.linear_cross_entropy import (
    LowRankTerm,
    chunk_rows,
    liger_linear_cross_entropy,
    linear_cross_entropy,
)


def chunked_head_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_mb: float,
    softcap: float | None = None,
) -> torch.Tensor | None:
    """(N,) per-token cross-entropy of ``head(hidden)`` computed in row chunks, or None.

    Args:
        head: the model's output embedding (``lm_head``), wrapped or not; a wrapped head
            reads the layout that is set on its context for ``hidden``.
        hidden: (N, H) hidden states of the supervised positions.
        targets: (N,) next-token ids.
        chunk_mb: memory budget of one chunk's fp32 logits in MiB; 0 or less: None.
        softcap: the model's ``final_logit_softcapping``.
    """
    if chunk_mb <= 0 or hidden.shape[0] == 0:
        return None
    base = head.base_layer if isinstance(head, MultiLoraLinear) else head
    if type(base) is not nn.Linear or not _plain_weight(base.weight):
        return None
    terms: list[LowRankTerm] = []
    if isinstance(head, MultiLoraLinear):
        found = head.low_rank_terms(hidden)
        if found is None:
            return None
        terms = [
            LowRankTerm(seg.start, seg.end, u, head.adapters[seg.adapter].lora_B.weight)
            for seg, u in found
        ]
    if not terms:
        fused = liger_linear_cross_entropy(hidden, base.weight, targets, base.bias, softcap or None)
        if fused is not None:
            return fused
    rows = chunk_rows(chunk_mb, base.out_features)
    return linear_cross_entropy(
        hidden, base.weight, targets, rows, base.bias, terms, softcap or None
    )


def _plain_weight(weight: torch.Tensor) -> bool:
    """A dense floating weight (not bitsandbytes-quantized, not a DTensor shard)."""
    plain = type(weight) in (torch.Tensor, nn.Parameter)
    return plain and weight.is_floating_point() and getattr(weight, "quant_state", None) is None
