"""The adapter-aware linear layer: one frozen base layer, N adapters, segment by segment.

    y = base(x)                                    # frozen, once for the whole batch
    y[seg_i] += adapter_i(x[seg_i], y[seg_i])      # per adapter segment of the layout

The per-segment loop is the reference implementation that any faster (grouped GEMM) path must
be tested equal to. Rows outside every segment, or whose adapter does not target this layer,
get the base output unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mlora.adapters.lora import LoraAdapter
from mlora.layout import LayoutContext


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a base linear layer as a dense tensor (dequantized if needed)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    if getattr(weight, "SCB", None) is not None or weight.dtype == torch.int8:  # bitsandbytes 8-bit
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * scb.view(-1, 1).float() / 127
    return weight


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus any number of adapters, applied by the current batch layout.

    Args:
        base_layer: the model's original linear layer (kept, frozen).
        context: the layout holder shared by all adapter-aware layers of the model.
    """

    def __init__(self, base_layer: nn.Module, context: LayoutContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.context = context

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for model code that inspects ``proj.weight`` (dtype, device)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "original",
        use_dora: bool = False,
    ) -> LoraAdapter:
        """Create adapter ``name`` on this layer, in fp32 on the base layer's device."""
        base_weight = dense_weight(self.base_layer).float() if use_dora else None
        adapter = LoraAdapter(
            self.in_features, self.out_features, r, scaling, dropout, init, use_dora, base_weight
        ).to(self.base_layer.weight.device)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        layout = self.context.layout
        if layout is None or not self.adapters:
            return result
        flat_x = x.reshape(-1, x.shape[-1])  # (B*T, in)
        flat_y = result.reshape(-1, result.shape[-1])  # (B*T, out)
        tokens_per_row = flat_x.shape[0] // layout.num_rows
        pieces: list[torch.Tensor] = []
        cursor = 0
        dense: torch.Tensor | None = None  # DoRA's base weight, dequantized once per pass
        for seg in layout.segments:
            if seg.adapter not in self.adapters:
                continue
            adapter = self.adapters[seg.adapter]
            start, end = seg.start * tokens_per_row, seg.end * tokens_per_row
            if start > cursor:
                pieces.append(flat_y[cursor:start])
            base_out = flat_y[start:end]
            if adapter.magnitude is not None and dense is None:
                dense = dense_weight(self.base_layer)
            weight = dense if adapter.magnitude is not None else None
            delta = adapter(flat_x[start:end], base_out, weight, self.base_layer.bias)
            pieces.append((base_out + delta).to(result.dtype))
            cursor = end
        if not pieces:
            return result
        if cursor < flat_y.shape[0]:
            pieces.append(flat_y[cursor:])
        return torch.cat(pieces).view_as(result)
