"""Checks that run before anything expensive loads, so bad input fails in a second, not later.

Loading a large base model takes minutes; a typo in a data path or a target module name should
not cost that. These checks need only the config, the file system and the model's
``config.json`` (the module structure is built on the ``meta`` device: no weights, no memory).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from mlora.config import TrainConfig
from mlora.data import local_data_path
from mlora.errors import MloraError
from mlora.prompts import load_template

logger = logging.getLogger("mlora")


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


def check_remote_code(base_model: str, trust_remote_code: bool) -> None:
    """A local model that needs its own Python code is refused unless ``--trust_remote_code``.

    transformers would refuse it too, but only after the tokenizer and the data; and its message
    does not name our flag. Architectures transformers knows load with its own code (no check).

    Raises:
        MloraError: naming the model and the flag.
    """
    path = Path(base_model).expanduser() / "config.json"
    if trust_remote_code or not path.is_file():
        return
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config when it loads it
    from transformers import CONFIG_MAPPING

    known = isinstance(raw, dict) and raw.get("model_type") in CONFIG_MAPPING
    if isinstance(raw, dict) and raw.get("auto_map") and not known:
        raise MloraError(
            f"base model {base_model} needs its own Python code (auto_map in its config.json); "
            "pass --trust_remote_code to run it, only if you trust its author"
        )


def check_data_sources(config: TrainConfig) -> None:
    """Every local data file exists and has a supported extension; every template loads.

    Raises:
        DataError / ConfigError: naming the adapter's file or template.
    """
    for adapter in config.lora:
        load_template(adapter.prompt)
        local_data_path(adapter.data, f"adapter {adapter.name!r}: data")


def meteora_targets(config: TrainConfig) -> dict[str, list[str]]:
    """The gated modules of each MeteoRA adapter, its adapter folders read and checked.

    Raises:
        MloraError: a folder MeteoRA cannot embed (see ``meteora_persistence.meteora_spec``).
    """
    from mlora.meteora_persistence import meteora_spec

    return {
        adapter.name: list(meteora_spec(adapter, f"{config.source}: adapter {adapter.name!r}")
                           .target_modules)
        for adapter in config.lora
        if adapter.routing_strategy == "meteora"
    }  # fmt: skip


def adaptable_module_names(base_model: str, trust_remote_code: bool = False) -> set[str] | None:
    """Last name components of the layers adapters can wrap, from the model's structure alone.

    Builds the model on the ``meta`` device from its config (no weights are read). Returns
    ``None`` when the config cannot be read here (e.g. a hub id while offline): the check then
    happens when the model loads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlora.model import _DISPATCH

    try:
        model_config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # any failure here only postpones the check
        logger.debug("target module check postponed: %s", exc)
        return None
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and any(matches(module) for matches, _ in _DISPATCH)
    }


def check_target_modules(
    config: TrainConfig,
    base_model: str,
    trust_remote_code: bool,
    overrides: dict[str, list[str]] | None = None,
) -> None:
    """Every adapter's target modules exist in the base model.

    Args:
        overrides: target modules by adapter name where the config does not name them
            (MeteoRA: its gated modules).

    Raises:
        MloraError: naming the adapter, the module and the model's adaptable layers.
    """
    names = adaptable_module_names(base_model, trust_remote_code)
    if names is None:
        return
    for adapter in config.lora:
        targets = (overrides or {}).get(adapter.name, adapter.target_module_names)
        missing = sorted(set(targets) - names)
        if missing:
            raise MloraError(
                f"{config.source}: adapter {adapter.name!r}: target module {missing[0]!r} not "
                f"found in {base_model} (its linear layers: {', '.join(sorted(names))})"
            )


def check_writable(output_dir: Path) -> None:
    """``output_dir`` can be created and written (else one line now, not after training).

    Raises:
        MloraError: naming the folder and the reason (permission denied, disk full, ...).
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mlora-write-test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MloraError(f"cannot write {output_dir}: {exc.strerror or exc}") from None


def preflight(
    config: TrainConfig, base_model: str, output_dir: Path, trust_remote_code: bool = False
) -> None:
    """All checks that need neither the tokenizer nor the model's weights."""
    check_base_model_path(base_model)
    check_remote_code(base_model, trust_remote_code)
    check_data_sources(config)
    check_target_modules(config, base_model, trust_remote_code, meteora_targets(config))
    check_writable(output_dir)
