"""Run rows: tokens per second, peak memory and an estimate of model FLOPs utilization.

FLOPs of a step, estimated from parameter counts (attention's score products are left out, as
in the usual ``6N`` rule):

- every token passes the frozen base: ``2 N`` forward + ``2 N`` backward (input gradients
  only; frozen weights get no weight gradient), N = the base's weight matrices without the
  embeddings and ``lm_head``;
- ``lm_head`` runs on the supervised positions only (the loss gathers them): ``4 H V`` each;
- an adapter's own weights (trainable) on its tokens: ``6 n`` per token.

MFU = those FLOPs / (interval seconds x the device's dense peak x processes), where the peak
is known (``mlora.hardware.peak_flops``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from mlora.training.metrics.rows import RunRow


@dataclass(frozen=True)
class FlopsEstimate:
    """Parameter counts of the FLOPs rule above.

    Attributes:
        base_params: frozen matmul weights every token passes (N).
        head_params: ``lm_head``'s weights (H x V), used at supervised positions.
        adapter_params: each adapter's trainable weights (n).
    """

    base_params: int
    head_params: int
    adapter_params: dict[str, int]

    @classmethod
    def of(cls, model: nn.Module, adapter_params: dict[str, int]) -> FlopsEstimate:
        """The counts of a transformers ``PreTrainedModel``: its frozen matrices (norm vectors
        and biases are left out; a 4-bit matrix, stored two weights a byte, counts whole)."""
        embeddings = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        head_weight = None if head is None else head.weight
        base = 0
        for param in model.parameters():  # each shared tensor once
            if param.requires_grad or param.dim() < 2 or param is embeddings:
                continue
            if param is head_weight:
                continue
            packed = type(param).__name__ == "Params4bit"
            base += param.numel() * (2 if packed else 1)
        head_params = 0 if head_weight is None else head_weight.numel()
        return cls(base, head_params, dict(adapter_params))

    def flops(self, tokens: dict[str, int], supervised: int) -> float:
        """Estimated FLOPs of training on ``tokens`` per adapter, ``supervised`` of them with
        labels."""
        total = sum(tokens.values())
        adapters = sum(6 * self.adapter_params.get(name, 0) * n for name, n in tokens.items())
        return 4.0 * self.base_params * total + 4.0 * self.head_params * supervised + adapters


class RunMeter:
    """Counts tokens between two log points and makes the interval's ``RunRow``.

    Args:
        estimate: the FLOPs rule's counts (None: no MFU).
        peak_flops: one device's dense peak FLOP/s (None: unknown, no MFU).
        processes: devices sharing the work (data parallel world size).
    """

    def __init__(
        self, estimate: FlopsEstimate | None, peak_flops: float | None, processes: int = 1
    ) -> None:
        self.estimate = estimate
        self.peak_flops = peak_flops
        self.processes = processes
        self.restart()

    def restart(self) -> None:
        """Start a new interval now (after a resume's replay, at the start of the loop)."""
        self.since = time.perf_counter()
        self.tokens: dict[str, int] = {}
        self.supervised = 0

    def count(self, adapter: str, tokens: int, supervised: int) -> None:
        """One micro-batch of ``adapter``: its tokens (prompt included) and supervised ones."""
        self.tokens[adapter] = self.tokens.get(adapter, 0) + tokens
        self.supervised += supervised

    def row(self, run: str, global_step: int, peak_memory_bytes: int) -> RunRow:
        """The interval since the last row, as a row; starts the next interval."""
        seconds = max(time.perf_counter() - self.since, 1e-9)
        tokens = sum(self.tokens.values())
        mfu = None
        if self.estimate is not None and self.peak_flops:
            flops = self.estimate.flops(self.tokens, self.supervised)
            mfu = flops / (seconds * self.peak_flops * self.processes)
        row = RunRow(
            run=run,
            global_step=global_step,
            time=time.time(),
            seconds=seconds,
            tokens=tokens,
            tokens_per_s=tokens / seconds,
            peak_memory_mib=peak_memory_bytes / 2**20,
            mfu=mfu,
        )
        self.restart()
        return row
