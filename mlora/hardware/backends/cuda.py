"""The CUDA backend: the only module in mlora that calls ``torch.cuda``."""

from __future__ import annotations

import os

import torch

from mlora.hardware.backends.base import Backend


class CudaBackend(Backend):
    """One NVIDIA (or ROCm) GPU, by default the current device."""

    name = "cuda"
    label = "CUDA"

    def __init__(self, index: int | None = None) -> None:
        if index is None:
            index = torch.cuda.current_device()
        super().__init__(torch.device("cuda", index))

    @property
    def pin_memory(self) -> bool:
        return True

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return (torch.float32, torch.float16, torch.bfloat16)
        return (torch.float32, torch.float16)

    def _get_device_rng_state(self) -> torch.Tensor | None:
        return torch.cuda.get_rng_state(self.device)

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)

    def set_deterministic(self, enabled: bool) -> None:
        if enabled:
            # cuBLAS needs this before its first handle is created to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = enabled
        torch.backends.cudnn.benchmark = not enabled
        super().set_deterministic(enabled)

    def allow_tf32(self, enabled: bool) -> None:
        precision = "tf32" if enabled else "ieee"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            # torch >= 2.9 spelling; the allow_tf32 flags below are deprecated there.
            torch.backends.cuda.matmul.fp32_precision = precision
            torch.backends.cudnn.fp32_precision = precision
        else:
            torch.backends.cuda.matmul.allow_tf32 = enabled
            torch.backends.cudnn.allow_tf32 = enabled

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def compute_capability(self) -> tuple[int, int] | None:
        return torch.cuda.get_device_capability(self.device)

    def device_name(self) -> str | None:
        return torch.cuda.get_device_name(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
