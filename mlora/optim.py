"""Each adapter's own optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mlora.config import AdapterConfig


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
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


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
