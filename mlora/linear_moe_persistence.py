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
from torch import nn

from mlora.adapters.lora_moe import ExpertMixture
from mlora.config import MOE_STRATEGY_DEFAULTS
from mlora.errors import MloraError
from mlora.linear_moe import LINEAR_MOE_STRATEGIES, LinearMoeSpec, build_linear_moe_spec

PEFT_TYPES = {"loramoe": "LORAMOE", "mola": "MOLA"}


def linear_moe_key(strategy: str, path: str) -> str:
    """Upstream's key prefix of a module path (``model.layers.3.mlp.up_proj`` ->
    ``mola.layers.3.mlp.up_proj``)."""
    at = path.find("layers.")
    return f"{strategy}." + (path[at:] if at >= 0 else path)


def _lora_tensors(adapter: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {"lora_A.weight": adapter.lora_A.weight, "lora_B.weight": adapter.lora_B.weight}
    if adapter.magnitude is not None:
        tensors["lora_magnitude_vector"] = adapter.magnitude.weight
    return tensors


def _named_parameters(model: Any, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of adapter ``name`` under its upstream key (live tensors)."""
    spec: LinearMoeSpec = model.specs[name]
    params: dict[str, torch.Tensor] = {}
    for path, module in model.adapter_modules(name):
        prefix = linear_moe_key(spec.strategy, path)
        if isinstance(module, ExpertMixture):
            params[f"{prefix}.moe_gate.weight"] = module.moe_gate.weight
            for index, expert in enumerate(module.experts):
                for suffix, tensor in _lora_tensors(expert).items():
                    params[f"{prefix}.experts.{index}.{suffix}"] = tensor
        else:
            for suffix, tensor in _lora_tensors(module).items():
                params[f"{prefix}.{suffix}"] = tensor
    return params


def linear_moe_state_dict(model: Any, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under upstream's key names, on CPU."""
    return {
        key: tensor.detach().cpu().contiguous()
        for key, tensor in _named_parameters(model, name).items()
    }


def load_linear_moe_weights(
    model: Any, name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Copy upstream-named tensors into adapter ``name`` (already attached with that shape).

    Raises:
        MloraError: a tensor is missing or has another shape (naming the key).
    """
    with torch.no_grad():
        for key, param in _named_parameters(model, name).items():
            value = tensors.get(key)
            if value is None:
                raise MloraError(f"{source}: missing tensor {key}")
            if value.shape != param.shape:
                raise MloraError(
                    f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def linear_moe_peft_config(spec: LinearMoeSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRAMoE / MoLA adapter."""
    alpha = spec.lora_alpha
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[spec.strategy],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "bias": "none",
        "r": spec.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(spec.dropout),
        "target_modules": sorted(spec.target_modules),
        "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora,
        "lora_init": spec.init,
        "routing_strategy": spec.strategy,
        "num_experts": spec.num_experts,
        "router_init_range": float(spec.router_init_range),
    }
    if spec.strategy == "mola":
        config.update(
            top_k=spec.top_k,
            router_aux_loss_coef=float(spec.aux_loss_coef),
            router_loss=spec.router_loss,
        )
    return config


def linear_moe_spec_from_config(config: dict[str, Any], source: str) -> LinearMoeSpec:
    """The LinearMoeSpec of a LORAMOE / MOLA ``adapter_config.json`` (ours or upstream's).

    Raises:
        MloraError: an unknown routing_strategy or a missing required key (naming the file).
    """
    strategy = config.get("routing_strategy", str(config.get("peft_type", "")).lower())
    if strategy not in LINEAR_MOE_STRATEGIES:
        raise MloraError(f"{source}: routing_strategy {strategy!r} is not 'loramoe' or 'mola'")
    for key in ("r", "num_experts", "target_modules"):
        if key not in config:
            raise MloraError(f"{source}: {PEFT_TYPES[strategy]} adapter_config lacks {key!r}")
    defaults = MOE_STRATEGY_DEFAULTS[strategy]
    targets = config["target_modules"]
    if isinstance(targets, dict):
        targets = [target for target, on in targets.items() if on]
    return build_linear_moe_spec(
        strategy=strategy,
        r=int(config["r"]),
        lora_alpha=float(config.get("lora_alpha", 8)),
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(targets)),
        init="gaussian" if config.get("lora_init") == "gaussian" else "original",
        use_dora=bool(config.get("use_dora", False)),
        use_rslora=bool(config.get("use_rslora", False)),
        num_experts=int(config["num_experts"]),
        top_k=int(config.get("top_k", defaults.get("top_k", 2))) if strategy == "mola" else None,
        router_init_range=float(config.get("router_init_range", defaults["router_init_range"])),
        aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
        router_loss=bool(config.get("router_loss", False)),
    )
