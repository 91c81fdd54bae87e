"""Compute backends (CUDA, MPS, CPU) behind one interface; see :func:`get_backend`."""

from mlora.hardware.backends.base import Backend, RngState
from mlora.hardware.backends.cpu import CpuBackend
from mlora.hardware.backends.cuda import CudaBackend
from mlora.hardware.backends.mps import MpsBackend
from mlora.hardware.backends.selection import BACKEND_ENV_VAR, clear_backend_cache, get_backend

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "CpuBackend",
    "CudaBackend",
    "MpsBackend",
    "RngState",
    "clear_backend_cache",
    "get_backend",
]
