"""Adapter modules (LoRA and its variants) and the adapter-aware layers that hold them."""

from mlora.adapters.linear import MultiLoraLinear, dense_weight
from mlora.adapters.lora import DoraMagnitude, DoraVariant, LoraAdapter, LoraVariant
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
