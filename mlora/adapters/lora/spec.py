"""Plain LoRA's spec from a config: the shared ``LoraSpec`` itself (``mlora.adapters.spec``,
the flat shape every kind extends), filled from a validated adapter config."""

from __future__ import annotations

from mlora.adapters.spec import LoraSpec
from mlora.config.schema import AdapterConfig


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
