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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class AuxLossCollector:
    """Aux losses of the current pass and routed-token counts since the last log, per adapter."""

    def __init__(self) -> None:
        self._losses: dict[str, torch.Tensor] = {}
        self._loads: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget the losses of the previous pass (loads are kept until ``take_loads``)."""
        self._losses.clear()

    def add(self, adapter: str, loss: torch.Tensor) -> None:
        """Record a scalar aux loss (already multiplied by its coefficient) for ``adapter``."""
        loss = loss.float()
        previous = self._losses.get(adapter)
        self._losses[adapter] = loss if previous is None else previous + loss

    @contextlib.contextmanager
    def capture(self, keep_loads: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Record the losses added inside the block into the yielded dict, not into this pass.

        Gradient checkpointing (``mlora.checkpointing``) runs a layer without grad and again in
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
