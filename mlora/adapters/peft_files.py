"""The files of an adapter folder in PEFT format: their names, and reading them whole.

``adapter_config.json`` + ``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``
that upstream MoE loaders read). Torch pickle files are read with ``weights_only=True``.
Every adapter kind stores its tensors in these files; what the keys are is the kind's own
format (``mlora.adapters.kinds``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mlora.core.errors import MloraError, first_line
from mlora.core.integrity import (
    json_problem,
    safetensors_problem,
    shape_problem,
    torch_file_problem,
)

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# What ``torch.load(weights_only=True)`` raises on a damaged or foreign file: a broken zip
# archive (RuntimeError), a short or empty file (EOFError), garbage (KeyError,
# UnpicklingError), a forbidden global (UnpicklingError), an unreadable file (OSError).
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError, OSError)


def adapter_files_problem(directory: str | Path) -> str | None:
    """What is missing or damaged in an adapter folder (naming the file), or None.

    Reads the config and the safetensors header only, so it is cheap enough to run on every
    folder before the base model loads.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        return f"no adapter at {directory} ({CONFIG_NAME} not found)"
    config, problem = json_problem(config_path)
    problem = problem or shape_problem(config, {})
    if problem is None and config.get("peft_type", "LORA") == "LORA":
        problem = shape_problem(config, {"r": int})
    if problem:
        return f"{config_path}: {problem}"
    if (directory / WEIGHTS_NAME).is_file():
        problem = safetensors_problem(directory / WEIGHTS_NAME)
        return f"{directory / WEIGHTS_NAME}: {problem}" if problem else None
    if not (directory / LEGACY_WEIGHTS_NAME).is_file():
        return f"no adapter weights in {directory} ({WEIGHTS_NAME} not found)"
    problem = torch_file_problem(directory / LEGACY_WEIGHTS_NAME)
    return f"{directory / LEGACY_WEIGHTS_NAME}: {problem}" if problem else None


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder whose files are whole (checked as
    ``read_adapter`` checks them, without reading the tensors).

    Raises:
        MloraError: missing folder, config or weights, or a damaged file (naming it).
    """
    problem = adapter_files_problem(directory)
    if problem:
        raise MloraError(problem)
    config, problem = json_problem(Path(directory) / CONFIG_NAME)
    if problem:  # changed since the check a moment ago
        raise MloraError(f"{Path(directory) / CONFIG_NAME}: {problem}")
    return config


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT-format adapter folder: (adapter_config, tensors).

    Raises:
        MloraError: missing folder, config or weights, a damaged file or a config of the wrong
            shape (naming the file).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if (directory / WEIGHTS_NAME).is_file():
        tensors = load_file(directory / WEIGHTS_NAME)
    else:
        path = directory / LEGACY_WEIGHTS_NAME
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as exc:  # a damaged pickle: one line naming it
            raise MloraError(f"{path}: cannot be read ({first_line(exc)})") from None
    return config, tensors
