"""The shape of one MixLoRA adapter: flat, resolved values (no config object reaches a layer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlora.config import (
    MIXLORA_STRATEGIES,
    MOE_STRATEGY_DEFAULTS,
    AdapterConfig,
    lora_scaling,
)
from mlora.model import LoraSpec, MultiLoraModel


@dataclass(frozen=True)
class RouterSpec:
    """How one MixLoRA adapter routes tokens to its experts and what its router losses weigh.

    Attributes:
        strategy: "mixlora" (softmax top-k, renormalised), "mixlora-dynamic" (top-p) or
            "mixlora-switch" (top-1 with a per-row capacity in training).
        num_experts: experts per FFN.
        top_k: experts per token (mixlora).
        top_p, temperature: mixlora-dynamic's cumulative threshold and softmax temperature.
        init_range: std of the router weight's normal initialisation.
        aux_loss_coef: weight of the load-balancing loss.
        z_loss_coef: weight of the router z-loss (switch).
        router_loss: whether the router losses join the adapter's loss.
        jitter_noise: multiplicative uniform noise on the router input in training.
        expert_capacity: tokens per expert per row in training (switch).
        ffn_dropout: dropout on the MoE FFN output in training (switch).
    """

    strategy: str = "mixlora"
    num_experts: int = 8
    top_k: int = 2
    top_p: float = 0.8
    temperature: float = 0.0
    init_range: float = 0.02
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    router_loss: bool = True
    jitter_noise: float = 0.0
    expert_capacity: int = 32
    ffn_dropout: float = 0.0


@dataclass(frozen=True)
class MixLoraSpec(LoraSpec):
    """A MixLoRA adapter: plain LoRA (``r``, ``scaling``, ...) on the non-FFN targets, and
    ``router.num_experts`` LoRA experts on the FFN projections among ``target_modules``.

    Attributes:
        router: routing and router-loss settings.
        expert_r, expert_scaling, expert_dropout: the experts' LoRA shape.
        act_fn: the experts' activation (an ``ACT2FN`` name); None: the model's.
        expert_lora: the ``expert_lora`` overrides as configured (recorded when saving).
        lora_alpha, use_rslora: as configured (recorded when saving).
    """

    router: RouterSpec = RouterSpec()
    expert_r: int = 8
    expert_scaling: float = 2.0
    expert_dropout: float = 0.0
    act_fn: str | None = None
    expert_lora: tuple[tuple[str, Any], ...] | None = None
    lora_alpha: float = 16.0
    use_rslora: bool = False

    @property
    def peft_type(self) -> str:
        return "MIXLORA"

    def attach(self, model: MultiLoraModel, name: str) -> MixLoraSpec:
        from mlora.moe.feed_forward import attach_mixlora  # lazy: it builds on this module

        return attach_mixlora(model, name, self)  # FFN experts + plain LoRA on other targets


def build_mixlora_spec(
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: tuple[str, ...],
    init: str,
    use_dora: bool,
    use_rslora: bool,
    router: RouterSpec,
    act_fn: str | None,
    expert_lora: dict[str, Any] | None,
) -> MixLoraSpec:
    """A MixLoraSpec with the experts' r / alpha / dropout / rsLoRA scaling resolved from
    ``expert_lora``."""
    overrides = dict(expert_lora or {})
    expert_r = int(overrides.get("r", r))
    expert_alpha = float(overrides.get("lora_alpha", lora_alpha))
    expert_rslora = bool(overrides.get("use_rslora", use_rslora))
    return MixLoraSpec(
        r=r,
        scaling=lora_scaling(lora_alpha, r, use_rslora),
        dropout=lora_dropout,
        target_modules=tuple(target_modules),
        init=init,
        use_dora=use_dora,
        router=router,
        expert_r=expert_r,
        expert_scaling=lora_scaling(expert_alpha, expert_r, expert_rslora),
        expert_dropout=float(overrides.get("lora_dropout", lora_dropout)),
        act_fn=act_fn,
        expert_lora=tuple(sorted(overrides.items())) if expert_lora else None,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
    )


def strategy_reader(strategy: str, lookup: Callable[[str], Any]) -> Callable[[str, Any], Any]:
    """``value(key, neutral)``: ``lookup(key)`` if ``strategy`` reads the key, else ``neutral``,
    so a spec never carries a setting its strategy ignores."""
    reads = MOE_STRATEGY_DEFAULTS[strategy]
    return lambda key, neutral: lookup(key) if key in reads else neutral


def router_spec(strategy: str, lookup: Callable[[str], Any]) -> RouterSpec:
    """The RouterSpec of a mixlora* ``strategy``; ``lookup(key)`` gives a key's value (the one
    set, else the strategy's default) for the keys the strategy reads; one builder for configs
    and saved files, so both give equal specs."""
    value = strategy_reader(strategy, lookup)
    return RouterSpec(
        strategy=strategy,
        num_experts=int(lookup("num_experts")),
        top_k=int(value("top_k", 1)),
        top_p=float(value("top_p", 1.0)),
        temperature=float(value("temperature", 0.0)),
        init_range=float(lookup("router_init_range")),
        aux_loss_coef=float(lookup("router_aux_loss_coef")),
        z_loss_coef=float(value("router_z_loss_coef", 0.0)),
        router_loss=bool(lookup("router_loss")),
        jitter_noise=float(lookup("jitter_noise")),
        expert_capacity=int(value("expert_capacity", 0)),
        ffn_dropout=float(value("ffn_dropout", 0.0)),
    )


def mixlora_spec(config: AdapterConfig) -> MixLoraSpec:
    """The MixLoraSpec of a validated adapter config whose routing_strategy is mixlora*."""
    strategy = config.routing_strategy
    assert strategy in MIXLORA_STRATEGIES
    return build_mixlora_spec(
        **config.lora_fields(),
        router=router_spec(strategy, config.moe),
        act_fn=config.moe("act_fn"),
        expert_lora=config.moe("expert_lora"),
    )
