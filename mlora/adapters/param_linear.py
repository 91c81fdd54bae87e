"""LoRA on a 2-D weight that a module applies with ``F.linear`` itself (a MoE router).

A sparse MoE block's router (``mlp.gate`` in Mixtral, Qwen3-MoE) is no ``nn.Linear``: it holds
a ``weight`` (E, H), computes ``F.linear(x, weight)`` and then its own softmax / top-k. PEFT
adapts it through ``target_parameters`` (``gate.weight``) as ``weight + s * B A``. Here the
module's own forward runs unchanged, and the one ``F.linear`` call that reads the targeted
weight gets each token's adapter delta added (``s * B A x`` for the tokens of the adapter's
segment): a ``TorchFunctionMode`` that is active only while the wrapped module runs. Whether a
module applies its weight that way is probed once, when the first adapter attaches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mlora.adapters.lora.layer import LoraAdapter
from mlora.adapters.spec import AdapterHost
from mlora.batching.layout import LayoutContext
from mlora.ops.segmented_lora import segmented_lora


class _AddToLinear(TorchFunctionMode):
    """Adds ``delta(x)`` to every ``F.linear(x, weight)`` of one weight tensor, counting them."""

    def __init__(self, weight: torch.Tensor, delta: Any) -> None:
        super().__init__()
        self.weight, self.delta, self.calls = weight, delta, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)  # the mode is off inside its own handler
        if func is F.linear and len(args) >= 2 and args[1] is self.weight:
            self.calls += 1
            if self.delta is not None:
                result = result + self.delta(args[0]).to(result.dtype)
        return result


def linear_use_problem(module: nn.Module, parameter: str) -> str | None:
    """Why a LoRA on ``module.<parameter>`` cannot be applied here, or None: the parameter must
    be 2-D and ``module(x)`` for (2, in) tokens must apply it with ``F.linear`` (probed)."""
    weight = getattr(module, parameter)
    if weight.dim() != 2:
        return f"{parameter} is a {weight.dim()}-D tensor, not an (out, in) weight"
    if weight.device.type == "meta":
        return None  # nothing to run on: the probe runs when the weights are loaded
    probe = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    mode = _AddToLinear(weight, None)
    try:
        with torch.no_grad(), mode:
            module(probe)
    except (TypeError, RuntimeError, ValueError) as exc:
        return f"its forward cannot be probed with (tokens, {weight.shape[1]}) inputs ({exc})"
    if mode.calls != 1:
        return f"its forward applies {parameter} with torch.nn.functional.linear {mode.calls} times"
    return None


class MultiLoraParamLinear(nn.Module, AdapterHost):
    """A frozen module whose 2-D ``parameter`` gets each segment's adapter LoRA.

    Args:
        base_layer: the model's module (``linear_use_problem`` is None for it).
        parameter: the name of the weight on ``base_layer`` (``weight`` for routers).
        context: the layout holder shared by all adapter-aware layers of the model.
    """

    def __init__(self, base_layer: nn.Module, parameter: str, context: LayoutContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter = parameter
        self.context = context
        self.adapters = nn.ModuleDict()

    def add_adapter(self, name: str, r: int, scaling: float, init: str) -> None:
        """Give adapter ``name`` a LoRA (fp32, no dropout: PEFT's parameter LoRA has none)."""
        out_features, in_features = getattr(self.base_layer, self.parameter).shape
        lora = LoraAdapter(in_features, out_features, r, scaling, 0.0, init)
        self.adapters[name] = lora.to(getattr(self.base_layer, self.parameter).device)

    def hosted(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        if name in self.adapters:
            yield "", self.adapters[name]

    def remove_hosted(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        weight = getattr(self.base_layer, self.parameter)
        with _AddToLinear(weight, self._delta if self.adapters else None):
            return self.base_layer(hidden_states, *args, **kwargs)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """(..., out) every segment's LoRA delta on the (..., in) input of the linear call."""
        flat = x.reshape(-1, x.shape[-1])
        layout = self.context.layout_for(flat.shape[0])
        mine = [] if layout is None else [s for s in layout.segments if s.adapter in self.adapters]
        mine = [s for s in mine if s.size > 0]
        if not mine:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        adapters = [self.adapters[s.adapter] for s in mine]
        delta = segmented_lora(
            flat,
            [(s.start, s.end) for s in mine],
            [a.lora_A.weight for a in adapters],
            [a.lora_B.weight for a in adapters],
            [a.scaling for a in adapters],
        )
        return delta.view(*x.shape[:-1], delta.shape[-1])
