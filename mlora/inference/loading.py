"""One way to load the base model, for every entry point (train, evaluate, generate, chat).

Loading has two halves with work between them: ``plan_base_load`` settles everything that can
fail without reading weights (the backend, one GPU per local rank under torchrun, whether it
computes in the dtype, quantization and attention choices), so a bad flag fails in a second;
``BaseLoad.load`` then reads the tokenizer and the weights the same way for everyone. Training
prepares its data between the two, so bad rows fail before the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlora.hardware.backends import Backend, get_backend
from mlora.hardware.precision import base_model_load_options, check_dtype
from mlora.model.multi_lora import load_base_model, load_tokenizer
from mlora.training.distributed import local_device

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
