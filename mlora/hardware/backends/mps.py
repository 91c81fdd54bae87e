"""The MPS backend: Apple-silicon GPUs through Metal."""

from __future__ import annotations

import torch

from mlora.hardware.backends.base import Backend


class MpsBackend(Backend):
    """The single Metal GPU of an Apple-silicon Mac."""

    name = "mps"
    label = "MPS"

    def __init__(self) -> None:
        super().__init__(torch.device("mps"))
        self._peak = 0

    @classmethod
    def is_available(cls) -> bool:
        return torch.backends.mps.is_available()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16)

    def _get_device_rng_state(self) -> torch.Tensor | None:
        return torch.mps.get_rng_state()

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        torch.mps.set_rng_state(state)

    def empty_cache(self) -> None:
        torch.mps.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        # Metal keeps no peak counter, so the peak is the largest figure seen by a call here.
        allocated = torch.mps.current_allocated_memory()
        self._peak = max(self._peak, allocated)
        return {"allocated": allocated, "peak": self._peak}

    def reset_peak_memory_stats(self) -> None:
        self._peak = torch.mps.current_allocated_memory()

    def synchronize(self) -> None:
        torch.mps.synchronize()
