"""Every ``scheduler_type`` gives transformers' ``get_scheduler`` learning rates, step by step.

mlora builds the schedules itself (``mlora.training.optim.build_scheduler``) so a run does not
import ``transformers.optimization`` (and through it peft and bitsandbytes); the reference is
transformers' own function, imported only here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from mlora.config.schema import SCHEDULER_TYPES, AdapterConfig
from mlora.training.optim import build_scheduler, warmup_steps


def _optimizer(lr: float) -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": lr}, {"params": [b], "lr": lr * 4}], lr=lr)


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """Both parameter groups' rates (LoRA+ gives B its own) at each step, end to end."""
    rates: list[float] = []
    for _ in range(steps):
        rates.extend(scheduler.get_last_lr())
        scheduler.optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", SCHEDULER_TYPES)
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 10), (10, 25), (1, 1)])
def test_schedule_equals_transformers(name: str, warmup: int, total: int) -> None:
    if name == "polynomial" and warmup == total:
        pytest.skip("transformers divides by total - warmup = 0 here")
    config = AdapterConfig(name="a", data="d.json", scheduler_type=name, warmup_steps=warmup)
    ours = build_scheduler(config, _optimizer(3e-4), total)
    theirs = get_scheduler(
        name,
        _optimizer(3e-4),
        num_warmup_steps=warmup_steps(config, total),
        num_training_steps=total,
    )
    assert _rates(ours, total + 3) == pytest.approx(_rates(theirs, total + 3), rel=1e-12)
