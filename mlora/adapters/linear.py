"""The adapter-aware linear layer: one frozen base layer, N adapters, segment by segment.

    y = base(x)                                       # frozen, once for the whole pass
    y[seg_i] += scale_i * B_i(A_i(drop_i(x[seg_i])))   # every plain-LoRA segment in one op

Plain LoRA segments go through ``mlora.ops.segmented_lora`` (a grouped GEMM or a buffer-writing
autograd function, both tested equal to the per-segment loop). DoRA and per-linear MoE adapters
(LoRAMoE, MoLA) need their segment's base output too; they run per segment on views from
``split_segments`` and their deltas are joined into one buffer. No path slices and ``cat``s
the whole activation, so time and memory do not grow with the number of adapters. Tokens
outside every segment, or whose adapter does not target this layer, get the base output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mlora.adapters.lora import LoraAdapter, LoraVariant
from mlora.adapters.spec import AdapterHost, AdapterInput
from mlora.batching.layout import AdapterSegment, LayoutContext
from mlora.batching.randomness import keep_scale
from mlora.ops.segmented_lora import dropout_segmented_lora, segmented_lora
from mlora.ops.segments import join_segments, split_segments


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a base linear layer as a dense tensor (dequantized if needed).

    A weight sharded by ``--fsdp`` (a ``DTensor``, outside the layer's forward) is gathered:
    every rank attaches the same adapters in the same order, so every rank joins the gather.
    """
    weight = layer.weight
    if type(weight).__name__ == "DTensor":  # no import of torch.distributed on the hot path
        return weight.full_tensor()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    if getattr(weight, "SCB", None) is not None or weight.dtype == torch.int8:  # bitsandbytes 8-bit
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * scb.view(-1, 1).float() / 127
    return weight


class MultiLoraLinear(nn.Module, AdapterHost):
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

    def hosted(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        if name in self.adapters:
            yield "", self.adapters[name]

    def remove_hosted(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]

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
        if not self.adapters:
            return result
        flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
        layout = self.context.layout_for(flat_x.shape[0])
        if layout is None:
            return result
        mine = [s for s in layout.segments if s.adapter in self.adapters and s.size > 0]
        if not mine:
            return result
        flat_y = result.reshape(-1, result.shape[-1])  # (N, out)
        plain: list[AdapterSegment] = []
        custom: list[AdapterSegment] = []
        for seg in mine:
            (plain if _is_plain_lora(self.adapters[seg.adapter]) else custom).append(seg)
        delta = self._plain_delta(flat_x, plain) if plain else None
        if custom:
            more = self._custom_delta(flat_x, flat_y, custom)
            delta = more if delta is None else delta + more
        assert delta is not None
        return (flat_y + delta).to(result.dtype).view_as(result)

    def low_rank_terms(self, x: torch.Tensor) -> list[tuple[AdapterSegment, torch.Tensor]] | None:
        """Each plain-LoRA segment with its (size, r) ``s * drop(x[seg]) @ A.T`` for this pass
        (the same dropout draws as ``forward``), or None where some segment is no plain LoRA.

        A chunked head loss (``mlora.ops.linear_cross_entropy``) adds ``u @ B.T`` per chunk
        instead of materialising the (N, out) delta. ``x``: (N, in), the layer's whole input.
        """
        layout = self.context.layout_for(x.shape[0])
        segments = [] if layout is None else layout.segments
        mine = [s for s in segments if s.adapter in self.adapters and s.size > 0]
        if not all(_is_plain_lora(self.adapters[s.adapter]) for s in mine):
            return None
        if not mine:
            return []
        adapters: list[LoraAdapter] = [self.adapters[s.adapter] for s in mine]
        x = self._dropped(x, mine, adapters)
        return [
            (s, a.scaling * (x[s.start : s.end] @ a.lora_A.weight.T))
            for s, a in zip(mine, adapters, strict=True)
        ]

    def _dropped(
        self, x: torch.Tensor, segments: list[AdapterSegment], adapters: list[LoraAdapter]
    ) -> torch.Tensor:
        """(N, in) ``x`` in the adapters' dtype with each segment's dropout applied."""
        x = x.to(adapters[0].lora_A.weight.dtype)
        dropping = [(s, a.dropout_p) for s, a in zip(segments, adapters, strict=True)]
        dropping = [(s, p) for s, p in dropping if p > 0 and self.training]
        if dropping:  # one mask for the pass, each segment's part from its adapter's stream
            keep = torch.ones_like(x)
            for seg, p in dropping:
                random = self.context.segment_random(seg, x.shape[0], x.device)
                keep[seg.start : seg.end] = random.keep(x[seg.start : seg.end], p)
            x = x * keep
        return x

    def _plain_delta(self, x: torch.Tensor, segments: list[AdapterSegment]) -> torch.Tensor:
        """(N, out) fp32 LoRA delta of every plain-LoRA segment, zero elsewhere.

        With dropout it runs through ``dropout_segmented_lora``: what backward keeps is ``x``
        (alive anyway; q/k/v share it) and a bool mask, not the fp32 multipliers and dropped
        input of ``x * keep`` (the same draws as ``_dropped``, the same gradients).
        """
        adapters: list[LoraAdapter] = [self.adapters[s.adapter] for s in segments]
        x = x.to(adapters[0].lora_A.weight.dtype)
        ranges = [(s.start, s.end) for s in segments]
        lora_a = [a.lora_A.weight for a in adapters]
        lora_b = [a.lora_B.weight for a in adapters]
        scales = [a.scaling for a in adapters]
        dropping = [(s, a.dropout_p) for s, a in zip(segments, adapters, strict=True)]
        dropping = [(s, p) for s, p in dropping if p > 0 and self.training]
        if not dropping:
            return segmented_lora(x, ranges, lora_a, lora_b, scales)
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)  # True: kept
        for seg, p in dropping:
            random = self.context.segment_random(seg, x.shape[0], x.device)
            mask[seg.start : seg.end] = random.keep_mask(x[seg.start : seg.end], p)
        scaled = [(s.start, s.end, keep_scale(p)) for s, p in dropping]
        return dropout_segmented_lora(x, mask, scaled, ranges, lora_a, lora_b, scales)

    def _custom_delta(
        self, x: torch.Tensor, y: torch.Tensor, segments: list[AdapterSegment]
    ) -> torch.Tensor:
        """(N, out) fp32 delta of DoRA / MoE segments, each module run on its segment's views."""
        ranges = [(s.start, s.end) for s in segments]
        xs, ys = split_segments(x, ranges), split_segments(y, ranges)
        dense: torch.Tensor | None = None  # DoRA's base weight, dequantized once per pass
        deltas = []
        for seg, seg_x, seg_y in zip(segments, xs, ys, strict=True):
            adapter = self.adapters[seg.adapter]
            if adapter.needs_base_weight and dense is None:
                dense = dense_weight(self.base_layer)
            inputs = AdapterInput(
                seg_x,
                seg_y,
                dense if adapter.needs_base_weight else None,
                self.base_layer.bias,
                random=self.context.segment_random(seg, x.shape[0], x.device),
                token_mask=self.context.segment_token_mask(seg, x.shape[0]),
                token_tasks=self.context.segment_token_tasks(seg, x.shape[0]),
            )
            deltas.append(adapter(inputs).float())
        return join_segments(deltas, ranges, x.shape[0])


def _is_plain_lora(adapter: nn.Module) -> bool:
    """A LoRA without a variant: the segmented op computes it from A, B and the scale alone."""
    return type(adapter) is LoraAdapter and type(adapter.variant) is LoraVariant
