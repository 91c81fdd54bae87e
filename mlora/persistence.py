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

from mlora.atomic import atomic_write_bytes, atomic_write_text
from mlora.errors import MloraError
from mlora.model import LoraSpec, MultiLoraModel

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _is_mixlora(spec: LoraSpec | None) -> bool:
    from mlora.moe.spec import MixLoraSpec  # lazy: mlora.moe builds on mlora.model

    return isinstance(spec, MixLoraSpec)


def _is_linear_moe(spec: LoraSpec | None) -> bool:
    return getattr(spec, "strategy", None) in ("loramoe", "mola")


def adapter_state_dict(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT key names (MixLoRA: mixlora's names), on CPU."""
    if _is_mixlora(model.specs.get(name)):
        from mlora.moe.persistence import mixlora_state_dict

        return mixlora_state_dict(model, name)
    if _is_linear_moe(model.specs.get(name)):
        from mlora.linear_moe_persistence import linear_moe_state_dict

        return linear_moe_state_dict(model, name)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.adapter_modules(name):
        key = PEFT_PREFIX + path
        tensors[f"{key}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
        if module.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = (
                module.magnitude.weight.detach().cpu().contiguous()
            )
    return tensors


def peft_config(
    spec: LoraSpec, lora_alpha: float, use_rslora: bool, base_model: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``LoraConfig`` reads (MixLoRA: mixlora's)."""
    if _is_mixlora(spec):
        from mlora.moe.persistence import mixlora_peft_config

        return mixlora_peft_config(spec, base_model)  # type: ignore[arg-type]
    if _is_linear_moe(spec):
        from mlora.linear_moe_persistence import linear_moe_peft_config

        return linear_moe_peft_config(spec, base_model)  # type: ignore[arg-type]
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
    directory = Path(directory)
    tensors = adapter_state_dict(model, name)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors))
    if config.get("peft_type") in ("MIXLORA", "LORAMOE", "MOLA"):  # upstream loaders: .bin
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(directory / LEGACY_WEIGHTS_NAME, buffer.getvalue())
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT-format adapter folder: (adapter_config, tensors).

    Raises:
        MloraError: missing folder, config or weights, or invalid JSON (naming the file).
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise MloraError(f"no adapter at {directory} ({CONFIG_NAME} not found)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MloraError(f"{config_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if (directory / WEIGHTS_NAME).is_file():
        tensors = load_file(directory / WEIGHTS_NAME)
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise MloraError(f"no adapter weights in {directory} ({WEIGHTS_NAME} not found)")
    return config, tensors


def spec_from_peft_config(config: dict[str, Any], source: str) -> tuple[LoraSpec, float, bool]:
    """(LoraSpec, lora_alpha, use_rslora) of a PEFT LoRA (or MIXLORA) adapter_config."""
    if config.get("peft_type") == "MIXLORA":
        from mlora.moe.persistence import mixlora_spec_from_config

        mix = mixlora_spec_from_config(config, source)
        return mix, mix.lora_alpha, mix.use_rslora
    if config.get("peft_type") in ("LORAMOE", "MOLA"):
        from mlora.linear_moe_persistence import linear_moe_spec_from_config

        moe = linear_moe_spec_from_config(config, source)
        return moe, moe.lora_alpha, moe.use_rslora
    if config.get("peft_type", "LORA") != "LORA":
        raise MloraError(f"{source}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise MloraError(
            f"{source}: regex target_modules {targets!r} are not supported; list the names"
        )
    spec = LoraSpec(
        r=r,
        scaling=alpha / (r**0.5 if rslora else r),
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
    if _is_mixlora(model.specs.get(name)):
        from mlora.moe.persistence import load_mixlora_weights

        load_mixlora_weights(model, name, tensors, source)
        return
    if _is_linear_moe(model.specs.get(name)):
        from mlora.linear_moe_persistence import load_linear_moe_weights

        load_linear_moe_weights(model, name, tensors, source)
        return
    normalised = {
        k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v
        for k, v in tensors.items()
    }
    with torch.no_grad():
        for path, module in model.adapter_modules(name):
            key = PEFT_PREFIX + path
            targets = {
                f"{key}.lora_A.weight": module.lora_A.weight,
                f"{key}.lora_B.weight": module.lora_B.weight,
            }
            if module.magnitude is not None:
                targets[f"{key}.lora_magnitude_vector"] = module.magnitude.weight
            for tensor_key, param in targets.items():
                if tensor_key not in normalised:
                    raise MloraError(f"{source}: missing tensor {tensor_key}")
                value = normalised[tensor_key]
                if value.shape != param.shape:
                    raise MloraError(
                        f"{source}: {tensor_key} has shape {tuple(value.shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.dtype))
