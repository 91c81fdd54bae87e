"""What a kind of adapter is to the code that trains, saves and loads it: ``AdapterKind``.

Each kind's folder (``mlora/adapters/KIND/``) builds one in its ``kind.py`` from its own spec
builder and file format; the registry (``mlora.adapters.kinds``) lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlora.adapters.spec import AdapterModel, LoraSpec
from mlora.config.schema import AdapterConfig

Tensors = dict[str, torch.Tensor]


def never_optional(key: str) -> bool:
    """No file key may be missing (the default)."""
    return False


def same_names(tensors: Tensors) -> Tensors:
    """Saved tensors keep their names (the default: no legacy keys)."""
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
    optional_tensor: Callable[[str], bool] = never_optional
    legacy_names: Callable[[Tensors], Tensors] = same_names
    writes_legacy_bin: bool = False
    load_fresh: Callable[[AdapterModel, str], None] | None = None
    task_field: Callable[[AdapterConfig], str | None] = lambda config: None
    own_targets: Callable[[AdapterConfig, str], list[str]] | None = None


def upstream_format(module: Any, **fields: Any) -> dict[str, Any]:
    """The format fields of a MoE kind whose module follows its upstream package's layout."""
    return dict(
        named_parameters=module.named_parameters,
        peft_config=module.peft_config,
        spec_from_peft_config=module.spec_from_config,
        optional_tensor=module.optional_tensor,
        writes_legacy_bin=True,
        **fields,
    )
