"""Backend selection (automatic, env-forced, explicit) and the shared RNG/autocast/memory API."""

from __future__ import annotations

import pytest
import torch

from mlora.backends import (
    BACKEND_ENV_VAR,
    Backend,
    CpuBackend,
    CudaBackend,
    MpsBackend,
    clear_backend_cache,
    get_backend,
)
from mlora.errors import MloraError


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    clear_backend_cache()
    yield
    clear_backend_cache()


def test_auto_picks_cuda_then_mps_then_cpu() -> None:
    expected = next(c for c in (CudaBackend, MpsBackend, CpuBackend) if c.is_available())
    assert type(get_backend()) is expected
    assert type(get_backend("auto")) is expected


def test_auto_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CudaBackend, "is_available", classmethod(lambda cls: False))
    monkeypatch.setattr(MpsBackend, "is_available", classmethod(lambda cls: False))
    backend = get_backend()
    assert isinstance(backend, CpuBackend)
    assert backend.device == torch.device("cpu")


@pytest.mark.parametrize("value", ["CPU", "cpu", " Cpu "])
def test_env_forces_cpu(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, value)
    assert isinstance(get_backend(), CpuBackend)


def test_explicit_name_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, "definitely-not-a-backend")
    assert isinstance(get_backend("cpu"), CpuBackend)


def test_backend_is_cached() -> None:
    assert get_backend("cpu") is get_backend("CPU")


def test_forced_unavailable_backend_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CudaBackend, "is_available", classmethod(lambda cls: False))
    monkeypatch.setenv(BACKEND_ENV_VAR, "CUDA")
    with pytest.raises(MloraError, match=f"{BACKEND_ENV_VAR}='CUDA'.*not available") as err:
        get_backend()
    assert "\n" not in str(err.value)
    with pytest.raises(MloraError, match=r"--device='cuda:0'.*not available"):
        get_backend("cuda:0")


@pytest.mark.parametrize(
    ("name", "message"),
    [("tpu", "not a backend; expected one of CUDA, MPS, CPU"), ("cpu:1", "device index")],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(MloraError, match=message):
        get_backend(name)


def test_rng_get_set_roundtrip() -> None:
    backend = get_backend("cpu")
    state = backend.get_rng_state()
    first = torch.rand(8)
    backend.set_rng_state(state)
    assert torch.equal(torch.rand(8), first)


def test_fork_rng_leaves_caller_stream_untouched() -> None:
    backend = get_backend("cpu")
    backend.manual_seed(3)
    expected = torch.rand(8)
    backend.manual_seed(3)
    with backend.fork_rng():
        torch.rand(100)
    assert torch.equal(torch.rand(8), expected)


def test_autocast_bf16_and_fp32_noop() -> None:
    backend = get_backend("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with backend.autocast(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with backend.autocast(torch.float32):
        assert (a @ b).dtype == torch.float32
    with backend.autocast(torch.bfloat16, enabled=False):
        assert (a @ b).dtype == torch.float32


def test_supported_dtypes_include_fp32() -> None:
    assert torch.float32 in get_backend("cpu").supported_dtypes()


def test_memory_stats_and_peak_reset() -> None:
    backend = get_backend("cpu")
    stats = backend.memory_stats()
    assert set(stats) == {"allocated", "peak"}
    assert 0 < stats["allocated"] <= stats["peak"]
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    del big
    high = backend.memory_stats()["peak"]
    backend.reset_peak_memory_stats()
    assert backend.memory_stats()["peak"] <= high


def test_set_deterministic_toggles_torch() -> None:
    backend = get_backend("cpu")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        backend.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        backend.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_cpu_backend_is_a_backend() -> None:
    backend: Backend = get_backend("cpu")
    backend.allow_tf32(True)  # no-op on CPU, must not raise
    backend.empty_cache()
    backend.synchronize()
    assert backend.pin_memory is False


@pytest.mark.gpu
def test_cuda_backend_rng_tf32_memory() -> None:
    backend = get_backend("cuda")
    assert backend.device.type == "cuda"
    state = backend.get_rng_state()
    assert state.device is not None
    first = torch.rand(8, device=backend.device)
    backend.set_rng_state(state)
    assert torch.equal(torch.rand(8, device=backend.device), first)
    with backend.fork_rng():
        torch.rand(100, device=backend.device)
    backend.set_rng_state(state)
    torch.rand(8, device=backend.device)
    backend.allow_tf32(True)
    backend.allow_tf32(False)
    backend.reset_peak_memory_stats()
    x = torch.empty(2**20, device=backend.device)
    assert backend.memory_stats()["peak"] >= x.numel() * 4
    assert torch.bfloat16 in backend.supported_dtypes() or torch.float16 in (
        backend.supported_dtypes()
    )
    with backend.autocast(torch.float16):
        assert (x[:16].view(4, 4) @ x[:16].view(4, 4)).dtype == torch.float16
