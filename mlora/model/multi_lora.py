"""The frozen base model with adapter-aware layers injected, and its per-adapter loss.

We wrap transformers' own model classes (never copy them): the base causal LM is loaded with
``AutoModelForCausalLM``, frozen, and each target linear layer is replaced in place by a
``MultiLoraLinear``. Only the adapter-aware layers know adapters exist; they read the batch
layout from a ``LayoutContext`` that this class sets around each pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlora.adapters import AdapterHost, LoraSpec, MultiLoraLinear
from mlora.adapters.fused_experts import FUSED_PARAMETERS, fused_experts_problem
from mlora.batching.collate import LossBatch
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.batching.packing import resolve_packing
from mlora.core.errors import MloraError
from mlora.model.head_loss import chunked_head_losses
from mlora.model.parameter_targets import (
    ParameterTarget,
    attach_parameter_loras,
    plan_parameter_targets,
)
from mlora.ops.activation_recompute import recompute_activations
from mlora.ops.linear_cross_entropy import DEFAULT_CHUNK_MB
from mlora.ops.varlen_attention import SEQUENCES_KWARG, streaming, streams_rows

logger = logging.getLogger("mlora")


# (token losses (N,), batch, SFT losses (S,)) -> (S,) each segment's loss under its objective
SegmentObjective = Callable[[torch.Tensor, LossBatch, torch.Tensor], torch.Tensor]

# Module replacement dispatch: (predicate, factory), first match wins (PEFT's pattern).
LayerFactory = Callable[[nn.Module, LayoutContext], nn.Module]
_DISPATCH: list[tuple[Callable[[nn.Module], bool], LayerFactory]] = [
    (lambda m: isinstance(m, nn.Linear), MultiLoraLinear),
]
SUPPORTED_LAYERS = "torch.nn.Linear (including bitsandbytes Linear4bit / Linear8bitLt)"


def can_wrap(module: nn.Module) -> bool:
    """Whether ``wrap_layer`` can adapt ``module`` (preflight checks targets without loading)."""
    return any(matches(module) for matches, _ in _DISPATCH)


def wrap_layer(module: nn.Module, context: LayoutContext) -> nn.Module:
    """Return the adapter-aware replacement of ``module``.

    Raises:
        MloraError: the layer type is not supported.
    """
    for matches, factory in _DISPATCH:
        if matches(module):
            return factory(module, context)
    raise MloraError(f"cannot adapt a {type(module).__name__} layer; supported: {SUPPORTED_LAYERS}")


def unadaptable_module(adapter: str, path: str, module: nn.Module) -> str:
    """The one-line refusal of a target module that is no linear layer, with what to do."""
    if isinstance(module, AdapterHost):  # already wrapped for target_parameters
        module = getattr(module, "base_layer", module)
    kind = type(module).__name__
    message = f"adapter {adapter!r}: cannot adapt {path} ({kind}): supported: {SUPPORTED_LAYERS}"
    leaf = path.rsplit(".", 1)[-1]
    params = dict(module.named_parameters(recurse=False))
    if fused_experts_problem(module) is None:  # fused MoE experts
        tensors = [f"{leaf}.{name}" for name in FUSED_PARAMETERS]
    elif "weight" in params and params["weight"].dim() == 2:  # a router
        tensors = [f"{leaf}.weight"]
    else:
        return message
    return f"{message}; its tensors can be adapted with target_parameters ({', '.join(tensors)})"


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


class MultiLoraModel(nn.Module):
    """A frozen causal LM that trains and runs many named adapters side by side.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), already on its device.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        freeze(model)
        self.model = model
        self.context = LayoutContext()
        self.specs: dict[str, LoraSpec] = {}
        # Whether training and loss evaluation pack rows (see mlora.batching.packing); padded by
        # default, the trainer and evaluation resolve the ``packing`` key.
        self.packing = False
        # MiB of fp32 logits the head's loss holds at once (0: the full logits; ``loss_chunk_mb``)
        self.loss_chunk_mb = DEFAULT_CHUNK_MB

    # --- adapters ------------------------------------------------------------------------------

    def _linear_names(self) -> list[str]:
        return sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in self.model.named_modules()
                if isinstance(m, nn.Linear)
            }
        )

    def adapter_layers(self) -> Iterator[tuple[str, MultiLoraLinear]]:
        """(module path, layer) of every adapter-aware layer, in model order."""
        for name, module in self.model.named_modules():
            if isinstance(module, MultiLoraLinear):
                yield name, module

    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        """Attach a new LoRA adapter to every target layer.

        Raises:
            MloraError: a duplicate name, or a target module the model does not have.
        """
        if name in self.specs:
            raise MloraError(f"adapter {name!r} already exists")
        self.specs[name] = spec.attach(self, name)
        if not self.training:
            self.eval()  # new adapter modules are born training: no dropout after model.eval()

    def attach_lora(
        self,
        name: str,
        spec: LoraSpec,
        module_for: Callable[[str, nn.Module], nn.Module | None] | None = None,
    ) -> None:
        """Wrap every target linear layer of ``spec`` and give it adapter ``name``'s LoRA.

        Args:
            module_for: ``(path, layer)`` -> the module adapter ``name`` uses on that layer
                instead of a plain LoRA (per-linear MoE experts), or None for a plain LoRA.
        """
        targets = set(spec.target_modules)
        plan = self._plan_parameters(name, spec)
        found: set[str] = set()
        for path, module in list(self.model.named_modules()):
            leaf = path.rsplit(".", 1)[-1]
            if leaf in targets and not isinstance(module, MultiLoraLinear) and not can_wrap(module):
                raise MloraError(unadaptable_module(name, path, module))
        for path, module in list(self.model.named_modules()):
            leaf = path.rsplit(".", 1)[-1]
            if leaf not in targets:
                continue
            if not isinstance(module, MultiLoraLinear):
                parent = (
                    self.model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else self.model
                )
                module = wrap_layer(module, self.context)
                setattr(parent, leaf, module)
            custom = module_for(path, module) if module_for is not None else None
            if custom is None:
                module.add_adapter(
                    name, spec.r, spec.scaling, spec.dropout, spec.init, spec.use_dora
                )
            else:
                module.adapters[name] = custom
            found.add(leaf)
        missing = sorted(targets - found)
        if missing:
            self.remove_adapter(name, strict=False)
            available = ", ".join(self._linear_names())
            raise MloraError(
                f"adapter {name!r}: target module {missing[0]!r} not found in "
                f"{type(self.model).__name__} (its linear layers: {available})"
            )
        if plan:
            attach_parameter_loras(
                self.model, self.context, name, plan, spec.r, spec.scaling, spec.init
            )

    def _plan_parameters(self, name: str, spec: LoraSpec) -> list[ParameterTarget]:
        """The checked plan of ``spec.target_parameters`` (nothing is wrapped yet).

        Raises:
            MloraError: dropout or DoRA with parameter targets (PEFT applies a parameter LoRA
                as a weight delta and refuses both), or a target the model cannot take.
        """
        if not spec.target_parameters:
            return []
        if spec.dropout or spec.use_dora:
            key = "lora_dropout" if spec.dropout else "use_dora"
            raise MloraError(
                f"adapter {name!r}: {key} does not apply with target_parameters (PEFT applies a "
                "parameter LoRA to the weight, where input dropout and DoRA cannot act, and "
                "refuses both); set lora_dropout 0 and use_dora false"
            )
        return plan_parameter_targets(self.model, name, spec.target_parameters)

    def adapter_hosts(self) -> list[tuple[str, AdapterHost]]:
        """(module path, host) of every module that holds adapters: wrapped linear layers first,
        then block-level hosts (MixLoRA FFNs), each in model order (``AdapterHost.host_rank``)."""
        hosts = [(p, m) for p, m in self.model.named_modules() if isinstance(m, AdapterHost)]
        return sorted(hosts, key=lambda item: item[1].host_rank)  # stable: model order kept

    def remove_adapter(self, name: str, strict: bool = True) -> None:
        for _, host in self.adapter_hosts():
            host.remove_hosted(name)
        if strict and name not in self.specs:
            raise MloraError(f"no adapter named {name!r}")
        self.specs.pop(name, None)
        self.context.generators.forget(name)

    def adapter_modules(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """(base layer path, adapter module) of adapter ``name`` on every layer it targets.

        A block-level host names its own path below it (a MixLoRA adapter yields
        ``(FFN path + ".moes." + name, MixLoraExperts)``).
        """
        for path, host in self.adapter_hosts():
            for suffix, module in host.hosted(name):
                yield (f"{path}.{suffix}" if suffix else path), module

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, module in self.adapter_modules(name) for p in module.parameters()]

    # --- passes --------------------------------------------------------------------------------

    def set_packing(self, requested: str | bool) -> None:
        """Apply the ``packing`` key (``mlora.batching.packing.resolve_packing``); its probes run
        the bare base model, whatever layout an earlier pass left set."""
        with self.context.use(None):
            self.packing = resolve_packing(self.model, requested)

    @property
    def packing_form(self) -> str:
        """How ``collate`` lays out this model's training batches: "stream", "bins" or "padded"."""
        if not self.packing:
            return "padded"
        return "stream" if streams_rows(self.model) else "bins"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BatchLayout
    ) -> Any:
        """Full logits of the wrapped model with each row using its segment's adapter.

        Args:
            input_ids, attention_mask: (B, T) padded rows.
            layout: a per-row layout (``BatchLayout.from_row_adapters``) or a token layout of
                the B*T tokens.
        """
        with self.context.use(layout, attention_mask.reshape(-1).bool()):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def segment_losses(
        self,
        batch: LossBatch,
        token_divisors: torch.Tensor | None = None,
        aux_divisors: torch.Tensor | None = None,
        objective: SegmentObjective | None = None,
    ) -> torch.Tensor:
        """Each segment's summed next-token cross-entropy over ``token_divisors``, shape (S,).

        Plus, in training, each adapter's MoE router losses recorded during this pass on
        ``context.aux_losses`` (see ``mlora.batching.aux_losses``), over ``aux_divisors``.

        Args:
            token_divisors: (S,) default: the segments' own supervised tokens (a mean); the
                trainer passes each adapter's supervised tokens in the whole optimizer step.
            aux_divisors: (S,) default 1; the trainer passes the micro-batches per step.
            objective: replaces some segments' losses given the token losses (preference
                adapters: ``mlora.training.objectives.ObjectivePlan``); None: SFT everywhere.

        The pass's state is installed on the context for the forward only; activation
        recompute installs it again for its recomputation (``mlora.training.recompute``).
        """
        token_loss = self.token_losses(batch)  # (N,)
        sums = token_loss.new_zeros(len(batch.layout.segments)).index_add(
            0, batch.owners, token_loss
        )
        losses = sums / (batch.token_counts if token_divisors is None else token_divisors)
        if objective is not None:
            losses = objective(token_loss, batch, losses)
        aux = self.context.aux_losses.segment_losses(batch.layout.adapters, losses)
        if aux is None:
            return losses
        return losses + (aux if aux_divisors is None else aux / aux_divisors)

    def token_losses(self, batch: LossBatch) -> torch.Tensor:
        """Next-token cross-entropy (fp32) at each supervised position of ``batch``, shape (N,).

        Runs the backbone once for the whole (packed or padded) batch, then applies ``lm_head``
        only to the positions that carry a label (most positions are prompt), under the layout
        of those gathered positions. Training reduces these per segment; evaluation also per
        row (a choice's log-likelihood is minus its row's sum).
        """
        picked = self._supervised_hidden(batch)  # (N, H)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        head = self.model.get_output_embeddings()
        with self.context.install(batch.head_pass_state()):
            losses = chunked_head_losses(head, picked, batch.targets, self.loss_chunk_mb, cap)
            if losses is not None:  # row chunks: the full (N, V) logits never exist
                return losses
            logits = self._logits(picked)  # (N, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, batch.targets, reduction="none")

    def supervised_logits(self, batch: LossBatch) -> torch.Tensor:
        """The logits (at least fp32) at each supervised position of ``batch``, shape (N, V):
        what ``token_losses`` scores, for callers that also need the argmax (greedy checks)."""
        picked = self._supervised_hidden(batch)  # (N, H)
        with self.context.install(batch.head_pass_state()):
            logits = self._logits(picked)  # (N, V)
        # half-precision logits are upcast for the softmax; fp32 and fp64 keep their precision
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _supervised_hidden(self, batch: LossBatch) -> torch.Tensor:
        """Run the backbone over ``batch`` under its pass state; (N, H) states at its labels."""
        self.context.aux_losses.clear()
        backbone = self.model.base_model
        rows = {} if batch.sequences is None else {SEQUENCES_KWARG: batch.sequences}
        if rows and not streams_rows(self.model):  # sdpa would let the rows see each other
            raise ValueError("a stream batch needs the model's per-row attention (use_stream)")
        with (
            streaming() if rows else nullcontext(),
            self.context.install(batch.pass_state()),
            recompute_activations(backbone) if torch.is_grad_enabled() else nullcontext(),
        ):
            hidden = backbone(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **rows,
            ).last_hidden_state  # (B, T, H) padded, (bins, W, H) packed or (1, sum L, H) stream
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2 style soft-capping, as the model's own forward does
            logits = torch.tanh(logits / cap) * cap
        return logits
