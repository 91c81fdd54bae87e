"""Tensor operations under the adapter layers: plain functions over tensors, no modules."""

from mlora.ops.segmented_lora import (
    GROUPED_AVAILABLE,
    IMPLS,
    grouped_supported,
    resolve_impl,
    segmented_lora,
)

__all__ = ["GROUPED_AVAILABLE", "IMPLS", "grouped_supported", "resolve_impl", "segmented_lora"]
