"""Per-step values kept on the device until the log interval, then read in one host copy.

The step must not wait for the device (no ``.item()`` per step): each finished optimizer step
leaves its loss and gradient norm here as device scalars with its host-side counters, and
``take`` turns everything pending into ``StepRow``s with one ``tolist()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from mlora.training.metrics.rows import StepRow


@dataclass(frozen=True)
class PendingStep:
    """A finished optimizer step whose loss and gradient norm are still on the device."""

    adapter: str
    step: int
    global_step: int
    epoch: float
    rows: int
    tokens: int
    supervised_tokens: int
    lr: float
    loss: torch.Tensor  # () fp32, on the device
    grad_norm: torch.Tensor  # () fp32, on the device
    time: float
    val_loss: float | None = None  # a validation after this step (a host value already)


class StepCollector:
    """The finished steps since the last ``take``, in the order they ended."""

    def __init__(self) -> None:
        self.pending: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)

    def add_validation(self, adapter: str, step: int, val_loss: float) -> bool:
        """Put a validation loss on ``adapter``'s pending row of optimizer step ``step`` (the
        validation runs right after the step, before its row is handed on); False when that
        row is not pending (the caller then writes a validation row of its own)."""
        for index, pending in enumerate(self.pending):
            if pending.adapter == adapter and pending.step == step:
                self.pending[index] = replace(pending, val_loss=val_loss)
                return True
        return False

    def clear(self) -> None:
        """Forget the pending steps (a resume's replay recomputes steps already logged)."""
        self.pending.clear()

    def take(self, run: str) -> list[StepRow]:
        """The pending steps as rows of run ``run`` (one host read for all of them)."""
        if not self.pending:
            return []
        values = torch.stack(
            [torch.stack([p.loss.float(), p.grad_norm.float()]) for p in self.pending]
        ).tolist()
        rows = [
            StepRow(
                run=run, adapter=p.adapter, step=p.step, global_step=p.global_step,
                epoch=p.epoch, rows=p.rows, tokens=p.tokens,
                supervised_tokens=p.supervised_tokens, loss=loss, lr=p.lr,
                grad_norm=norm, time=p.time, val_loss=p.val_loss,
            )
            for p, (loss, norm) in zip(self.pending, values, strict=True)
        ]  # fmt: skip
        self.pending.clear()
        return rows


def gradient_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of ``params``' gradients as a device scalar (no host read); 0 without any."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        device = params[0].device if params else torch.device("cpu")
        return torch.zeros((), device=device)
    dtype = torch.float32  # at least fp32 (half-precision squares overflow); fp64 stays fp64
    for g in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads])
    return torch.linalg.vector_norm(norms)


def now() -> float:
    """Wall-clock seconds since the epoch, as rows record it."""
    return time.time()
