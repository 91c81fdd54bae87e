"""LoRAMoE / MoLA adapters on disk, in upstream MoE-PEFT's layout (MixLoRA's format family).

``adapter_config.json`` holds the LoRA keys (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ...) plus ``peft_type`` ("LORAMOE" or "MOLA"), ``routing_strategy``,
``num_experts``, ``router_init_range`` and, for MoLA, ``top_k``, ``router_aux_loss_coef`` and
``router_loss``. Tensors, with ``P`` = "loramoe" or "mola" and decoder layer ``i``:

    P.layers.{i}.{self_attn|mlp}.{proj}.moe_gate.weight                      router, (E, in)
    P.layers.{i}.{self_attn|mlp}.{proj}.experts.{e}.lora_A.weight / .lora_B.weight
    P.layers.{i}.self_attn.{proj}.lora_A.weight / .lora_B.weight             plain LoRA (loramoe)

plus ``.lora_magnitude_vector`` next to lora_A / lora_B with DoRA (an mlora addition).
``adapter_model.safetensors`` and, for upstream's loader, ``adapter_model.bin`` hold them.
"""

from __future__ import annotations

from typing import Any

import torch

from mlora.adapters.format_tensors import (
    layer_key,
    lora_tensors,
    moe_lora_config,
    moe_lora_fields,
)
from mlora.adapters.lora_moe.layer import ExpertMixture
from mlora.adapters.lora_moe.spec import LinearMoeSpec, build_linear_moe_spec
from mlora.config.schema import LINEAR_MOE_STRATEGIES, MOE_STRATEGY_DEFAULTS
from mlora.core.errors import MloraError


def named_parameters(model: Any, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of adapter ``name`` under its upstream key (live tensors)."""
    spec: LinearMoeSpec = model.specs[name]
    params: dict[str, torch.Tensor] = {}
    for path, module in model.adapter_modules(name):
        prefix = layer_key(spec.strategy, path)
        if isinstance(module, ExpertMixture):
            params[f"{prefix}.moe_gate.weight"] = module.moe_gate.weight
            for index, expert in enumerate(module.experts):
                for suffix, tensor in lora_tensors(expert).items():
                    params[f"{prefix}.experts.{index}.{suffix}"] = tensor
        else:
            for suffix, tensor in lora_tensors(module).items():
                params[f"{prefix}.{suffix}"] = tensor
    return params


def optional_tensor(key: str) -> bool:
    """Every LoRAMoE / MoLA tensor must be in the file (ours and upstream's save them all)."""
    return False


def peft_config(spec: LinearMoeSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRAMoE / MoLA adapter."""
    config = moe_lora_config(spec, base_model)
    config.update(
        routing_strategy=spec.strategy,
        num_experts=spec.num_experts,
        router_init_range=float(spec.router_init_range),
    )
    if spec.strategy == "mola":
        config.update(
            top_k=spec.top_k,
            router_aux_loss_coef=float(spec.aux_loss_coef),
            router_loss=spec.router_loss,
        )
    return config


def spec_from_config(config: dict[str, Any], source: str) -> LinearMoeSpec:
    """The LinearMoeSpec of a LORAMOE / MOLA ``adapter_config.json`` (ours or upstream's).

    Raises:
        MloraError: an unknown routing_strategy or a missing required key (naming the file).
    """
    strategy = config.get("routing_strategy", str(config.get("peft_type", "")).lower())
    if strategy not in LINEAR_MOE_STRATEGIES:
        raise MloraError(f"{source}: routing_strategy {strategy!r} is not 'loramoe' or 'mola'")
    defaults = MOE_STRATEGY_DEFAULTS[strategy]
    return build_linear_moe_spec(
        strategy=strategy,
        **moe_lora_fields(config, strategy.upper(), source),
        num_experts=int(config["num_experts"]),
        top_k=int(config.get("top_k", defaults.get("top_k", 2))) if strategy == "mola" else None,
        router_init_range=float(config.get("router_init_range", defaults["router_init_range"])),
        aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
        router_loss=bool(config.get("router_loss", False)),
    )
