"""Adapters on disk in PEFT format, so PEFT, transformers and vLLM load what we train.

Every kind's folder is ``adapter_config.json`` + ``adapter_model.safetensors``
(``mlora.adapters.peft_files``); the key names and the config are the kind's own format
(``mlora/adapters/KIND/format.py``), found through ``mlora.adapters.kinds``: plain LoRA and
DoRA use PEFT's, the MoE kinds their upstream packages'. Loading accepts our files and any
PEFT LoRA.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from mlora.adapters import LoraSpec
from mlora.adapters.format_tensors import copy_into, export_tensors
from mlora.adapters.kinds import kind_for_peft_type
from mlora.adapters.peft_files import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    adapter_files_problem,
    read_adapter,
    read_adapter_config,
)
from mlora.core.atomic import atomic_write_bytes, atomic_write_text
from mlora.model.multi_lora import MultiLoraModel

__all__ = [
    "CONFIG_NAME",
    "LEGACY_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "adapter_files_problem",
    "adapter_state_dict",
    "load_adapter_weights",
    "peft_config",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
    "spec_from_peft_config",
]


def _named_parameters(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of adapter ``name`` under its key in the file (live tensors)."""
    return kind_for_peft_type(model.specs[name].peft_type).named_parameters(model, name)


def adapter_state_dict(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT key names (MoE: upstream's names), on CPU."""
    return export_tensors(_named_parameters(model, name))


def peft_config(spec: LoraSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``LoraConfig`` reads (MoE: upstream's)."""
    return kind_for_peft_type(spec.peft_type).peft_config(spec, base_model)


def save_adapter(
    model: MultiLoraModel, name: str, directory: str | Path, config: dict[str, Any]
) -> None:
    """Write adapter ``name`` to ``directory`` in PEFT format, each file atomically."""
    write_adapter_files(directory, adapter_state_dict(model, name), config)


def write_adapter_files(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Write PEFT-named ``tensors`` and their ``adapter_config.json`` to ``directory``, each
    file atomically (``save_adapter`` on a snapshot taken earlier)."""
    directory = Path(directory)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors))
    if kind_for_peft_type(config.get("peft_type")).writes_legacy_bin:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(directory / LEGACY_WEIGHTS_NAME, buffer.getvalue())
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def spec_from_peft_config(config: dict[str, Any], source: str) -> LoraSpec:
    """The spec of a PEFT LoRA (or MoE) adapter_config (alpha and rsLoRA included)."""
    return kind_for_peft_type(config.get("peft_type")).spec_from_peft_config(config, source)


def load_adapter_weights(
    model: MultiLoraModel, name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Copy PEFT-named tensors into adapter ``name`` (which must already exist with that shape).

    Raises:
        MloraError: a tensor the adapter needs is missing, or shapes differ (naming the key).
    """
    kind = kind_for_peft_type(model.specs[name].peft_type)
    live = kind.named_parameters(model, name)
    copy_into(live, kind.legacy_names(tensors), source, kind.optional_tensor)
