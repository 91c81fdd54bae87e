"""MeteoRA adapters on a model: their spec and where their gates go.

A MeteoRA adapter (``routing_strategy`` "meteora") embeds N existing LoRA adapters and puts a
``MeteoraAdapter`` (``mlora.adapters.meteora.layer``: a gate ``Linear(in, N)`` plus the N LoRAs) on
every gated linear layer; a token's output adds the weighted deltas of its top-k adapters. An
embedded adapter that does not target a gated layer adds nothing there when chosen. The spec
comes from a config (``mlora.adapters.meteora.format.meteora_spec`` reads the adapter folders) or a
saved MeteoRA folder; this module only builds the layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mlora.adapters import AdapterModel, LoraSpec, MultiLoraLinear
from mlora.adapters.meteora.layer import MeteoraAdapter
from mlora.config.schema import lora_scaling


@dataclass(frozen=True)
class EmbeddedLora:
    """One embedded LoRA adapter, as trained.

    Attributes:
        name: its task label (the base name of the folder it came from).
        r, lora_alpha, use_rslora: its LoRA shape and scale.
        target_modules: the layers it adapts (last name components).
        lora_dropout: its own dropout (recorded; MeteoRA applies the mixture's ``dropout``).
        folder: where its weights are read when attached; None when they come with a saved
            MeteoRA folder.
    """

    name: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    lora_dropout: float = 0.0
    folder: str | None = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


@dataclass(frozen=True)
class MeteoraSpec(LoraSpec):
    """A MeteoRA adapter. ``target_modules`` are the gated layers, ``r`` the largest embedded
    rank and ``dropout`` the dropout on the embedded LoRAs' input in training.

    Attributes:
        adapters: the embedded LoRAs, in gate-output order.
        top_k, temperature: the gate's routing.
        train_loras: whether the embedded LoRAs train too (default: only the gates).
        gate_loss_coef: weight of the gate's cross-entropy against the rows' task labels.
        task_field: the data field naming each row's adapter (None: no gate loss).
        forward_mode: "grouped" or "loop".
        lora_alpha, use_rslora: unused (each embedded adapter has its own scale); here because
            every MoE-kind spec carries them.
    """

    adapters: tuple[EmbeddedLora, ...] = ()
    top_k: int = 2
    temperature: float = 1.0
    train_loras: bool = False
    gate_loss_coef: float = 50.0
    task_field: str | None = None
    forward_mode: str = "grouped"
    lora_alpha: float = 1.0
    use_rslora: bool = False

    @property
    def peft_type(self) -> str:
        return "METEORA"

    @property
    def expert_names(self) -> list[str]:
        """The embedded adapters' names, in gate-output order (for the gate statistics)."""
        return [adapter.name for adapter in self.adapters]

    def attach(self, model: AdapterModel, name: str) -> MeteoraSpec:
        attach_meteora(model, name, self)
        return self


def attach_meteora(model: AdapterModel, name: str, spec: MeteoraSpec) -> None:
    """Add MeteoRA adapter ``name`` to ``model``: a ``MeteoraAdapter`` on every gated layer,
    its embedded LoRAs frozen unless ``spec.train_loras``; weights are loaded afterwards.

    Raises:
        MloraError: a gated module the model lacks.
    """
    gates: list[MeteoraAdapter] = []

    def gate_for(path: str, layer: MultiLoraLinear) -> MeteoraAdapter:
        leaf = path.rsplit(".", 1)[-1]
        loras = [
            (adapter.r, adapter.scaling) if leaf in adapter.target_modules else None
            for adapter in spec.adapters
        ]
        module = MeteoraAdapter(
            layer.in_features,
            layer.out_features,
            loras,
            top_k=spec.top_k,
            temperature=spec.temperature,
            dropout=spec.dropout,
            forward_mode=spec.forward_mode,
            context=model.context,
            adapter_name=name,
        ).to(layer.base_layer.weight.device)
        module.loras.requires_grad_(spec.train_loras)
        gates.append(module)
        return module

    model.attach_lora(name, spec, gate_for)
    for module in gates:  # the gate loss is averaged over the gated layers
        module.gate_loss_weight = spec.gate_loss_coef / len(gates)


@contextlib.contextmanager
def record_gates(model: AdapterModel, name: str) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Keep the gate logits of MeteoRA adapter ``name`` for every pass inside the block.

    Yields:
        {layer path: [(T, N) fp32 gate logits of each pass over the adapter's tokens]}; the
        top-1 adapter of a token is the argmax of its row (see the README's composite prompts).
    """
    gates = {
        path: module
        for path, module in model.adapter_modules(name)
        if isinstance(module, MeteoraAdapter)
    }
    traces: dict[str, list[torch.Tensor]] = {path: [] for path in gates}
    for path, module in gates.items():
        module.trace = traces[path]
    try:
        yield traces
    finally:
        for module in gates.values():
            module.trace = None
