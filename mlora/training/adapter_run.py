"""One adapter's training state in a run, and its loss bookkeeping (kept here, once).

An ``AdapterRun`` holds what the trainer keeps per adapter: its queue of micro-batches, its
optimizer and schedule, its step counters, and the losses on the device. The loss of the
optimizer step in progress accumulates micro-batch by micro-batch (``add_micro_batch``); at the
optimizer step, after the gradient sync has summed it over processes where there are several,
the step's loss joins the logged mean (``optimizer_step``). One process and data parallel keep
the books the same way, so the logged loss is always the mean over whole optimizer steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from mlora.batching.dispatcher import AdapterQueue
from mlora.config.schema import AdapterConfig
from mlora.training.objectives import Objective
from mlora.training.optim import step_unless


@dataclass
class AdapterRun:
    """Training state of one adapter.

    Attributes:
        config: its validated config.
        queue: its micro-batches, epoch by epoch.
        optimizer, scheduler: its own.
        steps_done: optimizer steps taken.
        loss_sum: on the device, the summed losses of the optimizer steps since the last log;
            read only when logging.
        loss_count: optimizer steps ``loss_sum`` covers.
        step_loss: on the device, the loss of the optimizer step in progress.
        failed: why the adapter was stopped (non-finite loss), or None.
        fault, fault_at: on the device: 1.0 once a step's loss was not finite (its updates are
            skipped from then on), and the (adapter step, global step) where that happened;
            read by ``faults.FaultMonitor`` when the loop logs or saves.
        tokens: tokens trained since the last log.
        history: the logged mean losses.
        expert_load: MoE: the logged per-expert token shares.
        checkpoint_step: ``steps_done`` of its newest checkpoint folder.
        left: it left the run (finished and saved, or stopped); it takes no step again.
        objective: its loss: sft, or a preference objective over its pairs.
    """

    config: AdapterConfig
    queue: AdapterQueue
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_done: int = 0
    loss_sum: torch.Tensor | None = None
    step_loss: torch.Tensor | None = None
    failed: str | None = None
    fault: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    fault_at: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.long))
    loss_count: float = 0.0
    tokens: int = 0
    history: list[float] = field(default_factory=list)
    expert_load: list[list[float]] = field(default_factory=list)
    checkpoint_step: int | None = None
    left: bool = False
    objective: Objective = field(default_factory=Objective)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def finished(self) -> bool:
        return self.queue.finished

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The adapter's trainable parameters, in its optimizer's order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def status(self) -> str:
        if self.failed is not None:
            return "failed"
        return "finished" if self.finished else "running"

    def add_micro_batch(self, loss: torch.Tensor, tokens: int) -> None:
        """Account one micro-batch: its detached loss (this process's share of the step's
        loss) joins the step in progress."""
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss
        self.tokens += tokens

    def optimizer_step(self) -> None:
        """Clip its gradients to ``max_grad_norm`` (when set), take the optimizer step (skipped
        on the device while ``fault`` is set), advance the schedule, and move the step's loss
        (already summed over processes) to the logged sum."""
        if self.step_loss is None:
            raise RuntimeError(f"adapter {self.name!r}: an optimizer step without a loss")
        self.loss_sum = self.step_loss if self.loss_sum is None else self.loss_sum + self.step_loss
        self.loss_count += 1
        self.step_loss = None
        if self.config.max_grad_norm is not None:  # its own params; no host read
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm, foreach=True)
        step_unless(self.optimizer, self.fault)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def take_logged_loss(self) -> None:
        """Start a new log interval (the caller read ``loss_sum / loss_count``)."""
        self.loss_sum, self.loss_count, self.tokens = None, 0.0, 0

    def progress_state(self) -> dict[str, Any]:
        """Where the adapter stands (cheap: counters, data position, loss bookkeeping)."""
        return {
            "status": self.status,
            "message": self.failed,
            "steps_done": self.steps_done,
            "queue": self.queue.state_dict(),
            "loss_count": self.loss_count,
            "tokens": self.tokens,
            "history": list(self.history),
            "loss_sum": None if self.loss_sum is None else own_copy(self.loss_sum),
            "checkpoint_step": self.checkpoint_step,
        }

    def pending_state(self) -> dict[str, Any] | None:
        """The gradients and loss of the optimizer step in progress (None between steps)."""
        grads = {str(i): own_copy(p.grad) for i, p in enumerate(self.params) if p.grad is not None}
        if not grads and self.step_loss is None:
            return None
        step_loss = None if self.step_loss is None else own_copy(self.step_loss)
        return {"grads": grads, "step_loss": step_loss}


def own_copy(value: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage: the loop may change the original while a
    background thread writes the copy (and safetensors refuses shared storage)."""
    return value.detach().to("cpu", copy=True).contiguous()


def cpu_copy(value: Any) -> Any:
    """``value`` (an optimizer or scheduler state dict) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return own_copy(value)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return copy.deepcopy(value)
