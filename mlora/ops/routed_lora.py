"""Routed LoRA: each row of a batch through the LoRA of its own expert, with no host sync.

The math, exactly. Given ``x`` of shape (P, in) (the (token, expert) pairs of a mixture-of-LoRA
layer, grouped by expert), ``experts`` (P,) the expert of each row in ascending order, and per
expert ``A_e`` (r_e, in), ``B_e`` (out, r_e) and a Python float scale ``s_e``::

    delta[p] = s_e * (x[p] @ A_e.T) @ B_e.T      with e = experts[p]

Unlike ``segmented_lora`` (adapters' segments, known on the host), how many rows each expert
gets is decided by a router on the device; reading those counts back would stall the host once
per layer. Implementations (``impl=``), all tested equal to ``loop``:

- ``loop``: the reference; reads the counts on the host and runs each expert on its rows.
- ``grouped``: ``grouped_mm`` over the rank-padded, stacked weights with the group offsets
  computed on the device (``cumsum`` of a ``bincount``): no sync where ``grouped_supported``.
- ``masked``: one LoRA of rank ``sum r_e``: ``h = x @ [A_1; ...; A_E].T``, each row keeps only
  its expert's block of ``h``, then ``h @ [s_1 B_1, ..., s_E B_E].T``. Exact (the other blocks
  contribute exact zeros), no sync, E times the (small) LoRA FLOPs; rows need not be sorted.
- ``auto``: ``grouped`` where supported; else ``loop`` on CPU (a "sync" is free there) and
  ``masked`` on accelerators (``resolve_impl``).

The implementation is chosen per call; the MoE modules hold theirs as an attribute
(``routed_impl``, "auto" unless a test pins one), never as a module-level switch.

``RoutedPairs`` is the one dispatch every MoE kind with a router shares (MoLA's LoRAs in a
linear, MixLoRA's FFN experts): (token, slot) pairs grouped by expert, gathered from per-token
tensors, run through ``routed_lora`` and summed back per token with their routing weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlora.ops.segmented_lora import grouped_mm, grouped_supported, host_to_device

IMPLS = ("loop", "grouped", "masked", "auto")


def group_by_expert(
    slot_expert: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot) pairs grouped by expert: the one grouping every MoE kind uses.

    Args:
        slot_expert: (N*k,) the expert of each pair ``token * k + slot`` (an index past the
            last expert groups pairs that go nowhere, last).
        k: slots per token.

    Returns:
        ``order`` (N*k,) the pairs sorted by expert (stable: token order within an expert),
        ``token`` (N*k,) the token of each sorted pair, ``expert`` (N*k,) its expert.
    """
    order = torch.argsort(slot_expert, stable=True)
    return order, order // k, slot_expert.index_select(0, order)


@dataclass(frozen=True)
class RoutedPairs:
    """The (token, slot) pairs of n tokens with k slots each, grouped by expert: what every MoE
    kind runs its experts over (MoLA's LoRAs in a linear, MixLoRA's FFN experts).

    A pair's rows are gathered from per-token tensors (``gather``), run through the experts
    (``routed_lora`` per LoRA, on ``expert``), and summed back per token with their routing
    weights (``combine``).

    Attributes:
        order: (P,) each sorted pair's index ``token * k + slot`` (per-pair draws follow it).
        token: (P,) its token.
        expert: (P,) its expert, ascending; an index past the last expert (pairs that go
            nowhere, or to a pseudo-expert) sorts last.
        weight: (P,) its routing weight.
        tokens: n.
        slots: k.
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    tokens: int
    slots: int

    @classmethod
    def group(cls, slot_expert: torch.Tensor, slot_weight: torch.Tensor, slots: int) -> RoutedPairs:
        """Pairs from (n*k,) ``slot_expert`` and ``slot_weight`` of pairs ``token * k + slot``
        (``group_by_expert``: stable, token order within an expert)."""
        order, token, expert = group_by_expert(slot_expert, slots)
        weight = slot_weight.index_select(0, order)
        return cls(order, token, expert, weight, slot_expert.numel() // slots, slots)

    def first(self, count: int) -> RoutedPairs:
        """The first ``count`` pairs: those whose experts come before the pairs cut off."""
        cut = slice(0, count)
        return RoutedPairs(
            self.order[cut],
            self.token[cut],
            self.expert[cut],
            self.weight[cut],
            self.tokens,
            self.slots,
        )

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """(P, ...) each pair's row of the (n, ...) ``per_token``."""
        return per_token.index_select(0, self.token)

    def combine(self, per_pair: torch.Tensor) -> torch.Tensor:
        """(n, d) each token's routing-weighted sum of its pairs' (P, d) rows, at least fp32."""
        dtype = torch.promote_types(per_pair.dtype, torch.float32)
        weighted = per_pair.to(dtype) * self.weight.to(dtype)[:, None]
        out = per_pair.new_zeros(self.tokens, per_pair.shape[1], dtype=dtype)
        return out.index_add(0, self.token, weighted)


