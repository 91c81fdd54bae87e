"""What every adapter kind shares: its spec's base shape and the two protocols around it.

``LoraSpec`` is the shape of one plain LoRA adapter; the other kinds (MixLoRA, LoRAMoE/MoLA,
MeteoRA) subclass it and override ``attach``. ``AdapterHost`` is any module that holds adapter
modules by name (a wrapped linear layer, a MixLoRA FFN): the model finds, lists and removes an
adapter by walking hosts, so it never names a kind. ``AdapterModel`` is what a spec's
``attach`` may use of the model, so the kinds never import the model module.
``AdapterModule`` is the contract of the module a host runs per adapter on its segment:
one ``AdapterInput`` in, the (N, out) fp32 delta out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from mlora.batching.layout import LayoutContext
from mlora.batching.randomness import SegmentRandom


@dataclass(frozen=True)
class AdapterInput:
    """What an adapter module gets for its segment of one layer's tokens.

    Attributes:
        x: (N, in) the segment's layer input.
        base_result: (N, out) the frozen layer's output for the same tokens.
        base_weight: (out, in) the dense base weight; given only to modules whose
            ``needs_base_weight`` is set (DoRA), else None.
        base_bias: (out,) the base layer's bias, or None.
        random: the adapter's random stream over these tokens (dropout, jitter); None: the
            global RNG.
        token_mask: (N,) bool, the real (non-padding) tokens, for router statistics; None: all.
        token_tasks: (N,) long, each token's task label (-1: none), for MeteoRA's gate loss;
            None: no labels.
    """

    x: torch.Tensor
    base_result: torch.Tensor
    base_weight: torch.Tensor | None = None
    base_bias: torch.Tensor | None = None
    random: SegmentRandom | None = None
    token_mask: torch.Tensor | None = None
    token_tasks: torch.Tensor | None = None


class AdapterModule(Protocol):
    """The module a host (``MultiLoraLinear``) runs for one adapter on its segment: LoRA/DoRA
    (``LoraAdapter``), LoRAMoE/MoLA's experts in a linear, MeteoRA's gated LoRAs."""

    needs_base_weight: bool  # whether ``AdapterInput.base_weight`` must be given

    def __call__(self, inputs: AdapterInput) -> torch.Tensor:
        """(N, out) fp32: what the adapter adds to ``inputs.base_result``."""
        ...


class AdapterHost:
    """A module that holds adapters by name (mixed into ``nn.Module`` subclasses).

    Attributes:
        host_rank: the walk order of hosts: every rank-0 host (a wrapped linear layer) before
            any rank-1 host (a block such as a MixLoRA FFN), each in model order. This order is
            the order of ``MultiLoraModel.adapter_parameters`` and so of optimizer state in
            checkpoints; it must not change.

    An adapter module a host holds may define a read-only hook that training asks for under
    data parallel (absent: None): ``router_stat_experts`` (int or None: the experts whose
    router sums it records, so the trainer reduces them over processes).
    """

    host_rank: ClassVar[int] = 0

    def hosted(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """(path suffix below this host, module) of adapter ``name`` here; "" = the host's path."""
        raise NotImplementedError

    def remove_hosted(self, name: str) -> None:
        """Forget adapter ``name`` here (nothing if this host does not hold it)."""
        raise NotImplementedError


class AdapterModel(Protocol):
    """What an adapter kind's ``attach`` uses of ``MultiLoraModel``."""

    model: nn.Module
    context: LayoutContext

    def attach_lora(
        self,
        name: str,
        spec: LoraSpec,
        module_for: Callable[[str, nn.Module], nn.Module | None] | None = None,
    ) -> None:
        """Wrap ``spec``'s target linears; ``module_for(path, layer)`` may give a kind's own
        module for a layer (None: a plain LoRA)."""
        ...

    def remove_adapter(self, name: str, strict: bool = True) -> None: ...

    def adapter_modules(self, name: str) -> Iterator[tuple[str, nn.Module]]: ...


@dataclass(frozen=True)
class LoraSpec:
    """The shape of one LoRA adapter: flat arguments, so no config object reaches a layer.

    ``scaling`` is what the layers use; ``lora_alpha`` and ``use_rslora`` are where it came
    from (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), recorded in the saved
    ``adapter_config.json``. A spec built from a scaling alone records ``alpha = scaling * r``.
    """

    r: int
    scaling: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    init: str = "original"
    use_dora: bool = False
    # parameter tensors adapted by name (PEFT's target_parameters): MoE experts and routers
    target_parameters: tuple[str, ...] = ()
    lora_alpha: float | None = None
    use_rslora: bool = False

    @property
    def alpha(self) -> float:
        """``lora_alpha`` as configured, else the one that gives ``scaling`` without rsLoRA."""
        return self.scaling * self.r if self.lora_alpha is None else self.lora_alpha

    @property
    def peft_type(self) -> str:
        """``peft_type`` in ``adapter_config.json``: which on-disk format stores it."""
        return "LORA"

    def attach(self, model: AdapterModel, name: str) -> LoraSpec:
        """Give ``model`` adapter ``name`` of this shape; returns the spec as attached (MoE
        kinds may resolve defaults from the model). Each kind of spec knows its own modules."""
        model.attach_lora(name, self)
        return self
