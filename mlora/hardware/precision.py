"""What dtype, quantization and attention kernel the frozen base model is loaded with.

These are the three choices that decide whether a base model fits the user's hardware. Each
maps a command-line flag onto the object transformers expects, and fails with a one-line
``MloraError`` naming the flag when the machine cannot honour it — before any weights load.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers.utils import is_bitsandbytes_available, is_flash_attn_2_available

from mlora.core.errors import MloraError
from mlora.hardware.backends import Backend, CudaBackend, get_backend

ATTN_IMPLEMENTATIONS: dict[str, str] = {
    "eager": "eager",
    "sdpa": "sdpa",
    "flash_attn": "flash_attention_2",
}
"""``--attn_impl`` values and the ``attn_implementation`` transformers calls them."""

_ALIASES = {"flash_attention_2": "flash_attn"}
"""transformers' own names, accepted too (library callers pass them)."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def resolve_dtype(fp16: bool, bf16: bool, backend: Backend | None = None) -> torch.dtype:
    """The base model's compute dtype from ``--fp16`` / ``--bf16`` (fp32 when neither).

    Adapter weights stay fp32 whatever this returns; only the frozen base computes in it.

    Args:
        fp16: ``--fp16`` was given.
        bf16: ``--bf16`` was given.
        backend: When given, the dtype must be one it supports.

    Raises:
        MloraError: Both flags are set, or the backend cannot compute in the dtype.
    """
    if fp16 and bf16:
        raise MloraError("--fp16 and --bf16 are mutually exclusive; pass at most one")
    dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    if backend is not None:
        check_dtype(dtype, backend, "--fp16" if fp16 else "--bf16")
    return dtype


def check_dtype(dtype: torch.dtype, backend: Backend, flag: str = "dtype") -> None:
    """Fail before loading when ``backend`` cannot compute in ``dtype``.

    Raises:
        MloraError: naming ``flag``, the backend and the dtype.
    """
    if dtype not in backend.supported_dtypes():
        raise MloraError(f"{flag}: the {backend.label} device here does not support {dtype}")


def build_quantization_config(
    load_4bit: bool,
    load_8bit: bool,
    compute_dtype: torch.dtype,
    backend: Backend | None = None,
) -> transformers.BitsAndBytesConfig | None:
    """A bitsandbytes config for QLoRA-style loading, or ``None`` for an unquantized base.

    4-bit uses NF4 with double quantization (the QLoRA recipe) and dequantizes to
    ``compute_dtype`` for each matmul.

    Args:
        load_4bit: ``--load_4bit`` was given.
        load_8bit: ``--load_8bit`` was given.
        compute_dtype: The dtype from :func:`resolve_dtype`.
        backend: Where the model will run; defaults to :func:`get_backend`.

    Raises:
        MloraError: Both flags are set, the backend is not CUDA, or bitsandbytes is missing.
    """
    if load_4bit and load_8bit:
        raise MloraError("--load_4bit and --load_8bit are mutually exclusive; pass at most one")
    if not (load_4bit or load_8bit):
        return None
    flag = "--load_4bit" if load_4bit else "--load_8bit"
    backend = backend if backend is not None else get_backend()
    if not isinstance(backend, CudaBackend):
        raise MloraError(f"{flag} needs a CUDA device; the selected backend is {backend.label}")
    if not is_bitsandbytes_available():
        raise MloraError(f"{flag} needs bitsandbytes: pip install 'mlora[quant]'")
    if load_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def resolve_attn_implementation(
    requested: str | None, backend: Backend, dtype: torch.dtype | None = None
) -> str:
    """transformers' ``attn_implementation`` for ``--attn_impl``.

    The default is FlashAttention-2 on CUDA when flash-attn is installed and the base computes in
    fp16/bf16 (the only dtypes it supports), and sdpa otherwise. Asking for ``flash_attn`` where
    it cannot run falls back to sdpa with a warning rather than failing a long job.

    Args:
        requested: ``eager``, ``sdpa``, ``flash_attn`` (or ``flash_attention_2``) or ``None``
            for the default.
        backend: Where the model will run.
        dtype: The base compute dtype, when known.

    Raises:
        MloraError: ``requested`` is not one of the names above.
    """
    if requested is None:
        if _flash_attn_usable(backend) and dtype in _HALF_DTYPES:
            return ATTN_IMPLEMENTATIONS["flash_attn"]
        return ATTN_IMPLEMENTATIONS["sdpa"]
    requested = _ALIASES.get(requested, requested)
    if requested not in ATTN_IMPLEMENTATIONS:
        choices = "|".join(ATTN_IMPLEMENTATIONS)
        raise MloraError(f"--attn_impl {requested!r} is not one of {choices}")
    if requested == "flash_attn":
        reason = None
        if not isinstance(backend, CudaBackend):
            reason = f"it needs CUDA and the backend is {backend.label}"
        elif not _flash_attn_usable(backend):
            reason = "flash-attn is not installed (pip install 'mlora[flash]')"
        elif dtype is not None and dtype not in _HALF_DTYPES:
            reason = f"it supports fp16/bf16 only and the base computes in {dtype}"
        if reason is not None:
            warnings.warn(f"--attn_impl flash_attn: {reason}; using sdpa", stacklevel=2)
            return ATTN_IMPLEMENTATIONS["sdpa"]
    return ATTN_IMPLEMENTATIONS[requested]


def _flash_attn_usable(backend: Backend) -> bool:
    return isinstance(backend, CudaBackend) and is_flash_attn_2_available()


def base_model_load_options(
    backend: Backend,
    dtype: torch.dtype,
    quantize: str | None = None,
    attn_implementation: str | None = None,
) -> dict:
    """``load_base_model`` keyword arguments for a quantization and attention choice.

    One place for training, evaluation and generation, so each loads the base the same way. A
    quantized base is placed by transformers (bitsandbytes quantizes while loading to CUDA).

    Raises:
        MloraError: an unknown ``quantize``, or a choice the backend cannot run.
    """
    if quantize not in (None, "4bit", "8bit"):
        raise MloraError(f"quantize {quantize!r} is not one of 4bit, 8bit")
    quantization = build_quantization_config(quantize == "4bit", quantize == "8bit", dtype, backend)
    options: dict = {
        "attn_implementation": resolve_attn_implementation(attn_implementation, backend, dtype)
    }
    if quantization is not None:
        options.update(quantization_config=quantization, device_map={"": str(backend.device)})
    return options
