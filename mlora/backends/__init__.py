"""Compute backends (CUDA, MPS, CPU) behind one interface; see :func:`get_backend`."""

from mlora.backends.base import Backend, RngState
from mlora.backends.cpu import CpuBackend
from mlora.backends.cuda import CudaBackend
from mlora.backends.mps import MpsBackend
from mlora.backends.selection import BACKEND_ENV_VAR, clear_backend_cache, get_backend

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
