"""Per-adapter auxiliary losses (MoE router losses) and router statistics of the pass in flight.

Mixture-of-experts adapters (MixLoRA's FFN experts, LoRAMoE / MoLA per-linear experts) add a
load-balancing or z-loss to their adapter's loss. A layer cannot return it through the base
model's forward, so every MoE module records it here, on the model's ``LayoutContext``
(``context.aux_losses``), keyed by adapter name:

    context.aux_losses.add(adapter, coef * loss)        # inside a module's forward (training)
    context.aux_losses.add_load(adapter, counts)        # (E,) tokens routed to each expert

``MultiLoraModel.segment_losses`` clears the collector before the backbone runs and adds each
adapter's summed aux loss to that adapter's segment loss afterwards, so the trainer minimises
``CE + aux`` per adapter and segments never mix. Loads are summed on the device across passes
until the trainer reads them for its log line (``take_loads``).

Data parallel (``use_global_stats``): a router loss is a mean over the whole micro-batch, whose
tokens are spread over the ranks. Each MoE module then records its router *sums* over this
rank's tokens instead (``add_stats``, a ``RouterStats``), the trainer sums the counts over all
ranks in one ``all_reduce`` (``reduce_stats``) and each rank adds the loss of its own sums under
the global counts (``router_loss``). With the expert fractions fixed (they carry no gradient)
the load-balancing loss is linear in the router probabilities, so the per-rank losses add up to
the one-process loss and so do their gradients; no collective runs inside the forward, so a
rank without rows of an adapter never blocks the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class RouterSlot(NamedTuple):
    """Where one MoE module's router sums for one adapter are recorded in a pass (data
    parallel): beside the adapters' losses, under a key of their own type."""

    adapter: str
    slot: int


SideKey = str | RouterSlot
"""The key of one side record of a pass: an adapter's aux loss (its name) or one module's
router sums (a ``RouterSlot``, a type of its own, so no adapter name can collide with it).
Both travel together through gradient checkpointing (``AuxLossCollector.capture``)."""


@dataclass(frozen=True)
class RouterStats:
    """One MoE module's router sums over this rank's real tokens of a segment (E experts).

    Attributes:
        values: (E + 2,) differentiable: each expert's router probability summed over tokens,
            then the summed z-loss term ``logsumexp(logits)^2``, then the summed gate CE.
        counts: (E + 2,) tokens that chose each expert (before any capacity), then real
            tokens, then tokens with a task label (MeteoRA's gate loss).
        coefs: weights of (``sum_e f_e * P_e``, mean z term, mean gate CE); the first includes
            the E factor of the load-balancing loss.
    """

    values: torch.Tensor
    counts: torch.Tensor
    coefs: tuple[float, float, float]

    @classmethod
    def balance(
        cls,
        probs: torch.Tensor,
        chosen: torch.Tensor,
        coef: float,
        z: torch.Tensor | None = None,
        z_coef: float = 0.0,
    ) -> RouterStats:
        """Load balancing (and the switch z-loss) over the (N, E) ``probs`` and multi-hot
        ``chosen`` of N real tokens; ``z``: (N,) ``logsumexp(logits)^2``."""
        zero = probs.new_zeros(1)
        z_sum = zero if z is None else z.sum().view(1)
        values = torch.cat([probs.sum(0), z_sum, zero])
        count = probs.new_full((1,), probs.shape[0])
        counts = torch.cat([chosen.to(probs.dtype).sum(0), count, zero])
        return cls(values, counts.detach(), (coef, z_coef, 0.0))

    @classmethod
    def gate(
        cls, num_experts: int, ce: torch.Tensor, labelled: torch.Tensor, coef: float
    ) -> RouterStats:
        """A gate cross-entropy mean: (T,) ``ce`` of each token, (T,) 0/1 fp32 ``labelled``."""
        zeros = ce.new_zeros(num_experts + 1)
        values = torch.cat([zeros, (ce * labelled).sum().view(1)])
        counts = torch.cat([zeros, labelled.sum().view(1)])
        return cls(values, counts.detach(), (0.0, 0.0, coef))


def router_loss(
    values: torch.Tensor, counts: torch.Tensor, coefs: tuple[float, float, float]
) -> torch.Tensor:
    """The coefficient-weighted router loss of sums ``values`` under (global) ``counts``:
    ``coef * sum_e f_e * P_e + z_coef * mean z + gate_coef * mean CE`` (see ``RouterStats``)."""
    experts = values.numel() - 2
    tokens, labelled = counts[experts].clamp_min(1), counts[experts + 1].clamp_min(1)
    balance, z_coef, gate_coef = coefs
    loss = values.new_zeros(())
    if balance:
        loss = loss + balance * ((counts[:experts] / tokens) * (values[:experts] / tokens)).sum()
    if z_coef:
        loss = loss + z_coef * values[experts] / tokens
    if gate_coef:
        loss = loss + gate_coef * values[experts + 1] / labelled
    return loss


