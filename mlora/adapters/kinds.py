"""The registry of adapter kinds: one line per kind, each kind's folder holding the rest.

A kind (``mlora.adapters.adapter_kind.AdapterKind``, built in ``mlora/adapters/KIND/kind.py``)
says which configs are its (``routing_strategy``) and which saved folders (``peft_type``), how it
builds its spec from a config, and its format on disk: its tensors' key names and its
``adapter_config.json``. Attaching is the spec's own ``attach``. Code that trains, saves or loads
adapters asks this registry and never names a kind, so adding one is a folder and one line
here (see CONTRIBUTING.md, "How to add an adapter kind").
"""

from __future__ import annotations

from mlora.adapters.adapter_kind import AdapterKind
from mlora.adapters.lora.kind import KIND as LORA
from mlora.adapters.lora_moe.kind import KIND as LORA_MOE
from mlora.adapters.meteora.kind import KIND as METEORA
from mlora.adapters.mixlora.kind import KIND as MIXLORA
from mlora.config.schema import AdapterConfig

KINDS: tuple[AdapterKind, ...] = (LORA, MIXLORA, LORA_MOE, METEORA)


def kind_for_config(config: AdapterConfig) -> AdapterKind:
    """The kind a validated adapter config trains (by its ``routing_strategy``)."""
    return next(k for k in KINDS if config.routing_strategy in k.routing_strategies)


def kind_for_peft_type(peft_type: str | None) -> AdapterKind:
    """The kind stored under ``peft_type``; plain LoRA for any other (its parser then rejects
    a ``peft_type`` that is not LoRA, naming the file)."""
    return next((k for k in KINDS if peft_type in k.peft_types), LORA)
