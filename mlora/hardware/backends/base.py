"""The interface every compute backend implements, plus the parts all of them share.

The rest of mlora never talks to ``torch.cuda`` or ``torch.mps`` directly: it asks a
:class:`Backend` for the device, the RNG state, an autocast context or memory figures. That keeps
CPU-only machines, Apple silicon and NVIDIA GPUs on one code path, and lets gradient
checkpointing save and restore exactly the RNG streams that dropout draws from.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class RngState:
    """A snapshot of every RNG stream a forward pass may draw from.

    Attributes:
        cpu: ``torch.get_rng_state()`` (CPU tensors draw dropout masks from it).
        device: The accelerator's generator state, or ``None`` on the CPU backend.
    """

    cpu: torch.Tensor
    device: torch.Tensor | None = None


class Backend(ABC):
    """One kind of compute device (CUDA, MPS or CPU) behind a small, uniform interface.

    Subclasses set ``name`` and ``label`` and implement the device-specific hooks; RNG forking,
    autocast and seeding are shared here because they only differ in the generator they touch.
    """

    name: ClassVar[str]
    """Lower-case backend name, also ``torch.device.type`` (``"cuda"``, ``"mps"``, ``"cpu"``)."""
    label: ClassVar[str]
    """The spelling users type in ``MLORA_BACKEND_TYPE`` (``"CUDA"``, ``"MPS"``, ``"CPU"``)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self._device})"

    @property
    def device(self) -> torch.device:
        """The device tensors and the model live on."""
        return self._device

    @property
    def pin_memory(self) -> bool:
        """Whether host buffers for this device should be page-locked (faster async copies)."""
        return False

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this machine can run this backend at all."""

    @abstractmethod
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Floating-point dtypes the base model may be computed in on this device."""

    # -- RNG -------------------------------------------------------------------------------

    @abstractmethod
    def _get_device_rng_state(self) -> torch.Tensor | None:
        """The accelerator generator's state, or ``None`` when there is no separate one."""

    @abstractmethod
    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        """Restore the accelerator generator from ``_get_device_rng_state()``."""

    def get_rng_state(self) -> RngState:
        """Snapshot the CPU and device RNG, e.g. before a forward that gradient checkpointing
        will recompute, so the recomputation draws the same dropout masks."""
        return RngState(cpu=torch.get_rng_state(), device=self._get_device_rng_state())

    def set_rng_state(self, state: RngState) -> None:
        """Restore a snapshot taken by :meth:`get_rng_state`."""
        torch.set_rng_state(state.cpu)
        if state.device is not None:
            self._set_device_rng_state(state.device)

    @contextlib.contextmanager
    def fork_rng(self) -> Iterator[None]:
        """Run a block whose RNG draws do not disturb the caller's streams (CPU and device)."""
        state = self.get_rng_state()
        try:
            yield
        finally:
            self.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        """Seed the CPU generator and every accelerator generator torch knows of."""
        torch.manual_seed(seed)

    # -- precision and determinism ---------------------------------------------------------

    def autocast(
        self, dtype: torch.dtype, enabled: bool = True
    ) -> contextlib.AbstractContextManager[None]:
        """Mixed-precision context for the base model's compute on this device.

        Args:
            dtype: Compute dtype; ``torch.float32`` means no autocast at all.
            enabled: ``False`` gives a no-op context (lets callers avoid branching).
        """
        if not enabled or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def set_deterministic(self, enabled: bool) -> None:
        """Prefer deterministic kernels (warn, don't fail, where an op has none)."""
        torch.use_deterministic_algorithms(enabled, warn_only=True)

    def allow_tf32(self, enabled: bool) -> None:
        """Allow TF32 for fp32 matmuls; only CUDA has it, elsewhere this does nothing."""
        return None

    # -- memory ----------------------------------------------------------------------------

    def empty_cache(self) -> None:
        """Return cached, unused device memory to the system (no-op where nothing is cached)."""
        return None

    @abstractmethod
    def memory_stats(self) -> dict[str, int]:
        """Memory in use now and at peak, in bytes: ``{"allocated": ..., "peak": ...}``."""

    @abstractmethod
    def reset_peak_memory_stats(self) -> None:
        """Start a new peak measurement from the current usage."""

    def compute_capability(self) -> tuple[int, int] | None:
        """The accelerator's (major, minor) compute capability; None where it has none (CPU,
        MPS). Kernels with a fast path on some generations only ask this."""
        return None

    def device_name(self) -> str | None:
        """The accelerator's model name (``"NVIDIA H100 80GB HBM3"``); None on the CPU, where
        no peak FLOP/s is known (see ``mlora.hardware.peak_flops``)."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); no-op on synchronous devices."""
        return None
