"""LoRA on a mixture-of-experts base's fused expert tensors, PEFT's ``target_parameters`` math.

Recent transformers keep a sparse MoE block's experts as two parameter tensors on one module
(Mixtral, Qwen3-MoE, ...): ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), expert ``e``
computing ``down_e(act(gate_e(x)) * up_e(x))``. PEFT adapts such a tensor with a per-expert
low-rank delta, ``W_e + s * B_e A_e``, stored as ``lora_A.weight`` (E*r, in) (rows of expert
``e`` together) and ``lora_B.weight`` (out, r*E) (columns ``j*E + e``). The same delta applied
to the activations, ``x W_e^T + s * (x A_e^T) B_e^T``, lets each token use its own adapter's
delta, so one pass serves every adapter's segment. That is why the expert loop is written out
here: the delta enters inside each expert, before the nonlinearity, where the experts
module's own forward gives no hook. With no adapter on this pass, transformers' own forward
(whatever experts implementation the model chose) runs. Tested equal to PEFT's
``target_parameters`` LoRA and, without adapters, to the module's own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mlora.adapters.lora.layer import init_lora_weights
from mlora.adapters.spec import AdapterHost
from mlora.batching.layout import AdapterSegment, LayoutContext

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")  # declaration order: PEFT nests in this order
FORWARD_ARGUMENTS = ["hidden_states", "top_k_index", "top_k_weights"]


def fused_experts_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a fused experts module this file computes exactly, or None.

    Accepted: exactly the parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
    not transposed, no biases, an ``act_fn``, and ``forward(hidden_states, top_k_index,
    top_k_weights)`` (transformers' Mixtral / Qwen-MoE experts layout).
    """
    params = {name: p for name, p in module.named_parameters(recurse=False)}
    if set(params) != set(FUSED_PARAMETERS):
        extra = sorted(set(params) - set(FUSED_PARAMETERS))
        if extra:
            return f"it has {', '.join(extra)} besides gate_up_proj and down_proj"
        found = ", ".join(sorted(params)) or "no parameters"
        return f"it has {found}, not gate_up_proj and down_proj"
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return "gate_up_proj and down_proj are not (experts, out, in) tensors"
    experts, double_inner, hidden = gate_up.shape
    if getattr(module, "is_transposed", False) or tuple(down.shape) != (
        experts,
        hidden,
        double_inner // 2,
    ):
        return (
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
            "(E, 2I, H) and (E, H, I)"
        )
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    arguments = list(inspect.signature(module.forward).parameters)
    if arguments != FORWARD_ARGUMENTS:
        return f"its forward takes ({', '.join(arguments)}), not ({', '.join(FORWARD_ARGUMENTS)})"
    return None


