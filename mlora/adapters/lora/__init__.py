"""Plain LoRA and DoRA: ``layer`` (the module and its variants), ``spec`` (from a config),
``format`` (PEFT's files), ``kind`` (its registry entry), ``templates/`` (``launch.py gen``).

The layer's names are re-exported: the MoE kinds build on them (their experts are LoRAs). Only
``layer`` is imported here, so the folder's other modules may import ``mlora.adapters``.
"""

from mlora.adapters.lora.layer import (
    DoraMagnitude,
    DoraVariant,
    LoraAdapter,
    LoraVariant,
    adapter_dropout,
    dora_delta,
    dora_scales,
    init_lora_weights,
    slot_dropout,
)

__all__ = [
    "DoraMagnitude",
    "DoraVariant",
    "LoraAdapter",
    "LoraVariant",
    "adapter_dropout",
    "dora_delta",
    "dora_scales",
    "init_lora_weights",
    "slot_dropout",
]
