"""How the processes of a run share a step: one process, or data parallel.

The trainer's step is the same code for both; what differs sits behind ``GradientSync``:
which rows of a micro-batch this process runs, the MoE router losses over whole micro-batches,
and the sum of gradients and step losses before an optimizer step. One process does nothing
at any of these points; data parallel (``DataParallelSync``) sums with ONE ``all_reduce`` over
a flat buffer (see ``distributed.py``). Another strategy (FSDP of the adapters, say) is another
class with these methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from mlora.batching.aux_losses import AuxLossCollector
from mlora.batching.dispatcher import MicroBatch, MicroBatchShard
from mlora.core.interrupt import GracefulStop
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.adapter_run import AdapterRun
from mlora.training.distributed import Distributed, router_stat_slots


class GradientSync(Protocol):
    """What a step asks of the processes that share it."""

    def adapters_changed(self, model: MultiLoraModel, names: Sequence[str]) -> None:
        """The run's adapters are now ``names`` (at the start, or after one entered)."""
        ...

    @property
    def sharded(self) -> bool:
        """Whether each process runs a share of every micro-batch (collation needs to know)."""
        ...

    def shard(self, micro_batch: MicroBatch) -> MicroBatchShard:
        """This process's rows of ``micro_batch``."""
        ...

    def router_losses(
        self, collector: AuxLossCollector, step: Sequence[str], local: Sequence[str]
    ) -> torch.Tensor | None:
        """(S,) router losses of the adapters ``local`` (this process's segments, in order)
        over their whole micro-batches, or None where the forward already added them. Every
        process calls it after its forward with the adapters of the whole ``step``."""
        ...

    def sum_step(self, ending: Sequence[AdapterRun]) -> None:
        """Before ``ending``'s optimizer steps: make their gradients and ``step_loss`` the sums
        over every process, so every process applies the same update."""
        ...

    def consolidate(self, pending: Sequence[AdapterRun]) -> None:
        """Before a checkpoint: move ``pending``'s partial gradients and step losses (steps in
        the middle of a gradient accumulation) to the main process."""
        ...

    def agreed_signal(self, stop: GracefulStop) -> str | None:
        """The signal that stops the run after this step, the same on every process."""
        ...


class SingleProcess:
    """One process: it runs every row, and there is nothing to sum."""

    sharded = False

    def adapters_changed(self, model: MultiLoraModel, names: Sequence[str]) -> None:
        return None

    def shard(self, micro_batch: MicroBatch) -> MicroBatchShard:
        return micro_batch.shard(0, 1)

    def router_losses(
        self, collector: AuxLossCollector, step: Sequence[str], local: Sequence[str]
    ) -> torch.Tensor | None:
        return None  # the forward's segment losses include them

    def sum_step(self, ending: Sequence[AdapterRun]) -> None:
        return None

    def consolidate(self, pending: Sequence[AdapterRun]) -> None:
        return None

    def agreed_signal(self, stop: GracefulStop) -> str | None:
        return stop.signal_name


class DataParallelSync:
    """Data parallel on ``torch.distributed``: each rank runs its share of every micro-batch.

    Args:
        dist: this process's place in the group.
        device: where gradients and losses live.
    """

    sharded = True

    def __init__(self, dist: Distributed, device: torch.device) -> None:
        self.dist = dist
        self.device = device

    def adapters_changed(self, model: MultiLoraModel, names: Sequence[str]) -> None:
        """Router losses over whole micro-batches: their sums are reduced over ranks."""
        model.context.aux_losses.use_global_stats(router_stat_slots(model, names) or None)

    def shard(self, micro_batch: MicroBatch) -> MicroBatchShard:
        return micro_batch.shard(self.dist.rank, self.dist.world_size)

    def router_losses(
        self, collector: AuxLossCollector, step: Sequence[str], local: Sequence[str]
    ) -> torch.Tensor | None:
        """From the router sums of this pass reduced over all ranks (one collective, which
        every rank joins, with zeros where it has no rows)."""
        if not collector.global_stats:
            return None
        zero = torch.zeros((), device=self.device)
        found = collector.reduce_stats(list(step), zero, self.dist.all_reduce_flat)
        if not found or not local:
            return None
        return torch.stack([found.get(name, zero) for name in local])

    def sum_step(self, ending: Sequence[AdapterRun]) -> None:
        if ending:
            self._reduce(ending, keep=True)

    def consolidate(self, pending: Sequence[AdapterRun]) -> None:
        if pending:
            self._reduce(pending, keep=self.dist.is_main)

    def agreed_signal(self, stop: GracefulStop) -> str | None:
        """A launcher signals its processes at slightly different moments: all stop at the
        same step."""
        if self.dist.any(stop.signal_name is not None):
            return stop.signal_name or "a signal to another rank"
        return None

    def _reduce(self, runs: Sequence[AdapterRun], keep: bool) -> None:
        """One ``all_reduce`` over one flat buffer of ``runs``' gradients and step losses; the
        sums replace this rank's own (``keep``), or this rank's share is dropped (a rank
        without rows of an adapter adds zeros)."""
        params = [p for run in runs for p in run.params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        local_losses = []
        for run in runs:
            if run.step_loss is None:
                raise RuntimeError(f"adapter {run.name!r}: a gradient sum without a step loss")
            local_losses.append(run.step_loss)
        summed = self.dist.all_reduce_flat([*grads, *(loss.reshape(1) for loss in local_losses)])
        for param, grad in zip(params, summed, strict=False):
            param.grad = grad if keep else None
        for run, local, total in zip(runs, local_losses, summed[len(params) :], strict=True):
            run.step_loss = total.reshape(()) if keep else torch.zeros_like(local)


def gradient_sync(dist: Distributed, device: torch.device) -> GradientSync:
    """The strategy for this process group: data parallel with several processes."""
    return DataParallelSync(dist, device) if dist.enabled else SingleProcess()
