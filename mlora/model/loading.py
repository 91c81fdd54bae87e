"""The one way to load the base model, for every entry point (train, evaluate, generate, chat).

Loading has two halves with work between them: ``plan_base_load`` settles everything that can
fail without reading weights (the backend, one GPU per local rank under torchrun, whether it
computes in the dtype, quantization and attention choices), so a bad flag fails in a second;
``BaseLoad.load`` then reads the tokenizer and the weights the same way for everyone. Training
prepares its data between the two, so bad rows fail before the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlora.core.errors import MloraError, first_line
from mlora.core.hub import before_loading
from mlora.hardware.backends import Backend, get_backend
from mlora.hardware.backends.selection import local_device
from mlora.hardware.precision import base_model_load_options, check_dtype
from mlora.model.base_model import resolve_base_model, transformers_progress_bars_off

logger = logging.getLogger("mlora")


@dataclass(frozen=True)
class BaseLoad:
    """How the base model loads here, settled before any weight is read.

    Attributes:
        backend: the device backend (this rank's GPU under torchrun).
        dtype: the frozen base's compute dtype.
        quantize: ``"4bit"``, ``"8bit"`` or None.
        options: ``load_base_model`` keyword arguments (attention, quantization, placement).
    """

    backend: Backend
    dtype: torch.dtype
    quantize: str | None
    options: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def load_tokenizer(self, base_model: str, trust_remote_code: bool = False) -> Any:
        """The base model's tokenizer (to prepare data before the weights load)."""
        return load_tokenizer(base_model, trust_remote_code)

    def load(
        self,
        base_model: str,
        trust_remote_code: bool = False,
        tokenizer: Any = None,
        device: torch.device | None = None,
    ) -> tuple[nn.Module, Any]:
        """The frozen causal LM on this plan's device (or ``device``: ``--fsdp`` reads the base
        into host memory on rank 0), and its tokenizer (``tokenizer`` if given).

        Raises:
            MloraError: the model cannot be loaded (one line naming it).
        """
        hf_model, tokenizer = load_base_model(
            base_model,
            self.dtype,
            device or self.device,
            trust_remote_code=trust_remote_code,
            tokenizer=tokenizer,
            **self.options,
        )
        logger.info(
            "backend %s (%s), base dtype %s, attention %s, quantization %s",
            self.backend.label, self.device, self.dtype, self.options["attn_implementation"],
            self.quantize or "none",
        )  # fmt: skip
        return hf_model, tokenizer


def plan_base_load(
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    dtype_flag: str = "dtype",
) -> BaseLoad:
    """Settle how the base model loads, without reading it.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; None: ``$MLORA_BACKEND_TYPE``, else the
            best available. Under torchrun each rank takes the GPU of its local rank.
        dtype: the base's compute dtype; ``dtype_flag`` names it in the error.
        quantize: ``"4bit"`` or ``"8bit"`` through bitsandbytes (CUDA only), or None.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attn`` or None (the best usable).

    Raises:
        MloraError: the backend cannot compute in ``dtype``, or a quantization / attention
            choice it cannot run.
    """
    backend = get_backend(None if device is None else str(device))  # before any device use
    backend = get_backend(str(local_device(backend.device)))  # torchrun: a GPU per local rank
    check_dtype(dtype, backend, dtype_flag)
    options = base_model_load_options(backend, dtype, quantize, attn_implementation)
    return BaseLoad(backend, dtype, quantize, options)


def check_base_model_path(base_model: str) -> None:
    """A local-looking base model must be a folder with ``config.json``.

    Raises:
        MloraError: naming the path.
    """
    local = Path(base_model)
    if (base_model.startswith((".", "/", "~")) or local.exists()) and not (
        local.expanduser() / "config.json"
    ).is_file():
        raise MloraError(f"base model not found: {base_model} (no config.json in that directory)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, hub id or GGUF file, padding with EOS when it has no pad.

    Raises:
        MloraError: it cannot be loaded (one line naming it).
    """
    from transformers import AutoTokenizer

    name_or_path = resolve_base_model(name_or_path)
    before_loading(name_or_path, "base model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        message = f"cannot load the tokenizer of {name_or_path}: {first_line(exc)}"
        raise MloraError(message) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory, the hub or a GGUF file.

    Args:
        tokenizer: one already loaded (``load_tokenizer``) to return instead of loading it again.

    Raises:
        MloraError: the path/name cannot be loaded (one line naming it).
    """
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_base_model(name_or_path)
    check_base_model_path(name_or_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    try:
        with transformers_progress_bars_off():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                **from_pretrained_kwargs,
            )
    except (OSError, ValueError) as exc:
        raise MloraError(f"cannot load base model {name_or_path}: {first_line(exc)}") from None
    if "quantization_config" not in from_pretrained_kwargs:
        model.to(device)
    logger.info("loaded %s (%s, %s)", name_or_path, type(model).__name__, dtype)
    return model, tokenizer


def empty_base_model(
    model_path: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> nn.Module:
    """The base model built from its config on the meta device: modules and shapes, no memory
    (the ranks other than 0 under ``--fsdp``, whose shards come from rank 0; the preflight's
    checks of module names and tensor layouts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
