"""Load a base model with trained adapters attached, for evaluation, generation and the web UI.

Adapters are read from PEFT-format folders (ours, ``DIR/NAME``, or any PEFT LoRA) through
``mlora.persistence.adapter_files`` and attached by name to one ``MultiLoraModel``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlora.config.adapter_names import adapter_name_problem
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.errors import DataError, MloraError
from mlora.data.chat import ChatPrompt
from mlora.data.formats import CHAT_FORMATS, is_conversational, resolve_format
from mlora.data.prompts import PromptTemplate, load_template
from mlora.data.rows import load_rows
from mlora.model.loading import BaseLoad, plan_base_load
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import (
    CONFIG_NAME,
    adapter_files_problem,
    load_adapter_weights,
    read_adapter,
    spec_from_peft_config,
)

logger = logging.getLogger("mlora")


def attach_adapter(model: MultiLoraModel, name: str, folder: str | Path) -> None:
    """Add adapter ``name`` to ``model`` with the weights saved in ``folder``.

    Raises:
        MloraError: no adapter there, or its tensors do not fit the model (naming the folder).
    """
    config, tensors = read_adapter(folder)
    spec = spec_from_peft_config(config, str(folder))
    model.add_adapter(name, spec)
    try:
        load_adapter_weights(model, name, tensors, str(folder))
    except MloraError:
        model.remove_adapter(name)
        raise


def is_trained(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved adapter (its ``adapter_config.json``)."""
    return (Path(folder) / CONFIG_NAME).is_file()


def check_trained(
    folders: Mapping[str, str | Path], hint: str = f" ({CONFIG_NAME} not found)"
) -> None:
    """Fail on the first ``{name: folder}`` without a trained adapter, before any model loads.

    Args:
        hint: appended to the message, e.g. what the user can do about it.

    Raises:
        MloraError: ``adapter NAME: no trained adapter at FOLDER`` plus ``hint``.
    """
    for name, folder in folders.items():
        if not is_trained(folder):
            raise MloraError(f"adapter {name!r}: no trained adapter at {folder}{hint}")
        problem = adapter_files_problem(folder)  # damaged: found now, not after the model loads
        if problem:
            raise MloraError(f"adapter {name!r}: {problem}")


def find_adapters(directory: str | Path) -> dict[str, Path]:
    """Adapter folders directly under ``directory`` (those with an adapter_config.json), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MloraError(f"adapter directory not found: {directory}")
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_dir() and is_trained(p)}


def load_trained(
    base_model: str,
    adapters: Mapping[str, str | Path],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    *,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    tokenizer: Any = None,
    plan: BaseLoad | None = None,
) -> tuple[MultiLoraModel, Any]:
    """Load ``base_model`` and attach each ``{name: folder}`` adapter; returns (model, tokenizer).

    ``base_model`` is a folder, a hub id, a GGUF file or ``"smollm2"`` (see
    ``mlora.model.base_model``).

    Args:
        quantize: ``"4bit"`` / ``"8bit"`` base through bitsandbytes (CUDA only).
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attn`` (None: the best usable).
        tokenizer: one already loaded, to use instead of loading it again.
        plan: a ``mlora.model.loading.plan_base_load`` result (it then decides dtype, device,
            quantization and attention).

    Raises:
        MloraError: a missing adapter folder (checked before the model loads) or a bad model.
    """
    check_trained(adapters)
    plan = plan or plan_base_load(device, dtype, quantize, attn_implementation)
    hf_model, tokenizer = plan.load(base_model, trust_remote_code, tokenizer)
    model = MultiLoraModel(hf_model).eval()
    for name, folder in adapters.items():
        attach_adapter(model, name, folder)
        logger.info("adapter %s: loaded from %s", name, folder)
    return model, tokenizer


def parse_adapter_arg(value: str) -> tuple[str, Path]:
    """``NAME=DIR`` (a command-line ``--adapter``) as ``(name, folder)``.

    Raises:
        MloraError: not of the form NAME=DIR.
    """
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise MloraError(f"--adapter {value!r}: expected NAME=DIR")
    problem = adapter_name_problem(name.strip())  # the same rule as a config's names
    if problem:
        raise MloraError(
            f"--adapter {value!r}: NAME must be usable as a folder name and a module key: {problem}"
        )
    return name.strip(), Path(folder.strip())


def config_adapter_dirs(
    config: TrainConfig, directory: str | Path, require_all: bool = True
) -> dict[str, Path]:
    """The folders ``DIR/NAME`` of the config's adapters that hold a trained adapter.

    Args:
        require_all: raise on the first adapter not trained yet; otherwise skip it (with a
            warning) and raise only when none is there.

    Raises:
        MloraError: an adapter folder is missing (naming it), or none is there.
    """
    folders = {adapter.name: Path(directory) / adapter.name for adapter in config.lora}
    if require_all:
        check_trained(folders, hint="")
    found = {name: folder for name, folder in folders.items() if is_trained(folder)}
    missing = [folder for name, folder in folders.items() if name not in found]
    if not found:
        raise MloraError(f"no trained adapter of {config.source} found in {directory}")
    for folder in missing:
        logger.warning("adapter %s: not trained yet (no %s), skipped", folder.name, folder)
    return found


def config_templates(config: TrainConfig) -> dict[str, PromptTemplate | ChatPrompt]:
    """Each adapter's prompt template, so prompts can be rendered the way it was trained: its
    ``prompt`` template, or the chat template for adapters trained on conversations (a
    ``ChatPrompt`` to bind to the tokenizer, ``mlora.data.chat.bind_templates``)."""
    return {
        adapter.name: ChatPrompt() if trained_on_chat(adapter) else load_template(adapter.prompt)
        for adapter in config.lora
    }


def trained_on_chat(adapter: AdapterConfig) -> bool:
    """Whether ``adapter``'s rows are conversations (its ``data_format``, else its data's first
    row; a data file no longer there: its ``prompt`` template, with a warning)."""
    if adapter.data_format not in ("auto", "prompt_completion", "preference"):
        return adapter.data_format in CHAT_FORMATS
    try:
        rows = load_rows(adapter.data)
        return is_conversational(rows, resolve_format(rows, adapter.data_format, adapter.data))
    except DataError as exc:
        logger.warning("adapter %s: %s; prompts use its prompt template", adapter.name, exc)
        return False
