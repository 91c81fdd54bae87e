"""The shape of one MixLoRA adapter: flat, resolved values (no config object reaches a layer)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from mlora.adapters import AdapterModel, LoraSpec, dense_weight
from mlora.adapters.mixlora.feed_forward import (
    MixLoraExperts,
    MixLoraFeedForward,
    MlpShape,
    mlp_shape,
)
from mlora.adapters.routing import RouterSpec
from mlora.config.schema import (
    MIXLORA_STRATEGIES,
    MOE_STRATEGY_DEFAULTS,
    AdapterConfig,
    lora_scaling,
)
from mlora.core.errors import MloraError


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

    router: RouterSpec = RouterSpec()  # noqa: RUF009 (frozen: one shared default is safe)
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

    @property
    def expert_spec(self) -> LoraSpec:
        """The LoRA shape of each expert."""
        return LoraSpec(
            self.expert_r, self.expert_scaling, self.expert_dropout, init=self.init,
            use_dora=self.use_dora,
        )  # fmt: skip

    def attach(self, model: AdapterModel, name: str) -> MixLoraSpec:
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
    if strategy not in MIXLORA_STRATEGIES:
        raise ValueError(f"adapter {config.name!r}: {strategy!r} is no MixLoRA strategy")
    return build_mixlora_spec(
        **config.lora_fields(),
        router=router_spec(strategy, config.moe),
        act_fn=config.moe("act_fn"),
        expert_lora=config.moe("expert_lora"),
    )


def find_mlps(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every decoder layer's MLP (a child named ``mlp``)."""
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] == "mlp":
            yield path, module


def _known_shape(mlp: nn.Module) -> MlpShape | None:
    """``mlp_shape``, also of an MLP already wrapped for another MixLoRA adapter."""
    if isinstance(mlp, MixLoraFeedForward):
        return MlpShape(mlp.projections, mlp.default_activation)
    return mlp_shape(mlp)


def _activation(name: str | None, default: nn.Module) -> nn.Module:
    if name is None:
        return default
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _model_activation_name(hf_model: nn.Module, activation: nn.Module) -> str | None:
    """The ``ACT2FN`` name of the model's MLP activation, if its config names it."""
    from transformers.activations import ACT2FN

    for key in ("hidden_act", "hidden_activation"):
        value = getattr(getattr(hf_model, "config", None), key, None)
        if isinstance(value, str) and value in ACT2FN and type(ACT2FN[value]) is type(activation):
            return value
    return None


def attach_mixlora(model: AdapterModel, name: str, spec: MixLoraSpec) -> MixLoraSpec:
    """Add MixLoRA adapter ``name`` to a ``MultiLoraModel``: experts on every FFN, plain LoRA on
    the other targets.

    Returns:
        ``spec`` with ``act_fn`` resolved to the model's activation name when it was unset (so
        the saved config names it, as the mixlora package's loader needs).

    Raises:
        MloraError: the model has no MLP of a known shape, or no FFN projection is targeted.
    """
    hf_model = model.model
    mlps = [(path, mlp, _known_shape(mlp)) for path, mlp in find_mlps(hf_model)]
    unknown = [type(mlp).__name__ for _, mlp, shape in mlps if shape is None]
    if not mlps or unknown:
        what = unknown[0] if unknown else "no 'mlp' modules"
        raise MloraError(
            f"adapter {name!r}: key 'routing_strategy' ({spec.router.strategy!r}) needs decoder "
            f"MLPs with gate_proj/up_proj/down_proj or fc1/fc2; {type(hf_model).__name__} has "
            f"{what}"
        )
    ffn_names = {proj for _, _, shape in mlps if shape for proj in shape.projections}
    expert_targets = [t for t in spec.target_modules if t in ffn_names]
    other_targets = tuple(t for t in spec.target_modules if t not in ffn_names)
    if not expert_targets:
        raise MloraError(
            f"adapter {name!r}: key 'target_modules' must include an FFN projection for "
            f"MixLoRA experts (one of {', '.join(sorted(ffn_names))})"
        )
    if other_targets:
        model.attach_lora(
            name,
            LoraSpec(spec.r, spec.scaling, spec.dropout, other_targets, spec.init, spec.use_dora),
        )
    for path, mlp, shape in mlps:
        if not isinstance(mlp, MixLoraFeedForward):
            parent = hf_model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else hf_model
            mlp = MixLoraFeedForward(mlp, model.context, shape)
            parent.mlp = mlp
        targets = [t for t in expert_targets if t in mlp.projections]
        layers = {t: mlp.linear(t) for t in targets}
        shapes = {t: (layer.in_features, layer.out_features) for t, layer in layers.items()}
        weights = (
            {t: dense_weight(layer).float() for t, layer in layers.items()}
            if spec.use_dora
            else None
        )
        first = mlp.linear(mlp.projections[0])
        device = first.weight.device
        experts = MixLoraExperts(
            first.in_features,
            shapes,
            weights,
            spec.expert_spec,
            spec.router,
            _activation(spec.act_fn, mlp.default_activation),
        )
        mlp.moes[name] = experts.to(device)
    if spec.act_fn is None:
        resolved = _model_activation_name(hf_model, mlp.default_activation)
        if resolved is not None:
            spec = replace(spec, act_fn=resolved)
    return spec
