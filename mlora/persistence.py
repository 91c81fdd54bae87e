"""Adapters on disk in PEFT format, so PEFT, transformers and vLLM load what we train.

A LoRA adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module path>.lora_A.weight`` ...; DoRA adds ``.lora_magnitude_vector``).
Loading accepts our files and any PEFT LoRA; torch pickle files are read with
``weights_only=True``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from mlora.adapter_tensors import copy_into, export_tensors, lora_tensors
from mlora.atomic import atomic_write_bytes, atomic_write_text
from mlora.config import lora_scaling
from mlora.errors import MloraError, first_line
from mlora.integrity import json_problem, safetensors_problem, shape_problem, torch_file_problem
from mlora.model import LoraSpec, MultiLoraModel

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _moe_format(peft_type: str | None) -> Any:
    """The module that stores adapters of a MoE ``peft_type`` (its ``named_parameters``,
    ``optional_tensor``, ``peft_config``, ``spec_from_config``), or None for plain LoRA.

    Imported lazily: the MoE code builds on ``mlora.model``.
    """
    if peft_type == "MIXLORA":
        from mlora.moe import persistence as mixlora_format

        return mixlora_format
    if peft_type in ("LORAMOE", "MOLA"):
        from mlora import linear_moe_persistence as linear_moe_format

        return linear_moe_format
    if peft_type == "METEORA":
        from mlora import meteora_persistence as meteora_format

        return meteora_format
    return None


def _named_parameters(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of adapter ``name`` under its key in the file (live tensors)."""
    moe_format = _moe_format(model.specs[name].peft_type)
    if moe_format is not None:
        return moe_format.named_parameters(model, name)
    return {
        f"{PEFT_PREFIX}{path}.{suffix}": tensor
        for path, module in model.adapter_modules(name)
        for suffix, tensor in lora_tensors(module).items()
    }


def adapter_state_dict(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT key names (MoE: upstream's names), on CPU."""
    return export_tensors(_named_parameters(model, name))


def peft_config(
    spec: LoraSpec, lora_alpha: float, use_rslora: bool, base_model: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``LoraConfig`` reads (MoE: upstream's)."""
    moe_format = _moe_format(spec.peft_type)
    if moe_format is not None:
        return moe_format.peft_config(spec, base_model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": lora_alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        "use_rslora": use_rslora,
        "use_dora": spec.use_dora,
        "init_lora_weights": True if spec.init == "original" else "gaussian",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


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
    if _moe_format(config.get("peft_type")) is not None:  # upstream MoE loaders read .bin
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(directory / LEGACY_WEIGHTS_NAME, buffer.getvalue())
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    return json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))


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
        except Exception as exc:  # a damaged pickle: one line naming it
            raise MloraError(f"{path}: cannot be read ({first_line(exc)})") from None
    return config, tensors


def spec_from_peft_config(config: dict[str, Any], source: str) -> tuple[LoraSpec, float, bool]:
    """(LoraSpec, lora_alpha, use_rslora) of a PEFT LoRA (or MoE) adapter_config."""
    moe_format = _moe_format(config.get("peft_type"))
    if moe_format is not None:
        moe = moe_format.spec_from_config(config, source)
        return moe, moe.lora_alpha, moe.use_rslora
    if config.get("peft_type", "LORA") != "LORA":
        raise MloraError(f"{source}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    for key, kind in (("lora_alpha", (int, float)), ("lora_dropout", (int, float))):
        if not isinstance(config.get(key, 0), kind) or isinstance(config.get(key), bool):
            raise MloraError(f"{source}: {CONFIG_NAME} key {key!r} is of the wrong type")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    targets = config.get("target_modules") or []
    if not isinstance(targets, str | list) or not all(isinstance(t, str) for t in targets):
        raise MloraError(f"{source}: {CONFIG_NAME} key 'target_modules' is of the wrong type")
    if isinstance(targets, str):
        raise MloraError(
            f"{source}: regex target_modules {targets!r} are not supported; list the names"
        )
    spec = LoraSpec(
        r=r,
        scaling=lora_scaling(alpha, r, rslora),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(targets)),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "original",
        use_dora=bool(config.get("use_dora", False)),
    )
    return spec, alpha, rslora


def load_adapter_weights(
    model: MultiLoraModel, name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Copy PEFT-named tensors into adapter ``name`` (which must already exist with that shape).

    Raises:
        MloraError: a tensor the adapter needs is missing, or shapes differ (naming the key).
    """
    moe_format = _moe_format(model.specs[name].peft_type)
    if moe_format is not None:
        copy_into(_named_parameters(model, name), tensors, source, moe_format.optional_tensor)
        return
    normalised = {  # older PEFT saved the DoRA magnitude as ``lora_magnitude_vector.weight``
        k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v
        for k, v in tensors.items()
    }
    copy_into(_named_parameters(model, name), normalised, source)
