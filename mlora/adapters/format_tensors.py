"""Adapter tensors under their on-disk key names: what every format (PEFT LoRA, MixLoRA,
LoRAMoE / MoLA) shares, so each format only says which key names which live parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mlora.core.errors import MloraError


def lora_tensors(adapter: Any) -> dict[str, torch.Tensor]:
    """A LoRA adapter's live parameters by key suffix (``lora_A.weight`` ...; DoRA adds
    ``lora_magnitude_vector``)."""
    tensors = {"lora_A.weight": adapter.lora_A.weight, "lora_B.weight": adapter.lora_B.weight}
    if adapter.magnitude is not None:
        tensors["lora_magnitude_vector"] = adapter.magnitude.weight
    return tensors


def layer_key(namespace: str, path: str) -> str:
    """The upstream MoE packages' key prefix of a module path
    (``model.layers.3.mlp`` -> ``mixlora.layers.3.mlp``)."""
    at = path.find("layers.")
    return f"{namespace}." + (path[at:] if at >= 0 else path)


def export_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of named live parameters, ready to save."""
    return {key: tensor.detach().cpu().contiguous() for key, tensor in params.items()}


def copy_into(
    params: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    source: str,
    optional: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy each saved tensor into the live parameter of the same key.

    Args:
        optional: keys that may be absent from ``tensors`` (the parameter then keeps its value).

    Raises:
        MloraError: a tensor is missing or has another shape (naming ``source`` and the key).
    """
    with torch.no_grad():
        for key, param in params.items():
            value = tensors.get(key)
            if value is None:
                if optional(key):
                    continue
                raise MloraError(f"{source}: missing tensor {key}")
            if value.shape != param.shape:
                raise MloraError(
                    f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def alpha_number(value: float) -> int | float:
    """An integral alpha as an int (upstream MoE loaders insist on an int ``lora_alpha``)."""
    return int(value) if float(value).is_integer() else float(value)


def moe_lora_config(spec: Any, base_model: str | None) -> dict[str, Any]:
    """The LoRA part of a MoE ``adapter_config.json`` (MIXLORA, LORAMOE, MOLA)."""
    return {
        "peft_type": spec.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "bias": "none",
        "r": spec.r,
        "lora_alpha": alpha_number(spec.lora_alpha),
        "lora_dropout": float(spec.dropout),
        "target_modules": sorted(spec.target_modules),
        "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora,
        "lora_init": spec.init,
    }


def moe_lora_fields(config: dict[str, Any], peft_type: str, source: str) -> dict[str, Any]:
    """The LoRA keyword arguments of a MoE spec builder, read from its ``adapter_config.json``.

    Raises:
        MloraError: ``r``, ``num_experts`` or ``target_modules`` is missing (naming the file).
    """
    for key in ("r", "num_experts", "target_modules"):
        if key not in config:
            raise MloraError(f"{source}: {peft_type} adapter_config lacks {key!r}")
    targets = config["target_modules"]
    if isinstance(targets, dict):
        targets = [target for target, on in targets.items() if on]
    return {
        "r": int(config["r"]),
        "lora_alpha": float(config.get("lora_alpha", 8)),
        "lora_dropout": float(config.get("lora_dropout", 0.0)),
        "target_modules": tuple(sorted(targets)),
        "init": "gaussian" if config.get("lora_init") == "gaussian" else "original",
        "use_dora": bool(config.get("use_dora", False)),
        "use_rslora": bool(config.get("use_rslora", False)),
    }
