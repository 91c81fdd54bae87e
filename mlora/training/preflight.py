"""Checks that run before anything expensive loads, so bad input fails in a second, not later.

Loading a large base model takes minutes; a typo in a data path or a target module name should
not cost that. These checks need only the config, the file system and the model's
``config.json`` (the module structure is built on the ``meta`` device: no weights, no memory).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from mlora.adapters.kinds import kind_for_config
from mlora.config.schema import TrainConfig
from mlora.core.errors import MloraError
from mlora.core.integrity import json_problem, safetensors_problem, shape_problem
from mlora.core.os_errors import write_problem
from mlora.data.prompts import load_template
from mlora.data.rows import local_data_path
from mlora.model.loading import check_base_model_path

logger = logging.getLogger("mlora")


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
    raw, problem = json_problem(path)
    if problem:
        return  # check_base_weights names an unreadable config
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


def own_targets(config: TrainConfig) -> dict[str, list[str]]:
    """The wrapped modules of each adapter whose kind takes them from its own files (MeteoRA:
    the LoRAs it embeds), those files read and checked.

    Raises:
        MloraError: a file the kind cannot use (e.g. MeteoRA's ``meteora_spec``).
    """
    found = {}
    for adapter in config.lora:
        read = kind_for_config(adapter).own_targets
        if read is not None:
            found[adapter.name] = read(adapter, f"{config.source}: adapter {adapter.name!r}")
    return found


def _meta_model(base_model: str, trust_remote_code: bool) -> torch.nn.Module | None:
    """The model built on the ``meta`` device from its config, or None where the config
    cannot be read here (the checks then happen when the model loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError, ImportError) as exc:  # unreadable here: postponed
        logger.debug("target module check postponed: %s", exc)
        return None


def check_target_parameters(config: TrainConfig, base_model: str, trust_remote_code: bool) -> None:
    """Every adapter's ``target_parameters`` name tensors of a layout mlora adapts (checked on
    the ``meta`` model, before any weight is read; routers are probed when the model loads).

    Raises:
        MloraError: naming the config, the adapter, the parameter and why.
    """
    from mlora.model.parameter_targets import plan_parameter_targets

    wanted = [adapter for adapter in config.lora if adapter.target_parameters]
    model = _meta_model(base_model, trust_remote_code) if wanted else None
    for adapter in wanted if model is not None else []:
        try:
            plan_parameter_targets(model, adapter.name, tuple(adapter.target_parameters))
        except MloraError as exc:
            raise MloraError(f"{config.source}: {exc}") from None


def adaptable_modules(base_model: str, trust_remote_code: bool = False) -> dict[str, int] | None:
    """The layers adapters can wrap, by last name component, with the smallest of their input
    and output sizes over the model (the largest rank that makes sense for them).

    Builds the model on the ``meta`` device from its config (no weights are read). Returns
    ``None`` when the config cannot be read here (e.g. a hub id while offline): the check then
    happens when the model loads.
    """
    from mlora.model.multi_lora import can_wrap

    model = _meta_model(base_model, trust_remote_code)
    if model is None:
        return None
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        if name and can_wrap(module):
            short = name.rsplit(".", 1)[-1]
            smallest = min(module.weight.shape)
            sizes[short] = min(sizes.get(short, smallest), smallest)
    return sizes


def check_target_modules(
    config: TrainConfig,
    base_model: str,
    trust_remote_code: bool,
    overrides: dict[str, list[str]] | None = None,
) -> None:
    """Every adapter's target modules exist in the base model, and its rank fits them.

    Args:
        overrides: target modules by adapter name where the kind reads them from its own
            files (``own_targets``); their ranks are not the config's ``r``.

    Raises:
        MloraError: naming the adapter, the module and the model's adaptable layers (or the
            rank and the layer's size).
    """
    sizes = adaptable_modules(base_model, trust_remote_code)
    if sizes is None:
        return
    for adapter in config.lora:
        where = f"{config.source}: adapter {adapter.name!r}"
        targets = (overrides or {}).get(adapter.name, adapter.target_module_names)
        missing = sorted(set(targets) - set(sizes))
        if missing:
            raise MloraError(
                f"{where}: target module {missing[0]!r} not found in {base_model} "
                f"(its linear layers: {', '.join(sorted(sizes))})"
            )
        if adapter.name in (overrides or {}):
            continue  # its ranks are its files', checked as they load
        module = min(adapter.target_module_names, key=lambda name: sizes[name])
        if adapter.r > sizes[module]:
            raise MloraError(
                f"{where}: key 'r' ({adapter.r}) exceeds the size of its target module "
                f"{module!r} ({sizes[module]}) in {base_model}"
            )


def check_base_weights(base_model: str) -> None:
    """A local base model's ``config.json`` is a JSON object and its weight files are whole.

    Reads headers only; a truncated shard would otherwise fail after the tokenizer and the
    data, with a ``SafetensorError`` traceback.

    Raises:
        MloraError: naming the file and what is wrong.
    """
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        return  # a hub id: transformers checks what it downloads
    value, problem = json_problem(folder / "config.json")
    problem = problem or shape_problem(value, {})
    if problem:
        raise MloraError(f"{folder / 'config.json'}: {problem}")
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise MloraError(f"base model weights {path}: {problem}")


def check_cutoff_len(config: TrainConfig, base_model: str) -> None:
    """Warn when ``cutoff_len`` exceeds the positions the base model was trained for (as TRL
    does): rows that long are past its context window (and crash a model with learned
    absolute positions, where transformers raises an index error)."""
    raw, problem = json_problem(Path(base_model).expanduser() / "config.json")
    if problem or not isinstance(raw, dict):
        return
    limit = raw.get("max_position_embeddings", raw.get("n_positions"))
    if isinstance(limit, int) and config.cutoff_len > limit:
        logger.warning(
            "%s: key 'cutoff_len' (%d) exceeds the base model's max_position_embeddings (%d)",
            config.source, config.cutoff_len, limit,
        )  # fmt: skip


def check_adapter_folders(config: TrainConfig, output_dir: Path) -> None:
    """With ``--load_adapter``: every ``DIR/NAME`` holds a whole adapter.

    Raises:
        MloraError: naming the folder or file and what is missing or damaged.
    """
    from mlora.persistence.adapter_files import adapter_files_problem

    for adapter in config.lora:
        problem = adapter_files_problem(output_dir / adapter.name)
        if problem:
            raise MloraError(f"--load_adapter: {problem}")


SEED_LIMIT = 2**63


def check_seed(seed: int) -> None:
    """The seed fits what consumes it (torch generators take 64-bit seeds; we keep it signed).

    Raises:
        MloraError: naming the value and the range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise MloraError(f"--seed must be an integer in [0, 2**63), got {seed!r}")


def check_output_file(path: Path) -> None:
    """``path`` can be written when the work is done: its folder is writable and it is not a
    folder itself (else the results would be lost after the work).

    Raises:
        MloraError: naming the path and the reason.
    """
    if path.is_dir():
        raise MloraError(f"cannot write {path}: it is a directory")
    check_writable(path.parent)


def check_adapter_paths(config: TrainConfig, output_dir: Path) -> None:
    """Each ``DIR/NAME`` is a folder or free, so the run never fails (or, with --overwrite,
    replaces a user's file) where it saves an adapter; checked before anything is written.

    Raises:
        MloraError: naming the file in the way and the adapter that would be saved there.
    """
    for adapter in config.lora:
        folder = output_dir / adapter.name
        if os.path.lexists(folder) and not folder.is_dir():
            raise MloraError(
                f"{folder} is a file, not a folder: adapter {adapter.name!r} is saved there; "
                "move the file away or pass another --dir"
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
        raise MloraError(f"cannot write {output_dir}: {write_problem(output_dir, exc)}") from None


def preflight(
    config: TrainConfig,
    base_model: str,
    output_dir: Path,
    trust_remote_code: bool = False,
    load_adapter: bool = False,
) -> None:
    """All checks that need neither the tokenizer nor the model's weights."""
    check_base_model_path(base_model)
    check_remote_code(base_model, trust_remote_code)
    check_base_weights(base_model)
    check_data_sources(config)
    check_target_modules(config, base_model, trust_remote_code, own_targets(config))
    check_target_parameters(config, base_model, trust_remote_code)
    check_cutoff_len(config, base_model)
    check_writable(output_dir)
    if load_adapter:
        check_adapter_folders(config, output_dir)
