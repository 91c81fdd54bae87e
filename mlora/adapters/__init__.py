"""Adapter modules (LoRA and its variants) and the adapter-aware layers that hold them."""

from mlora.adapters.linear import MultiLoraLinear, dense_weight
from mlora.adapters.lora import DoraMagnitude, LoraAdapter

__all__ = ["DoraMagnitude", "LoraAdapter", "MultiLoraLinear", "dense_weight"]