class ExpertsLora(nn.Module):
    """One adapter's LoRA on one fused expert tensor, in PEFT's ``ParamWrapper`` layout.

    Args:
        experts, in_features, out_features: the tensor is (experts, out_features, in_features).
        r, scaling, init: as ``LoraAdapter`` (no dropout: PEFT applies it as a weight delta).
    """

    magnitude = None  # no DoRA: PEFT's parameter LoRA has no variants

    def __init__(
        self,
        experts: int,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        init: str = "original",
    ) -> None:
        super().__init__()
        self.experts, self.r, self.scaling = experts, r, scaling
        self.lora_A = nn.Linear(in_features, r * experts, bias=False)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False)
        init_lora_weights(self.lora_A, self.lora_B, init, r)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert factors: A (E, r, in) and B (E, out, r), ``delta_e = s * B[e] @ A[e]``."""
        a = self.lora_A.weight.view(self.experts, self.r, -1)
        b = self.lora_B.weight.view(-1, self.r, self.experts).permute(2, 0, 1)
        return a, b


class MultiLoraExperts(nn.Module, AdapterHost):
    """A frozen fused experts module plus adapters' LoRA on its tensors, by the batch layout.

    Args:
        base_layer: the model's experts module (``fused_experts_problem`` is None for it).
        context: the layout holder shared by all adapter-aware layers of the model.
    """

    def __init__(self, base_layer: nn.Module, context: LayoutContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.adapters = nn.ModuleDict()  # adapter -> ModuleDict(parameter name -> ExpertsLora)

    def add_adapter(
        self, name: str, parameters: list[str], r: int, scaling: float, init: str
    ) -> None:
        """Give adapter ``name`` a LoRA on each of ``parameters`` (fp32, the base's device)."""
        loras = nn.ModuleDict()
        for parameter in FUSED_PARAMETERS:
            if parameter in parameters:
                experts, out_features, in_features = getattr(self.base_layer, parameter).shape
                lora = ExpertsLora(experts, in_features, out_features, r, scaling, init)
                loras[parameter] = lora.to(getattr(self.base_layer, parameter).device)
        self.adapters[name] = loras

    def hosted(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """PEFT nests one wrapper per targeted tensor, the first tensor innermost: its keys
        carry one ``base_layer.`` per wrapper around it."""
        if name not in self.adapters:
            return
        loras = self.adapters[name]
        targeted = [p for p in FUSED_PARAMETERS if p in loras]
        for depth, parameter in enumerate(reversed(targeted)):
            yield ".".join(["base_layer"] * depth), loras[parameter]

    def remove_hosted(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) mixture output of the (N, H) tokens routed to ``top_k_index`` (N, k)."""
        layout = self.context.layout_for(hidden_states.shape[0]) if self.adapters else None
        mine = [] if layout is None else [s for s in layout.segments if s.adapter in self.adapters]
        mine = [s for s in mine if s.size > 0]
        if not mine:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return self._with_lora(hidden_states, top_k_index, top_k_weights, mine)

    def _factors(
        self, parameter: str, segments: list[AdapterSegment], num_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The LoRA of every segment's adapter on ``parameter`` as one of rank R = sum r:
        A (E, R, in), B (E, out, R) and each token's scale per rank column (N, R), which is
        its adapter's ``s`` on that adapter's columns and 0 elsewhere (0 for other tokens)."""
        loras: dict[str, ExpertsLora] = {}
        for seg in segments:
            if parameter in self.adapters[seg.adapter]:
                loras.setdefault(seg.adapter, self.adapters[seg.adapter][parameter])
        if not loras:
            return None
        stacks = [lora.stacked() for lora in loras.values()]
        offsets, total = {}, 0
        for adapter, lora in loras.items():
            offsets[adapter], total = total, total + lora.r
        first = next(iter(loras.values())).lora_A.weight
        scale = torch.zeros(num_tokens, total, dtype=first.dtype, device=device)
        for seg in segments:
            if seg.adapter in loras:
                lora, start = loras[seg.adapter], offsets[seg.adapter]
                scale[seg.start : seg.end, start : start + lora.r] = lora.scaling
        a = torch.cat([a for a, _ in stacks], dim=1)
        b = torch.cat([b for _, b in stacks], dim=2)
        return a, b, scale

    def _with_lora(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        segments: list[AdapterSegment],
    ) -> torch.Tensor:
        """The experts loop of transformers' eager implementation, each expert's two
        projections plus the LoRA of each token's adapter."""
        base = self.base_layer
        num_tokens, device = hidden_states.shape[0], hidden_states.device
        factors = {p: self._factors(p, segments, num_tokens, device) for p in FUSED_PARAMETERS}
        experts = base.gate_up_proj.shape[0]

        def project(
            parameter: str, x: torch.Tensor, expert: int, tokens: torch.Tensor
        ) -> torch.Tensor:
            """(n, out) ``x`` through ``expert``'s slice of ``parameter`` plus the LoRA of each
            of the n tokens' adapter (``tokens``: their indices in the pass)."""
            y = F.linear(x, getattr(base, parameter)[expert])
            lora = factors[parameter]
            if lora is None:
                return y
            a, b, scale = lora
            low = F.linear(x.to(a.dtype), a[expert]) * scale[tokens]  # (n, R)
            return y + F.linear(low, b[expert]).to(y.dtype)

        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # (E + 1, k, N): index E is "no expert" (expert parallelism)
            expert_mask = F.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():  # one read of the experts hit (eager reads each)
            if expert == experts:
                continue
            slot, tokens = torch.where(expert_mask[expert])
            gate, up = project("gate_up_proj", hidden_states[tokens], expert, tokens).chunk(2, -1)
            inner = base.act_fn(gate) * up
            result = project("down_proj", inner, expert, tokens)
            result = result * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, result.to(out.dtype))
        return out
