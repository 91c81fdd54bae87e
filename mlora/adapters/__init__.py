"""Adapter modules (LoRA and its variants), the adapter-aware layers that hold them, and the
adapter kinds: one folder each (``lora/``, ``mixlora/``, ``lora_moe/``, ``meteora/``), listed
in ``kinds.py``."""

from mlora.adapters.linear import MultiLoraLinear, dense_weight
from mlora.adapters.lora.layer import DoraMagnitude, DoraVariant, LoraAdapter, LoraVariant
from mlora.adapters.spec import AdapterHost, AdapterModel, LoraSpec

__all__ = [
    "AdapterHost",
    "AdapterModel",
    "DoraMagnitude",
    "DoraVariant",
    "LoraAdapter",
    "LoraSpec",
    "LoraVariant",
    "MultiLoraLinear",
    "dense_weight",
]
