"""MixLoRA adapters on disk in the layout of the public ``mixlora`` package (TUDB-Labs).

``adapter_config.json`` has ``peft_type: "MIXLORA"`` with that package's keys (``r``,
``lora_alpha``, ``target_modules``, ``routing_strategy``, ``num_experts``, ``top_k``,
``expert_lora``, router settings, ...). Tensors, for decoder layer ``i``:

    mixlora.layers.{i}.self_attn.{proj}.lora_A.weight / .lora_B.weight      plain LoRA
    mixlora.layers.{i}.mlp.moe_gate.weight                                  router, (E, hidden)
    mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight / .lora_B.weight

plus ``.lora_magnitude_vector`` next to lora_A/lora_B with DoRA (an mlora addition; the mixlora
package recomputes magnitudes instead). The package's loader reads ``adapter_model.bin`` only,
so MixLoRA folders hold that file next to ``adapter_model.safetensors`` (same tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from mlora.adapters.format_tensors import (
    alpha_number,
    layer_key,
    lora_tensors,
    moe_lora_config,
    moe_lora_fields,
)
from mlora.adapters.mixlora.feed_forward import MixLoraExperts, mixlora_layers
from mlora.adapters.mixlora.spec import MixLoraSpec, build_mixlora_spec, router_spec
from mlora.config.schema import MIXLORA_STRATEGIES, MOE_STRATEGY_DEFAULTS
from mlora.core.errors import MloraError

PEFT_TYPE = "MIXLORA"


def named_parameters(model: Any, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of MixLoRA adapter ``name`` under its mixlora key (live tensors)."""
    params: dict[str, torch.Tensor] = {}
    for path, layer in model.adapter_layers():
        if name in layer.adapters:
            for suffix, tensor in lora_tensors(layer.adapters[name]).items():
                params[f"{layer_key('mixlora', path)}.{suffix}"] = tensor
    for path, ffn in mixlora_layers(model.model):
        if name not in ffn.moes:
            continue
        moe: MixLoraExperts = ffn.moes[name]
        prefix = layer_key("mixlora", path)
        params[f"{prefix}.moe_gate.weight"] = moe.router.weight
        for projection in ffn.projections:
            for index in range(moe.router_spec.num_experts):
                expert = moe.expert(projection, index)
                if expert is None:
                    break
                for suffix, tensor in lora_tensors(expert).items():
                    params[f"{prefix}.{projection}.experts.{index}.{suffix}"] = tensor
    return params


def optional_tensor(key: str) -> bool:
    """A DoRA magnitude may be missing (the mixlora package does not save it): the one computed
    from the weights is kept."""
    return key.endswith(".lora_magnitude_vector")


def peft_config(spec: MixLoraSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a MixLoRA adapter (mixlora package keys)."""
    router = spec.router
    config = moe_lora_config(spec, base_model)
    config.update(
        routing_strategy=router.strategy,
        num_experts=router.num_experts,
        router_init_range=float(router.init_range),
        router_aux_loss_coef=float(router.aux_loss_coef),
        router_loss=router.router_loss,
        jitter_noise=float(router.jitter_noise),
    )
    if spec.act_fn is not None:
        config["act_fn"] = spec.act_fn
    if spec.expert_lora:
        config["expert_lora"] = {
            k: (alpha_number(v) if k == "lora_alpha" else v)
            for k, v in dict(spec.expert_lora).items()
        }
    if router.strategy == "mixlora":
        config["top_k"] = router.top_k
    elif router.strategy == "mixlora-dynamic":
        config.update(top_p=float(router.top_p), temperature=float(router.temperature))
    else:
        config.update(
            router_z_loss_coef=float(router.z_loss_coef),
            expert_capacity=router.expert_capacity,
            ffn_dropout=float(router.ffn_dropout),
        )
    return config


def spec_from_config(config: dict[str, Any], source: str) -> MixLoraSpec:
    """The MixLoraSpec of a MIXLORA ``adapter_config.json`` (ours or the mixlora package's).

    Raises:
        MloraError: an unknown routing_strategy or a missing required key (naming the file).
    """
    strategy = config.get("routing_strategy")
    if strategy not in MIXLORA_STRATEGIES:
        raise MloraError(
            f"{source}: routing_strategy {strategy!r} is not one of "
            + ", ".join(repr(s) for s in MIXLORA_STRATEGIES)
        )
    lora_fields = moe_lora_fields(config, PEFT_TYPE, source)
    defaults = MOE_STRATEGY_DEFAULTS[strategy]
    router = router_spec(strategy, lambda key: config.get(key, defaults[key]))
    expert_lora = config.get("expert_lora")
    if expert_lora:
        expert_lora = {
            k: expert_lora[k]
            for k in ("r", "lora_alpha", "lora_dropout", "use_rslora")
            if k in expert_lora
        }
    return build_mixlora_spec(
        **lora_fields,
        router=router,
        act_fn=config.get("act_fn"),
        expert_lora=expert_lora or None,
    )
