"""Backend selection (automatic, env-forced, explicit) and the shared RNG/autocast/memory API."""

from __future__ import annotations

import pytest
import torch

from mlora.core.errors import MloraError
from mlora.hardware.backends import (
    BACKEND_ENV_VAR,
    Backend,
    CpuBackend,
    CudaBackend,
    MpsBackend,
    clear_backend_cache,
    get_backend,
)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    clear_backend_cache()
    yield
    clear_backend_cache()


def pretend(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    """Make torch report CUDA / MPS (un)available; a pretended CUDA's current device is 0.
    The backends are only constructed, so nothing ever runs on the pretended devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


# (CUDA available, MPS available, MLORA_BACKEND_TYPE or None, --device or None) -> device
SELECTION_CASES = [
    # automatic: CUDA, else MPS, else CPU
    (True, True, None, None, "cuda:0"),
    (True, False, None, None, "cuda:0"),
    (False, True, None, None, "mps"),
    (False, False, None, None, "cpu"),
    (False, True, None, "auto", "mps"),
    (True, True, "", None, "cuda:0"),
    (False, True, " Auto ", None, "mps"),
    # the environment variable beats automatic selection, in any case and spacing
    (True, True, "MPS", None, "mps"),
    (True, True, "cpu", None, "cpu"),
    (True, True, " Cpu ", None, "cpu"),
    (True, False, "CUDA", None, "cuda:0"),
    # an explicit name beats the environment variable
    (True, True, "CUDA", "cpu", "cpu"),
    (True, True, "CPU", "mps", "mps"),
    (True, True, "CPU", "cuda:1", "cuda:1"),
    (True, True, "CPU", "CUDA", "cuda:0"),
    (False, True, "CPU", "auto", "mps"),
    (True, False, "definitely-not-a-backend", "cpu", "cpu"),
]


@pytest.mark.parametrize(("cuda", "mps", "env", "name", "expected"), SELECTION_CASES)
def test_selection_rule(
    monkeypatch: pytest.MonkeyPatch,
    cuda: bool,
    mps: bool,
    env: str | None,
    name: str | None,
    expected: str,
) -> None:
    pretend(monkeypatch, cuda, mps)
    if env is not None:
        monkeypatch.setenv(BACKEND_ENV_VAR, env)
    backend = get_backend(name)
    kinds = {"cuda": CudaBackend, "mps": MpsBackend, "cpu": CpuBackend}
    assert type(backend) is kinds[expected.partition(":")[0]]
    assert backend.device == torch.device(expected)


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="an accelerator is here"
)
def test_auto_is_cpu_on_a_machine_without_accelerators() -> None:
    assert type(get_backend()) is CpuBackend
    assert type(get_backend("auto")) is CpuBackend
    assert get_backend().device == torch.device("cpu")


@pytest.mark.gpu
def test_auto_is_cuda_on_a_cuda_machine() -> None:
    assert type(get_backend()) is CudaBackend
    assert get_backend().device.type == "cuda"


def test_backend_is_cached() -> None:
    assert get_backend("cpu") is get_backend("CPU")


@pytest.mark.parametrize(
    ("cuda", "mps", "env", "name", "message"),
    [
        (False, True, "CUDA", None, "MLORA_BACKEND_TYPE='CUDA': the CUDA backend is not available"),
        (True, False, "MPS", None, "MLORA_BACKEND_TYPE='MPS': the MPS backend is not available"),
        (False, False, None, "cuda:0", "--device='cuda:0': the CUDA backend is not available"),
        (True, False, "CPU", "mps", "--device='mps': the MPS backend is not available"),
    ],
)
def test_forced_unavailable_backend_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
    cuda: bool,
    mps: bool,
    env: str | None,
    name: str | None,
    message: str,
) -> None:
    """A forced backend that is missing is an error even when another one is available."""
    pretend(monkeypatch, cuda, mps)
    if env is not None:
        monkeypatch.setenv(BACKEND_ENV_VAR, env)
    with pytest.raises(MloraError) as err:
        get_backend(name)
    assert str(err.value) == message + " here"


@pytest.mark.parametrize(
    ("env", "name", "message"),
    [
        (None, "tpu", "--device='tpu' is not a backend; expected one of CUDA, MPS, CPU"),
        ("TPU", None, "MLORA_BACKEND_TYPE='TPU' is not a backend; expected one of CUDA, MPS, CPU"),
        (None, "cpu:1", "--device='cpu:1': only CUDA takes a device index, as in 'cuda:1'"),
        (None, "cuda:x", "--device='cuda:x': only CUDA takes a device index, as in 'cuda:1'"),
    ],
)
def test_bad_names(
    monkeypatch: pytest.MonkeyPatch, env: str | None, name: str | None, message: str
) -> None:
    if env is not None:
        monkeypatch.setenv(BACKEND_ENV_VAR, env)
    with pytest.raises(MloraError) as err:
        get_backend(name)
    assert str(err.value) == message


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
    """The CUDA-only hooks are documented no-ops on CPU: they return None and change nothing."""
    backend: Backend = get_backend("cpu")
    assert isinstance(backend, Backend)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert backend.allow_tf32(True) is None
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert backend.empty_cache() is None
    assert backend.synchronize() is None
    assert backend.compute_capability() is None
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
    backend.set_rng_state(state)
    with backend.fork_rng():
        torch.rand(100, device=backend.device)
    assert torch.equal(torch.rand(8, device=backend.device), first)  # fork left it in place
    backend.allow_tf32(True)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    backend.allow_tf32(False)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    backend.reset_peak_memory_stats()
    x = torch.empty(2**20, device=backend.device)
    assert backend.memory_stats()["peak"] >= x.numel() * 4
    assert torch.bfloat16 in backend.supported_dtypes() or torch.float16 in (
        backend.supported_dtypes()
    )
    with backend.autocast(torch.float16):
        assert (x[:16].view(4, 4) @ x[:16].view(4, 4)).dtype == torch.float16
