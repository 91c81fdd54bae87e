"""Each adapter's own optimizer and learning-rate schedule, and a step that skips on the device.

Optimizers are built fused where torch has a fused kernel for the device (AdamW and SGD on CUDA
and CPU): the fused kernels take a ``found_inf`` flag, as ``GradScaler`` uses them, and leave
parameters and optimizer state untouched when it is set. The trainer keeps one such flag per
adapter on the device, so a non-finite step is never applied and the loop never waits for the
device to find out; it reads the flags when it logs or saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

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
    """The ``scheduler_type`` schedule over this adapter's optimizer steps, as a ``LambdaLR``.

    The same multipliers as transformers' ``get_scheduler`` with its defaults (tested equal
    step by step), written here because importing ``transformers.optimization`` pulls in peft
    and bitsandbytes: about a second of every run's start-up for seven small formulas.
    """
    warmup = warmup_steps(config, total_steps)
    name = config.scheduler_type
    if name == "constant":
        multiplier: Callable[[int], float] = _constant
    elif name == "constant_with_warmup":
        multiplier = partial(_constant_with_warmup, warmup=warmup)
    elif name == "inverse_sqrt":
        multiplier = partial(_inverse_sqrt, warmup=warmup, timescale=warmup or 10_000)
    elif name == "polynomial":
        lr_init, lr_end = optimizer.defaults["lr"], 1e-7
        if not lr_init > lr_end:
            raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")
        multiplier = partial(
            _polynomial, warmup=warmup, total=total_steps, lr_end=lr_end, lr_init=lr_init
        )
    else:
        multiplier = partial(_DECAYS[name], warmup=warmup, total=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _ramp(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _ramp(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _progress(step: int, warmup: int, total: int) -> float:
    return float(step - warmup) / float(max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * _progress(step, warmup, total))))


def _cosine_with_restarts(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))  # one cycle


def _polynomial(step: int, *, warmup: int, total: int, lr_end: float, lr_init: float) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)  # power 1
    return ((lr_init - lr_end) * remaining + lr_end) / lr_init


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _ramp(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


_DECAYS: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
}
