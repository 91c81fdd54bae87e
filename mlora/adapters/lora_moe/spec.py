"""LoRAMoE and MoLA adapters on a model: their spec and where their experts go.

A per-linear MoE adapter (``routing_strategy`` "loramoe" or "mola") puts a router and
``num_experts`` expert LoRAs on target linear layers (``mlora.adapters.lora_moe.layer``) and plain
LoRA on the others, as upstream m-LoRA / MoE-PEFT does:

- loramoe: experts on the FFN projections among ``target_modules`` (LoRAMoE plugs into the FFN;
  upstream's ``LoraMoeConfig`` takes the MLP projections), plain LoRA on attention targets;
- mola: experts on every target linear layer.

Experts share the adapter's r / lora_alpha / lora_dropout / use_dora / lora_init.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mlora.adapters import AdapterModel, LoraSpec, MultiLoraLinear, dense_weight
from mlora.adapters.lora_moe.layer import LoraMoeAdapter, MolaAdapter
from mlora.adapters.mixlora.spec import strategy_reader
from mlora.batching.layout import LayoutContext
from mlora.config.schema import LINEAR_MOE_STRATEGIES, AdapterConfig, lora_scaling
from mlora.core.errors import MloraError


@dataclass(frozen=True)
class LinearMoeSpec(LoraSpec):
    """A LoRAMoE / MoLA adapter: ``LoraSpec``'s LoRA shape for every expert and plain target.

    Attributes:
        strategy: "loramoe" (dense softmax) or "mola" (top-k, renormalised).
        num_experts: experts per layer that has them.
        top_k: experts per token (mola; loramoe uses all).
        router_init_range: router init ``kaiming_uniform_(a=sqrt(router_init_range))``.
        aux_loss_coef, router_loss: MoLA's load-balancing loss weight and switch.
        lora_alpha, use_rslora: as configured (recorded when saving).
    """

    strategy: str = "mola"
    num_experts: int = 4
    top_k: int = 2
    router_init_range: float = 5.0
    aux_loss_coef: float = 0.001
    router_loss: bool = False
    lora_alpha: float = 16.0
    use_rslora: bool = False

    def attach(self, model: AdapterModel, name: str) -> LinearMoeSpec:
        attach_linear_moe(model, name, self)  # router + LoRA experts on target linears
        return self

    @property
    def peft_type(self) -> str:
        return self.strategy.upper()  # LORAMOE or MOLA, upstream MoE-PEFT's names

    def experts_on(self, path: str) -> bool:
        """Whether the linear layer at module ``path`` gets experts (else plain LoRA)."""
        return self.strategy == "mola" or is_ffn_path(path)


def is_ffn_path(path: str) -> bool:
    """A projection inside a decoder layer's MLP (``model.layers.3.mlp.up_proj``)."""
    return "mlp" in path.split(".")[:-1]


def build_linear_moe_spec(
    *,
    strategy: str,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: tuple[str, ...],
    init: str,
    use_dora: bool,
    use_rslora: bool,
    num_experts: int,
    top_k: int | None,
    router_init_range: float,
    aux_loss_coef: float,
    router_loss: bool,
) -> LinearMoeSpec:
    """A LinearMoeSpec with the LoRA scale resolved (``top_k`` None: every expert)."""
    return LinearMoeSpec(
        r=r,
        scaling=lora_scaling(lora_alpha, r, use_rslora),
        dropout=lora_dropout,
        target_modules=tuple(target_modules),
        init=init,
        use_dora=use_dora,
        strategy=strategy,
        num_experts=num_experts,
        top_k=num_experts if top_k is None else top_k,
        router_init_range=router_init_range,
        aux_loss_coef=aux_loss_coef,
        router_loss=router_loss,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
    )


def linear_moe_spec(config: AdapterConfig) -> LinearMoeSpec:
    """The LinearMoeSpec of a validated adapter config whose routing_strategy is loramoe/mola."""
    strategy = config.routing_strategy
    if strategy not in LINEAR_MOE_STRATEGIES:
        raise ValueError(f"adapter {config.name!r}: {strategy!r} is no LoRAMoE/MoLA strategy")
    value = strategy_reader(strategy, config.moe)
    return build_linear_moe_spec(
        strategy=strategy,
        **config.lora_fields(),
        num_experts=config.moe("num_experts"),
        top_k=value("top_k", None),
        router_init_range=config.moe("router_init_range"),
        aux_loss_coef=value("router_aux_loss_coef", 0.0),
        router_loss=value("router_loss", False),
    )


def expert_mixture(
    layer: MultiLoraLinear, name: str, spec: LinearMoeSpec, context: LayoutContext
) -> nn.Module:
    """The LoRAMoE / MoLA module of adapter ``name`` for one wrapped layer, on its device."""
    base_weight = dense_weight(layer.base_layer).float() if spec.use_dora else None
    common = dict(
        r=spec.r,
        scaling=spec.scaling,
        dropout=spec.dropout,
        init=spec.init,
        use_dora=spec.use_dora,
        base_weight=base_weight,
        router_init_range=spec.router_init_range,
        context=context,
        adapter_name=name,
    )
    shape = (layer.in_features, layer.out_features, spec.num_experts)
    if spec.strategy == "loramoe":
        module: nn.Module = LoraMoeAdapter(*shape, **common)
    else:
        module = MolaAdapter(
            *shape,
            top_k=spec.top_k,
            router_loss=spec.router_loss,
            aux_loss_coef=spec.aux_loss_coef,
            **common,
        )
    return module.to(layer.base_layer.weight.device)


def attach_linear_moe(model: AdapterModel, name: str, spec: LinearMoeSpec) -> None:
    """Add LoRAMoE / MoLA adapter ``name`` to a ``MultiLoraModel``: every target linear layer is
    wrapped; those ``spec.experts_on`` get the experts, the others plain LoRA.

    Raises:
        MloraError: a target module the model lacks, or (loramoe) no FFN projection targeted.
    """
    with_experts = 0

    def experts(path: str, layer: MultiLoraLinear) -> nn.Module | None:
        nonlocal with_experts
        if not spec.experts_on(path):
            return None
        with_experts += 1
        return expert_mixture(layer, name, spec, model.context)

    model.attach_lora(name, spec, experts)
    if not with_experts:
        model.remove_adapter(name, strict=False)
        raise MloraError(
            f"adapter {name!r}: key 'target_modules' must include an MLP projection for "
            f"routing_strategy 'loramoe' (its experts sit on the FFN)"
        )