def routed_lora(
    x: torch.Tensor,
    experts: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
    impl: str = "auto",
) -> torch.Tensor:
    """(P, out) LoRA delta of each row through its expert's LoRA (see the module docstring).

    Args:
        x: (P, in) rows, cast to the weights' dtype.
        experts: (P,) long, the expert of each row, ascending (``masked`` allows any order).
        lora_a: E tensors (r_e, in); lora_b: E tensors (out, r_e); scales: E floats.
        impl: one of ``IMPLS`` (see ``resolve_impl``).
    """
    x = x.to(lora_a[0].dtype)
    chosen = resolve_impl(impl, x, lora_a, lora_b)
    if chosen == "loop":
        return _loop(x, experts, lora_a, lora_b, scales)
    if chosen == "grouped":
        return _grouped(x, experts, lora_a, lora_b, scales)
    return _masked(x, experts, lora_a, lora_b, scales)


def resolve_impl(
    impl: str, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]
) -> str:
    """The implementation ``routed_lora`` runs for ``impl`` on these tensors.

    Args:
        impl: one of ``IMPLS``; "auto" picks "grouped" where ``grouped_supported``, else
            "loop" on the CPU (reading counts back costs nothing there) and "masked" elsewhere.
        x: (P, in) rows in the weights' dtype; lora_a: E (r_e, in); lora_b: E (out, r_e).

    Returns:
        "loop", "grouped" or "masked".

    Raises:
        ValueError: an unknown ``impl``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown routed LoRA impl {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    if grouped_supported(x, lora_a, lora_b):
        return "grouped"
    return "loop" if x.device.type == "cpu" else "masked"


def _loop(
    x: torch.Tensor,
    experts: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    counts = torch.bincount(experts, minlength=len(lora_a)).tolist()  # the host read
    pieces = [
        scale * ((rows @ a.T) @ b.T)
        for rows, a, b, scale in zip(x.split(counts), lora_a, lora_b, scales, strict=True)
    ]
    return torch.cat(pieces)


def _grouped(
    x: torch.Tensor,
    experts: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    alignment = 16 // x.dtype.itemsize  # grouped_mm's stride rule for the (P, r) intermediate
    r_pad = -(-max(a.shape[0] for a in lora_a) // alignment) * alignment
    weight_a = torch.stack([F.pad(a, (0, 0, 0, r_pad - a.shape[0])) for a in lora_a])
    weight_b = torch.stack(
        [scale * F.pad(b, (0, r_pad - b.shape[1])) for b, scale in zip(lora_b, scales, strict=True)]
    )  # (E, out, r_pad), the scale folded in
    offs = torch.bincount(experts, minlength=len(lora_a)).cumsum(0).to(torch.int32)
    hidden = grouped_mm(x.contiguous(), weight_a.mT, offs=offs)  # (P, r_pad)
    delta = grouped_mm(hidden, weight_b.mT, offs=offs)  # (P, out)
    if delta.requires_grad:  # grouped_mm's backward rejects stride-0 incoming gradients
        delta.register_hook(torch.Tensor.contiguous)
    return delta


def _masked(
    x: torch.Tensor,
    experts: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    one_hot = F.one_hot(experts, len(lora_a)).to(x.dtype)  # (P, E): each row keeps its block
    return weighted_lora(x, one_hot, lora_a, lora_b, scales)


def weighted_lora(
    x: torch.Tensor,
    weights: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """(N, out) ``sum_e weights[:, e] * s_e * (x @ A_e.T) @ B_e.T`` as one LoRA of rank
    ``sum r_e`` whose rank blocks the weights scale: a dense mixture of LoRA experts (LoRAMoE)
    in two matmuls, and ``masked`` routing with one-hot weights.

    Args:
        x: (N, in) rows in the weights' dtype.
        weights: (N, E) per-row expert weights (router probabilities, or one-hot).
        lora_a: E tensors (r_e, in); lora_b: E tensors (out, r_e); scales: E floats.
    """
    ranks = [a.shape[0] for a in lora_a]
    owner = [e for e, r in enumerate(ranks) for _ in range(r)]
    block_expert = host_to_device(owner, torch.long, x.device)  # (sum r,) owner of h's columns
    hidden = x @ torch.cat(list(lora_a)).T  # (N, sum r)
    hidden = hidden * weights.index_select(1, block_expert).to(hidden.dtype)
    stacked_b = torch.cat([scale * b for b, scale in zip(lora_b, scales, strict=True)], dim=1)
    return hidden @ stacked_b.T  # (N, out)
