"""dtype, quantization and attention resolution: flags map to what transformers expects, and
what the machine cannot do fails (or falls back) with a message naming the flag."""

from __future__ import annotations

import pytest
import torch

import mlora.hardware.precision as precision
from mlora.core.errors import MloraError
from mlora.hardware.backends import CpuBackend, CudaBackend, get_backend
from mlora.hardware.precision import (
    build_quantization_config,
    resolve_attn_implementation,
    resolve_dtype,
)


class FakeCuda(CudaBackend):
    """A CudaBackend that runs nowhere: lets CPU tests reach the CUDA-only branches."""

    def __init__(self, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> None:
        self._device = torch.device("cpu")
        self._dtypes = dtypes

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return self._dtypes


@pytest.mark.parametrize(
    ("fp16", "bf16", "dtype"),
    [(False, False, torch.float32), (True, False, torch.float16), (False, True, torch.bfloat16)],
)
def test_resolve_dtype(fp16: bool, bf16: bool, dtype: torch.dtype) -> None:
    assert resolve_dtype(fp16, bf16) == dtype
    assert resolve_dtype(fp16, bf16, CpuBackend()) == dtype


def test_resolve_dtype_rejects_both() -> None:
    with pytest.raises(MloraError, match="--fp16 and --bf16"):
        resolve_dtype(True, True)


def test_resolve_dtype_checks_backend_support() -> None:
    with pytest.raises(MloraError, match="--fp16: the CUDA device"):
        resolve_dtype(True, False, FakeCuda(dtypes=(torch.float32,)))


def test_no_quantization_is_none() -> None:
    assert build_quantization_config(False, False, torch.float32, CpuBackend()) is None


def test_quantization_flags_are_exclusive() -> None:
    with pytest.raises(MloraError, match="--load_4bit and --load_8bit"):
        build_quantization_config(True, True, torch.float32, CpuBackend())


@pytest.mark.parametrize(("bits4", "flag"), [(True, "--load_4bit"), (False, "--load_8bit")])
def test_quantization_needs_cuda(bits4: bool, flag: str) -> None:
    with pytest.raises(MloraError, match=f"{flag} needs a CUDA device; .* is CPU"):
        build_quantization_config(bits4, not bits4, torch.float32, CpuBackend())


def test_quantization_needs_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(MloraError, match="--load_4bit needs bitsandbytes"):
        build_quantization_config(True, False, torch.bfloat16, FakeCuda())


def test_quantization_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "is_bitsandbytes_available", lambda: True)
    q4 = build_quantization_config(True, False, torch.bfloat16, FakeCuda())
    assert q4 is not None and q4.load_in_4bit and not q4.load_in_8bit
    assert q4.bnb_4bit_quant_type == "nf4"
    assert q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = build_quantization_config(False, True, torch.float32, FakeCuda())
    assert q8 is not None and q8.load_in_8bit and not q8.load_in_4bit


@pytest.mark.parametrize(
    ("requested", "expected"), [(None, "sdpa"), ("sdpa", "sdpa"), ("eager", "eager")]
)
def test_attn_on_cpu(requested: str | None, expected: str) -> None:
    assert resolve_attn_implementation(requested, CpuBackend()) == expected


def test_attn_unknown_names_the_flag() -> None:
    with pytest.raises(MloraError, match="--attn_impl 'flash'"):
        resolve_attn_implementation("flash", CpuBackend())


def test_flash_attn_without_cuda_warns_and_uses_sdpa() -> None:
    with pytest.warns(UserWarning, match="--attn_impl flash_attn: it needs CUDA"):
        assert resolve_attn_implementation("flash_attn", CpuBackend()) == "sdpa"


def test_flash_attn_not_installed_warns_and_uses_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "is_flash_attn_2_available", lambda: False)
    with pytest.warns(UserWarning, match="flash-attn is not installed"):
        assert resolve_attn_implementation("flash_attn", FakeCuda(), torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation(None, FakeCuda(), torch.bfloat16) == "sdpa"


def test_flash_attn_default_on_cuda_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "is_flash_attn_2_available", lambda: True)
    cuda = FakeCuda()
    assert resolve_attn_implementation(None, cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("flash_attn", cuda, torch.float16) == "flash_attention_2"
    # FlashAttention-2 has no fp32 kernels: the default avoids it, an explicit request warns.
    assert resolve_attn_implementation(None, cuda, torch.float32) == "sdpa"
    with pytest.warns(UserWarning, match="fp16/bf16 only"):
        assert resolve_attn_implementation("flash_attn", cuda, torch.float32) == "sdpa"


# --- CUDA-only: real bitsandbytes and flash-attn -------------------------------------------


def _tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.gpu
@pytest.mark.parametrize("bits4", [True, False])
def test_quantized_load_on_cuda(tmp_path, bits4: bool) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    backend = get_backend("cuda")
    quant = build_quantization_config(bits4, not bits4, torch.bfloat16, backend)
    model = AutoModelForCausalLM.from_pretrained(
        _tiny_llama_dir(tmp_path), quantization_config=quant, dtype=torch.bfloat16
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear4bit" if bits4 else "Linear8bitLt")
    ids = torch.randint(0, 128, (2, 16), device=backend.device)
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.gpu
def test_flash_attn_matches_sdpa_on_cuda(tmp_path) -> None:
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    backend = get_backend("cuda")
    path = _tiny_llama_dir(tmp_path)
    impl = resolve_attn_implementation("flash_attn", backend, torch.bfloat16)
    assert impl == "flash_attention_2"
    logits = {}
    for name in (impl, "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation=name
        ).to(backend.device)
        ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
        logits[name] = model(input_ids=ids.to(backend.device)).logits.float()
    torch.testing.assert_close(logits[impl], logits["sdpa"], atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_bf16_autocast_on_cuda() -> None:
    backend = get_backend("cuda")
    assert resolve_dtype(False, True, backend) == torch.bfloat16
    layer = torch.nn.Linear(64, 64).to(backend.device)
    x = torch.randn(8, 64, device=backend.device)
    with backend.autocast(torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=5e-2, rtol=5e-2)
