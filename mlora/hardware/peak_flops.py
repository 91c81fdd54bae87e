"""The dense peak FLOP/s of known accelerators, for model FLOPs utilization (MFU).

Figures are the vendors' dense (no sparsity) tensor-core peaks per device, in TFLOP/s, for the
base model's compute dtype; fp32 is the plain (non-TF32) figure. A device that is not listed
(any CPU, most consumer cards) has no known peak: MFU is then not reported, unless
``MLORA_PEAK_TFLOPS`` gives the peak of one device.
"""

from __future__ import annotations

import os

import torch

from mlora.core.errors import MloraError

PEAK_TFLOPS_ENV = "MLORA_PEAK_TFLOPS"
# (substring of torch's device name, {dtype: dense TFLOP/s}); the first match wins, so more
# specific names come first.
_HALF = (torch.float16, torch.bfloat16)
PEAK_TFLOPS: list[tuple[str, dict[torch.dtype, float]]] = [
    ("H100 PCIe", {**dict.fromkeys(_HALF, 756.0), torch.float32: 51.0}),
    ("H100 NVL", {**dict.fromkeys(_HALF, 835.0), torch.float32: 60.0}),
    ("H100", {**dict.fromkeys(_HALF, 989.4), torch.float32: 66.9}),  # SXM
    ("H200", {**dict.fromkeys(_HALF, 989.4), torch.float32: 66.9}),
    ("GH200", {**dict.fromkeys(_HALF, 989.4), torch.float32: 66.9}),
    ("B200", {**dict.fromkeys(_HALF, 2250.0), torch.float32: 80.0}),
    ("A100", {**dict.fromkeys(_HALF, 312.0), torch.float32: 19.5}),
    ("L40S", {**dict.fromkeys(_HALF, 362.0), torch.float32: 91.6}),
    ("L4", {**dict.fromkeys(_HALF, 121.0), torch.float32: 30.3}),
    ("A10G", {**dict.fromkeys(_HALF, 70.0), torch.float32: 31.2}),
    ("V100", {torch.float16: 125.0, torch.float32: 15.7}),
]


def peak_flops(device_name: str | None, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device named ``device_name`` computing in ``dtype``; None when
    unknown. ``MLORA_PEAK_TFLOPS`` overrides the table.

    Raises:
        MloraError: ``MLORA_PEAK_TFLOPS`` is set but is not a number > 0.
    """
    override = os.environ.get(PEAK_TFLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise MloraError(f"{PEAK_TFLOPS_ENV} must be a number > 0 (TFLOP/s), got {override!r}")
        return value * 1e12
    if device_name is None:
        return None
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            tflops = peaks.get(dtype)
            return None if tflops is None else tflops * 1e12
    return None
