"""MeteoRA (Xu et al., ICLR 2025) on one linear layer: a trained gate picks, per token, the
top-k of N embedded LoRA adapters.

    logits = gate(x)                                    # (T, N), gate = Linear(in, N, bias=False)
    w      = softmax(top-k(logits) / temperature)       # (T, N), 0 outside each token's top-k
    delta  = sum_i w_i * scale_i * B_i(A_i(drop(x)))    # only the chosen adapters count

``softmax(top-k(logits) / T)`` equals the top-k of ``softmax(logits / T)`` renormalised, which is
the top-k router MixLoRA and MoLA use (``top_k_weights``); with top_k 1 the weight is exactly 1
(upstream's special case). Dropout (MeteoRA's ``lora_dropout``) is drawn once per token from the
adapter's own stream and shared by every embedded LoRA, so both forward modes see the same
masks; the gate sees the undropped input.

Two forward modes, equal up to summation order (tested in outputs and gradients):

``loop``
    the reference: each embedded LoRA on every token, times its weight (0 where not chosen).
``grouped``
    the N adapters' A and B stacked along the rank (ranks may differ): one (T, in) x (in, sum r)
    matmul, the per-token weights x scales applied to each adapter's rank columns, one
    (T, sum r) x (sum r, out) matmul. No per-token Python and no host sync; it costs what one
    LoRA of rank ``sum r`` costs, so it suits the usual N x r of a few hundred.

In training the module reports to ``context.aux_losses`` each adapter's gate weight summed over
the real tokens (gate statistics: with top-1, the tokens it gets) and, when the rows carry task
labels, ``gate_loss_weight`` x the gate's cross-entropy against each token's label (mean over
the segment's labelled tokens; the spec sets the weight to ``gate_loss_coef / gated layers`` so
the sum over layers is their average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlora.adapters.lora.layer import LoraAdapter, adapter_dropout
from mlora.adapters.routing import top_k_weights
from mlora.adapters.spec import AdapterInput
from mlora.batching.aux_losses import RouterStats
from mlora.batching.layout import LayoutContext

FORWARD_MODES = ("grouped", "loop")


class MeteoraAdapter(nn.Module):
    """A gate over N embedded LoRAs on one linear layer (``LoraAdapter``'s interface).

    Args:
        in_features, out_features: the wrapped layer's shape.
        loras: per embedded adapter, ``(r, scaling)``, or None where that adapter does not
            target this layer (it then adds nothing when chosen).
        top_k: adapters per token.
        temperature: divides the top-k logits before their softmax.
        dropout: dropout on the embedded LoRAs' input in training.
        forward_mode: "grouped" or "loop" (see the module docstring).
        context, adapter_name: where (and under which adapter) to report gate statistics and
            the gate loss in training; None: report nothing (a standalone layer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        loras: Sequence[tuple[int, float] | None],
        top_k: int = 2,
        temperature: float = 1.0,
        dropout: float = 0.0,
        forward_mode: str = "grouped",
        context: LayoutContext | None = None,
        adapter_name: str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= len(loras):
            raise ValueError(f"top_k must be in [1, {len(loras)}], got {top_k}")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.num_adapters = len(loras)
        self.out_features = out_features
        self.top_k = top_k
        self.temperature = temperature
        self.dropout_p = dropout
        self.forward_mode = forward_mode
        self.context = context
        self.adapter_name = adapter_name
        self.gate_loss_weight = 0.0  # set by the spec: gate_loss_coef / gated layers
        self.trace: list[torch.Tensor] | None = None  # gate logits of each pass, when recording
        self.gate = nn.Linear(in_features, len(loras), bias=False)  # nn.Linear's own init
        self.loras = nn.ModuleDict(
            {
                str(i): LoraAdapter(in_features, out_features, shape[0], shape[1])
                for i, shape in enumerate(loras)
                if shape is not None
            }
        )
        present = [(i, shape) for i, shape in enumerate(loras) if shape is not None]
        scalings = torch.zeros(len(loras))
        for i, (_, scaling) in present:
            scalings[i] = scaling
        owner = [i for i, (r, _) in present for _ in range(r)]  # adapter of each stacked rank
        self.register_buffer("scalings", scalings, persistent=False)
        self.register_buffer("rank_owner", torch.tensor(owner, dtype=torch.long), persistent=False)

    needs_base_weight = False  # no DoRA: ``MultiLoraLinear`` need not pass the dense base weight

    @property
    def router_stat_experts(self) -> int | None:
        """Adapters whose gate sums this gate records (``AdapterHost``'s hooks); None without a
        gate loss."""
        return self.num_adapters if self.gate_loss_weight else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (T, N), weights (T, N) zero outside the top-k, chosen (T, N) bool), fp32."""
        logits = self.gate(x.to(self.gate.weight.dtype))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        weights, chosen = top_k_weights(probs, self.top_k)
        return logits, weights, chosen

    def forward(self, inputs: AdapterInput) -> torch.Tensor:
        """What the mixture adds to the base output for its tokens.

        Args:
            inputs: the segment's tokens and what the layer gives (``AdapterInput``).

        Returns:
            (T, out) fp32 delta.
        """
        x, random = inputs.x, inputs.random
        token_mask, token_tasks = inputs.token_mask, inputs.token_tasks
        x = x.to(self.gate.weight.dtype)
        logits, weights, _ = self.route(x)
        dropped = adapter_dropout(x, self.dropout_p, self.training, random)
        if not self.loras:
            delta = x.new_zeros(x.shape[0], self.out_features)
        elif self.forward_mode == "grouped":
            delta = self._grouped(dropped, weights)
        else:
            delta = self._loop(dropped, weights)
        if self.trace is not None:
            self.trace.append(logits.detach())
        if self.training and self.context is not None and self.adapter_name is not None:
            self._report(logits, weights, token_mask, token_tasks)
        return delta

    def _loop(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference: every embedded LoRA on every token, weighted (0 where not chosen)."""
        delta = x.new_zeros(x.shape[0], self.out_features)
        for key, lora in self.loras.items():
            i = int(key)
            delta = delta + weights[:, i : i + 1] * lora.lora_B(lora.lora_A(x)) * lora.scaling
        return delta

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All embedded LoRAs at once through their A and B stacked along the rank."""
        loras = list(self.loras.values())
        stacked_a = torch.cat([lora.lora_A.weight for lora in loras])  # (R, in), R = sum r
        stacked_b = torch.cat([lora.lora_B.weight for lora in loras], dim=1)  # (out, R)
        hidden = x @ stacked_a.T  # (T, R)
        coef = (weights * self.scalings).index_select(1, self.rank_owner)  # (T, R)
        return (hidden * coef) @ stacked_b.T  # (T, out)

    def _report(
        self,
        logits: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor | None,
        tasks: torch.Tensor | None,
    ) -> None:
        """Each adapter's gate weight summed over real tokens, and the weighted gate loss."""
        assert self.context is not None and self.adapter_name is not None
        mass = weights if mask is None else weights * mask[:, None]  # (T, N), rows sum to 1
        self.context.aux_losses.add_load(self.adapter_name, mass.sum(dim=0))
        if tasks is None or self.gate_loss_weight == 0:
            return
        labelled = (tasks >= 0).float()  # (T,) padding and unlabelled rows carry -1
        loss = F.cross_entropy(logits, tasks.clamp_min(0), reduction="none")  # (T,)
        collector = self.context.aux_losses
        if collector.global_stats:  # data parallel: the mean over the whole micro-batch
            stats = RouterStats.gate(self.num_adapters, loss, labelled, self.gate_loss_weight)
            collector.add_stats(self.adapter_name, self, stats)
            return
        mean = (loss * labelled).sum() / labelled.sum().clamp_min(1)
        collector.add(self.adapter_name, self.gate_loss_weight * mean)