class AuxLossCollector:
    """Aux losses of the current pass and routed-token counts since the last log, per adapter."""

    def __init__(self) -> None:
        self._losses: dict[SideKey, torch.Tensor] = {}
        self._loads: dict[str, torch.Tensor] = {}
        # data parallel: adapter -> ({id(module): slot}, E + 2); None: losses are recorded whole
        self._slots: dict[str, tuple[dict[int, int], int]] | None = None
        self._stat_counts: dict[RouterSlot, tuple[torch.Tensor, tuple[float, float, float]]] = {}

    def clear(self) -> None:
        """Forget the losses of the previous pass (loads are kept until ``take_loads``)."""
        self._losses.clear()
        self._stat_counts.clear()

    # --- data parallel: router sums, reduced over ranks ----------------------------------------

    @property
    def global_stats(self) -> bool:
        """MoE modules record ``RouterStats`` (``add_stats``) instead of losses."""
        return self._slots is not None

    def use_global_stats(self, slots: dict[str, tuple[dict[int, int], int]] | None) -> None:
        """Record router sums from now on (None: losses again): ``slots`` gives, per MoE
        adapter, each module's slot (``id(module)``: index, the same modules in the same order
        on every rank) and a slot's width E + 2."""
        self._slots = slots

    def add_stats(self, adapter: str, module: object, stats: RouterStats) -> None:
        """Record one module's router sums for ``adapter`` in this pass."""
        if self._slots is None:
            raise RuntimeError("router sums recorded while losses are recorded whole")
        key = RouterSlot(adapter, self._slots[adapter][0][id(module)])
        self.add(key, stats.values)  # the differentiable part rides with the losses
        self._stat_counts[key] = (stats.counts, stats.coefs)

    def reduce_stats(
        self,
        adapters: Sequence[str],
        like: torch.Tensor,
        all_reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Sum the router counts of ``adapters`` over all ranks (one collective) and return each
        adapter's router loss over its whole micro-batch from this rank's sums.

        Args:
            adapters: every adapter of the step, in the same order on every rank (a rank
                without rows of one, or without any row, still calls: it adds zeros).
            like: a tensor on the device of the counts.
            all_reduce: sums a list of fp32 tensors over ranks (``Distributed.all_reduce_flat``).

        Returns:
            ``{adapter: loss}`` for the adapters with router sums recorded on this rank.
        """
        slots = self._slots or {}
        keys = [
            (name, RouterSlot(name, i), slots[name][1])
            for name in adapters
            if name in slots
            for i in range(len(slots[name][0]))
        ]
        if not keys:
            return {}
        counts = [
            self._stat_counts[key][0].float()
            if key in self._stat_counts
            else like.new_zeros(width, dtype=torch.float32)
            for _, key, width in keys
        ]
        summed = all_reduce(counts)
        losses: dict[str, torch.Tensor] = {}
        for (name, key, _), total in zip(keys, summed, strict=True):
            values = self._losses.get(key)
            if values is None:
                continue
            loss = router_loss(values, total, self._stat_counts[key][1])
            losses[name] = loss if name not in losses else losses[name] + loss
        return losses

    def add(self, adapter: SideKey, loss: torch.Tensor) -> None:
        """Record a scalar aux loss (already multiplied by its coefficient) for ``adapter``
        (or, under a ``RouterSlot``, a module's differentiable router sums)."""
        loss = loss.float()
        previous = self._losses.get(adapter)
        self._losses[adapter] = loss if previous is None else previous + loss

    @contextlib.contextmanager
    def capture(self, keep_loads: bool = True) -> Iterator[dict[SideKey, torch.Tensor]]:
        """Record the losses added inside the block into the yielded dict, not into this pass.

        Gradient checkpointing (``mlora.training.recompute``) runs a layer without grad and again in
        backward; it captures the layer's losses both times and re-adds them with their gradient
        path. ``keep_loads=False`` drops the loads of the backward re-run (already counted once).
        """
        losses, loads = self._losses, self._loads
        self._losses = {}
        if not keep_loads:
            self._loads = {}
        try:
            yield self._losses
        finally:
            self._losses, self._loads = losses, loads

    def loss(self, adapter: str) -> torch.Tensor | None:
        """The summed aux loss recorded for ``adapter`` in this pass, or None."""
        return self._losses.get(adapter)

    def segment_losses(self, adapters: Sequence[str], like: torch.Tensor) -> torch.Tensor | None:
        """(S,) aux loss of each segment's adapter (0 where none), or None if nothing was recorded.

        Args:
            adapters: the adapter of each layout segment, in order.
            like: a tensor giving the device of the result.
        """
        if not self._losses:
            return None
        zero = like.new_zeros((), dtype=torch.float32)
        return torch.stack([self._losses.get(name, zero) for name in adapters])

    def add_load(self, adapter: str, counts: torch.Tensor) -> None:
        """Add (E,) routed-token counts of one MoE layer for ``adapter`` (no gradient kept)."""
        counts = counts.detach().float()
        previous = self._loads.get(adapter)
        self._loads[adapter] = counts if previous is None else previous + counts

    def take_loads(self, adapter: str) -> torch.Tensor | None:
        """(E,) fraction of routed tokens per expert since the last call (host read), or None."""
        counts = self._loads.pop(adapter, None)
        if counts is None:
            return None
        return (counts / counts.sum().clamp_min(1)).cpu()
