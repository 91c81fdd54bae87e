"""Library code behind the inference commands (generate.py, ``mlora.py --inference``, the web
page): which adapter folders to load, loading them onto the base model, quiet loading.

The command lines parse flags and call these; none of them holds loading code of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mlora.config.schema import load_config
from mlora.core.errors import MloraError
from mlora.data.prompts import PromptTemplate
from mlora.inference.trained import (
    config_adapter_dirs,
    config_templates,
    find_adapters,
    load_trained,
    parse_adapter_arg,
)
from mlora.model.base_model import with_gguf_file
from mlora.model.loading import plan_base_load
from mlora.model.multi_lora import MultiLoraModel


def adapter_sources(
    config: str | None = None,
    output_dir: str | None = None,
    adapters: list[str] | tuple[str, ...] = (),
    require_all: bool = True,
) -> tuple[dict[str, Path], dict[str, PromptTemplate]]:
    """The adapter folders to load by name, and the config's templates (empty without one).

    Args:
        config: a training config: load exactly its adapters from ``output_dir``.
        output_dir: a training output folder; without ``config``, every adapter found there.
        adapters: ``NAME=DIR`` values (``--adapter``).
        require_all: with ``config``, every adapter of it must have been trained.

    Raises:
        MloraError: a bad NAME=DIR value, a missing folder, a name given twice.
    """
    folders: dict[str, Path] = {}
    templates: dict[str, PromptTemplate] = {}
    if config and not output_dir:
        raise MloraError("--config needs --dir (the folder the adapters were trained into)")
    if config:
        train_config = load_config(config)
        folders.update(config_adapter_dirs(train_config, output_dir, require_all))
        templates = config_templates(train_config)
    elif output_dir:
        folders.update(find_adapters(output_dir))
        if not folders:
            raise MloraError(f"no trained adapter found in {output_dir}")
    for value in adapters:
        name, folder = parse_adapter_arg(value)
        if name in folders:
            raise MloraError(f"adapter {name!r} given twice")
        if not folder.is_dir():
            raise MloraError(f"adapter {name!r}: directory not found: {folder}")
        folders[name] = folder
    return folders, templates


def load_model(
    base_model: str,
    folders: dict[str, Path],
    *,
    gguf_file: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    dtype_flag: str = "dtype",
    quantize: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[MultiLoraModel, Any]:
    """The base model (see ``mlora.model.loading``) with ``folders``' adapters attached, and its
    tokenizer."""
    plan = plan_base_load(device, dtype, quantize, attn_implementation, dtype_flag)
    return load_trained(
        with_gguf_file(base_model, gguf_file),
        folders,
        trust_remote_code=trust_remote_code,
        plan=plan,
    )


def quiet_loading() -> None:
    """No loading logs or progress bars on the terminal (they would mix with the answers)."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("mlora").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
