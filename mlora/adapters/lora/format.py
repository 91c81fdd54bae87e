"""Plain LoRA (and DoRA) in PEFT's format, so PEFT, transformers and vLLM load what we train.

Keys are ``base_model.model.<module path>.lora_A.weight`` ...; DoRA adds
``.lora_magnitude_vector`` (older PEFT saved it as ``lora_magnitude_vector.weight``, read too).
Loading accepts our files and any PEFT LoRA.
"""

from __future__ import annotations

from typing import Any

import torch

from mlora.adapters import AdapterModel, LoraSpec
from mlora.adapters.format_tensors import lora_tensors
from mlora.adapters.peft_files import CONFIG_NAME, PEFT_PREFIX
from mlora.config.schema import lora_scaling
from mlora.core.errors import MloraError


def named_parameters(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of LoRA adapter ``name`` under its PEFT key (live tensors)."""
    return {
        f"{PEFT_PREFIX}{path}.{suffix}": tensor
        for path, module in model.adapter_modules(name)
        for suffix, tensor in lora_tensors(module).items()
    }


def legacy_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under today's PEFT keys (older PEFT: ``lora_magnitude_vector.weight``)."""
    return {
        k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v
        for k, v in tensors.items()
    }


def peft_config(spec: LoraSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``LoraConfig`` reads (``target_parameters`` only
    where the adapter has them, so other files stay as older PEFT versions read them)."""
    parameters = {"target_parameters": sorted(spec.target_parameters)}
    return {
        **(parameters if spec.target_parameters else {}),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        "use_rslora": spec.use_rslora,
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


def spec_from_peft_config(config: dict[str, Any], source: str) -> LoraSpec:
    """The LoraSpec of a PEFT LoRA adapter_config.

    Raises:
        MloraError: not a LoRA ``peft_type``, or a key of the wrong type (naming ``source``).
    """
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
    parameters = config.get("target_parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(t, str) for t in parameters):
        raise MloraError(f"{source}: {CONFIG_NAME} key 'target_parameters' is of the wrong type")
    spec = LoraSpec(
        r=r,
        scaling=lora_scaling(alpha, r, rslora),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(targets)),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "original",
        use_dora=bool(config.get("use_dora", False)),
        lora_alpha=alpha,
        use_rslora=rslora,
        target_parameters=tuple(sorted(parameters)),
    )
    return spec
