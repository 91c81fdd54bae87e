"""Each adapter's own optimizer and learning-rate schedule, and a step that skips on the device.

Optimizers are built fused where torch has a fused kernel for the device (AdamW and SGD on CUDA
and CPU): the fused kernels take a ``found_inf`` flag, as ``GradScaler`` uses them, and leave
parameters and optimizer state untouched when it is set. The trainer keeps one such flag per
adapter on the device, so a non-finite step is never applied and the loop never waits for the
device to find out; it reads the flags when it logs or saves.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlora.config.schema import AdapterConfig


def build_optimizer(
    config: AdapterConfig, named_params: list[tuple[str, nn.Parameter]]
) -> torch.optim.Optimizer:
    """AdamW or SGD over one adapter's parameters.

    With ``loraplus_lr_ratio`` (LoRA+), lora_B parameters get ``lr * ratio``; the rest ``lr``.
    """
    ratio = config.loraplus_lr_ratio
    b_params = [p for n, p in named_params if ratio and ".lora_B." in n]
    other = [p for n, p in named_params if not (ratio and ".lora_B." in n)]
    groups = [{"params": other, "lr": config.lr}]
    if b_params:
        groups.append({"params": b_params, "lr": config.lr * ratio})
    if config.optim == "sgd":
        cls: type[torch.optim.Optimizer] = torch.optim.SGD
        options = {"momentum": config.momentum, "weight_decay": config.weight_decay}
    else:
        cls, options = torch.optim.AdamW, {"weight_decay": config.weight_decay}
    try:
        return cls(groups, lr=config.lr, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused kernel for this device: the default one
        return cls(groups, lr=config.lr, **options)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Apply the optimizer step unless ``skip`` (a 0/1 float scalar on the device) is set.

    Fused optimizers decide on the device (no host read; parameters, state and step count stay
    as they were when skipped); others read the flag once.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip  # read by the fused kernel, as GradScaler sets it
        optimizer.step()
    elif not skip.item():
        optimizer.step()


def warmup_steps(config: AdapterConfig, total_steps: int) -> int:
    """``warmup_steps`` when > 0, else ``ceil(warmup_ratio * total_steps)`` (transformers' rule)."""
    if config.warmup_steps > 0:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(
    config: AdapterConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' ``get_scheduler`` by name, over this adapter's optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(
        config.scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(config, total_steps),
        num_training_steps=total_steps,
    )
