"""Non-finite losses: flagged on the device at each optimizer step, read at step boundaries.

The loop never waits for the device to learn that a loss was not finite: at each optimizer
step ``flag`` raises the adapter's device flag (no host read), the fused optimizer then skips
that update and every later one (``optim.step_unless``), and ``read`` fetches every flag in one
host read when the loop logs or saves. The trainer stops the adapters ``read`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlora.training.adapter_run import AdapterRun


@dataclass(frozen=True)
class Fault:
    """An adapter whose loss was not finite at ``adapter_step`` (global step ``global_step``);
    that update and every later one were skipped, so its weights are those of the step
    before."""

    run: AdapterRun
    adapter_step: int
    global_step: int


class FaultMonitor:
    """Raises and reads the per-adapter fault flags (``AdapterRun.fault`` / ``fault_at``)."""

    def flag(self, run: AdapterRun, global_step: int) -> None:
        """Raise ``run``'s flag if the loss of the optimizer step it is about to take
        (``run.step_loss``, summed over processes) is not finite; ``global_step`` steps are
        done before this one. No host read."""
        if run.step_loss is None:
            raise RuntimeError(f"adapter {run.name!r}: a fault check without a step loss")
        first = (run.fault == 0) & ~torch.isfinite(run.step_loss)
        at = run.fault_at  # the Python ints below ride along as kernel scalars: no copy, no sync
        run.fault_at = torch.stack(
            [
                torch.where(first, run.steps_done + 1, at[0]),
                torch.where(first, global_step + 1, at[1]),
            ]
        )
        run.fault = torch.maximum(run.fault, first.float())

    def read(self, runs: Sequence[AdapterRun]) -> list[Fault]:
        """The adapters of ``runs`` whose flag is raised (one host read for all of them)."""
        if not runs:
            return []
        flags = torch.stack([torch.cat([r.fault.view(1).long(), r.fault_at]) for r in runs])
        return [
            Fault(run, adapter_step, global_step)
            for run, (bad, adapter_step, global_step) in zip(runs, flags.tolist(), strict=True)
            if bad
        ]
