"""Load a base model with trained adapters attached, for evaluation, generation and the web UI.

Adapters are read from PEFT-format folders (ours, ``DIR/NAME``, or any PEFT LoRA) through
``mlora.persistence`` and attached by name to one ``MultiLoraModel``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlora.errors import MloraError
from mlora.model import MultiLoraModel, load_base_model
from mlora.persistence import CONFIG_NAME, load_adapter_weights, read_adapter, spec_from_peft_config

logger = logging.getLogger("mlora")


def attach_adapter(model: MultiLoraModel, name: str, folder: str | Path) -> None:
    """Add adapter ``name`` to ``model`` with the weights saved in ``folder``.

    Raises:
        MloraError: no adapter there, or its tensors do not fit the model (naming the folder).
    """
    config, tensors = read_adapter(folder)
    spec, _, _ = spec_from_peft_config(config, str(folder))
    model.add_adapter(name, spec)
    try:
        load_adapter_weights(model, name, tensors, str(folder))
    except MloraError:
        model.remove_adapter(name)
        raise


def find_adapters(directory: str | Path) -> dict[str, Path]:
    """Adapter folders directly under ``directory`` (those with an adapter_config.json), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MloraError(f"adapter directory not found: {directory}")
    return {
        p.name: p for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG_NAME).is_file()
    }


def load_trained(
    base_model: str,
    adapters: Mapping[str, str | Path],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[MultiLoraModel, Any]:
    """Load ``base_model`` and attach each ``{name: folder}`` adapter; returns (model, tokenizer).

    Raises:
        MloraError: a missing adapter folder (checked before the model loads) or a bad model.
    """
    for name, folder in adapters.items():
        if not (Path(folder) / CONFIG_NAME).is_file():
            raise MloraError(
                f"adapter {name!r}: no trained adapter at {folder} ({CONFIG_NAME} not found)"
            )
    hf_model, tokenizer = load_base_model(
        base_model, dtype, device, trust_remote_code=trust_remote_code
    )
    model = MultiLoraModel(hf_model).eval()
    for name, folder in adapters.items():
        attach_adapter(model, name, folder)
        logger.info("adapter %s: loaded from %s", name, folder)
    return model, tokenizer
