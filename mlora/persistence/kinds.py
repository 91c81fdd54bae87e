"""The registry of adapter kinds: one entry per kind names everything that is the kind's own.

A kind says which configs are its (``routing_strategy``) and which saved folders
(``peft_type``), how it builds its spec from a config, and its format on disk: its tensors'
key names and its ``adapter_config.json``. Attaching is the spec's own ``attach``. Code that
trains, saves or loads adapters asks this registry and never names a kind, so adding one is
one entry here (see CONTRIBUTING.md, "How to add an adapter kind").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlora.adapters import AdapterModel, LoraSpec
from mlora.adapters.lora_moe.spec import linear_moe_spec
from mlora.adapters.mixlora.spec import mixlora_spec
from mlora.config.schema import LINEAR_MOE_STRATEGIES, MIXLORA_STRATEGIES, AdapterConfig
from mlora.persistence import lora as lora_persistence
from mlora.persistence import lora_moe as lora_moe_persistence
from mlora.persistence import meteora as meteora_persistence
from mlora.persistence import mixlora as mixlora_persistence

Tensors = dict[str, torch.Tensor]


def _never(key: str) -> bool:
    return False


def _same(tensors: Tensors) -> Tensors:
    return tensors


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter.

    Attributes:
        name: what the kind is called in messages and docs.
        routing_strategies: the config ``routing_strategy`` values that select it (None: unset).
        peft_types: the ``peft_type`` values of its ``adapter_config.json``.
        spec_from_config: the spec of a validated adapter config.
        named_parameters: ``(model, name)`` -> the adapter's live tensors by file key.
        peft_config: ``(spec, base_model)`` -> its adapter_config.
        spec_from_peft_config: ``(adapter_config, source)`` -> its spec.
        optional_tensor: file keys that may be missing (the live value is kept).
        legacy_names: saved tensors renamed to today's keys before loading.
        writes_legacy_bin: also write ``adapter_model.bin`` (upstream MoE loaders read it).
        load_fresh: fill a newly attached adapter from elsewhere (MeteoRA: the LoRAs it embeds).
        task_field: the data field that labels each row's task, if the kind trains on one.
        own_targets: ``(config, where)`` -> the modules the kind wraps when they come from its
            own files rather than the config's ``target_modules`` (MeteoRA: the gated modules
            of the LoRAs it embeds, read and checked before the model loads); their ranks are
            those files' own, so the config's ``r`` is not checked against them.
    """

    name: str
    routing_strategies: tuple[str | None, ...]
    peft_types: tuple[str, ...]
    spec_from_config: Callable[[AdapterConfig], LoraSpec]
    named_parameters: Callable[[AdapterModel, str], Tensors]
    peft_config: Callable[[Any, str | None], dict[str, Any]]
    spec_from_peft_config: Callable[[dict[str, Any], str], LoraSpec]
    optional_tensor: Callable[[str], bool] = _never
    legacy_names: Callable[[Tensors], Tensors] = _same
    writes_legacy_bin: bool = False
    load_fresh: Callable[[AdapterModel, str], None] | None = None
    task_field: Callable[[AdapterConfig], str | None] = lambda config: None
    own_targets: Callable[[AdapterConfig, str], list[str]] | None = None


def lora_spec(config: AdapterConfig) -> LoraSpec:
    """The plain LoRA (or DoRA) spec of a validated adapter config."""
    return LoraSpec(
        r=config.r,
        scaling=config.scaling,
        dropout=config.lora_dropout,
        target_modules=tuple(config.target_module_names),
        init=config.lora_init,
        use_dora=config.use_dora,
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        target_parameters=tuple(config.target_parameters or ()),
    )


def _upstream_format(module: Any, **fields: Any) -> dict[str, Any]:
    """The format fields of a MoE kind whose module follows its upstream package's layout."""
    return dict(
        named_parameters=module.named_parameters,
        peft_config=module.peft_config,
        spec_from_peft_config=module.spec_from_config,
        optional_tensor=module.optional_tensor,
        writes_legacy_bin=True,
        **fields,
    )


LORA = AdapterKind(
    "LoRA / DoRA",
    (None,),
    ("LORA",),
    lora_spec,
    named_parameters=lora_persistence.named_parameters,
    peft_config=lora_persistence.peft_config,
    spec_from_peft_config=lora_persistence.spec_from_peft_config,
    legacy_names=lora_persistence.legacy_names,
)
KINDS: tuple[AdapterKind, ...] = (
    LORA,
    AdapterKind(
        "MixLoRA",
        tuple(MIXLORA_STRATEGIES),
        ("MIXLORA",),
        mixlora_spec,
        **_upstream_format(mixlora_persistence),
    ),
    AdapterKind(
        "LoRAMoE / MoLA",
        tuple(LINEAR_MOE_STRATEGIES),
        ("LORAMOE", "MOLA"),
        linear_moe_spec,
        **_upstream_format(lora_moe_persistence),
    ),
    AdapterKind(
        "MeteoRA",
        ("meteora",),
        (meteora_persistence.PEFT_TYPE,),
        meteora_persistence.meteora_spec,
        **_upstream_format(
            meteora_persistence,
            load_fresh=meteora_persistence.load_embedded_adapters,
            task_field=lambda config: config.moe("task_field"),
            own_targets=lambda config, where: list(
                meteora_persistence.meteora_spec(config, where).target_modules
            ),
        ),
    ),
)


def kind_for_config(config: AdapterConfig) -> AdapterKind:
    """The kind a validated adapter config trains (by its ``routing_strategy``)."""
    return next(k for k in KINDS if config.routing_strategy in k.routing_strategies)


def kind_for_peft_type(peft_type: str | None) -> AdapterKind:
    """The kind stored under ``peft_type``; plain LoRA for any other (its parser then rejects
    a ``peft_type`` that is not LoRA, naming the file)."""
    return next((k for k in KINDS if peft_type in k.peft_types), LORA)
