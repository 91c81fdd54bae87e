"""The CPU backend: always available, memory measured as the process's resident set."""

from __future__ import annotations

import contextlib
import re
import resource
import sys
from pathlib import Path

import torch

from mlora.hardware.backends.base import Backend

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux only), or ``None``."""
    try:
        match = re.search(rf"^{field}:\s*(\d+)\s*kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class CpuBackend(Backend):
    """Runs everything on the host CPU.

    torch's CPU allocator keeps no statistics, so memory figures are the process's resident set
    size (current ``VmRSS`` and peak ``VmHWM`` on Linux, ``ru_maxrss`` elsewhere). They include
    everything the process holds, so compare differences, not absolute values.
    """

    name = "cpu"
    label = "CPU"

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def _get_device_rng_state(self) -> torch.Tensor | None:
        return None

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        raise ValueError("the CPU backend has no device RNG state to restore")

    def memory_stats(self) -> dict[str, int]:
        current = _proc_status_kib("VmRSS")
        peak = _proc_status_kib("VmHWM")
        if peak is None:
            # ru_maxrss is KiB on Linux and bytes on macOS.
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss // 1024 if sys.platform == "darwin" else maxrss
        if current is None:
            current = peak
        return {"allocated": current * 1024, "peak": peak * 1024}

    def reset_peak_memory_stats(self) -> None:
        # Writing "5" resets VmHWM to the current RSS (Linux >= 4.0); elsewhere the peak is
        # the process lifetime's, which is why benchmarks run one measurement per process.
        with contextlib.suppress(OSError):
            _PROC_CLEAR_REFS.write_text("5")
