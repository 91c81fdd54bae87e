"""Choosing the backend: an explicit ``--device``, else ``MLORA_BACKEND_TYPE``, else the best
available (CUDA, then MPS, then CPU). The choice is cached so every caller shares one object."""

from __future__ import annotations

import functools
import os

import torch

from mlora.core.errors import MloraError
from mlora.core.launcher_env import env_world_size
from mlora.hardware.backends.base import Backend
from mlora.hardware.backends.cpu import CpuBackend
from mlora.hardware.backends.cuda import CudaBackend
from mlora.hardware.backends.mps import MpsBackend

BACKEND_ENV_VAR = "MLORA_BACKEND_TYPE"
"""Environment variable that forces a backend: ``CUDA``, ``MPS`` or ``CPU``."""

_BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (CudaBackend, MpsBackend, CpuBackend)
}
"""Every backend, in automatic-selection order."""

_AUTO = ("", "auto")


def get_backend(name: str | None = None) -> Backend:
    """The backend to run on, created once per name and then reused.

    Args:
        name: ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"`` or ``"auto"`` (any case), as given
            by ``--device``. ``None`` falls back to ``MLORA_BACKEND_TYPE``, then to automatic.

    Raises:
        MloraError: The name is unknown, or names a backend this machine cannot run.
    """
    source = "--device"
    if name is None:
        name = os.environ.get(BACKEND_ENV_VAR, "")
        source = BACKEND_ENV_VAR
    key = name.strip().lower()
    if key in _AUTO:
        return _create(next(n for n, c in _BACKENDS.items() if c.is_available()), None)
    kind, _, index_text = key.partition(":")
    cls = _BACKENDS.get(kind)
    if cls is None:
        choices = ", ".join(c.label for c in _BACKENDS.values())
        raise MloraError(f"{source}={name!r} is not a backend; expected one of {choices}")
    if index_text and (cls is not CudaBackend or not index_text.isdigit()):
        raise MloraError(f"{source}={name!r}: only CUDA takes a device index, as in 'cuda:1'")
    if not cls.is_available():
        raise MloraError(f"{source}={name!r}: the {cls.label} backend is not available here")
    return _create(kind, int(index_text) if index_text else None)


def local_device(device: torch.device) -> torch.device:
    """The device this rank uses: on CUDA with several processes, one GPU per local rank
    (``cuda:LOCAL_RANK``; restrict the GPUs with ``CUDA_VISIBLE_DEVICES``)."""
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def clear_backend_cache() -> None:
    """Forget the cached backends (tests that switch ``MLORA_BACKEND_TYPE`` need this)."""
    _create.cache_clear()


@functools.cache
def _create(kind: str, index: int | None) -> Backend:
    if kind == CudaBackend.name:
        return CudaBackend(index)
    return _BACKENDS[kind]()
