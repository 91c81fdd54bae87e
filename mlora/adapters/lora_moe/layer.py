"""Per-linear mixtures of LoRA experts: LoRAMoE (dense) and MoLA (top-k), one adapter each.

Both put E expert LoRAs and a router (a linear layer without bias, fp32) on each target linear
layer and add a router-weighted sum of the experts' deltas to the frozen output:

    p = softmax(router(x))                                     # (N, E)
    LoRAMoE:  delta = sum_e p_e * expert_e(x)                  # every expert, every token
    MoLA:     keep the top-k of p, renormalise them to sum 1; each token runs only its k experts

This is the upstream m-LoRA / MoE-PEFT semantics (``LoraMoe`` and ``MolaSparseMoe``): the router
is initialised with ``kaiming_uniform_(a=sqrt(router_init_range))`` (default range 5: the
``nn.Linear`` default), expert ``i`` is an ordinary LoRA (its own dropout and scale; DoRA works
too, which upstream lacks). Both modules have ``LoraAdapter``'s interface, so they sit in
``MultiLoraLinear.adapters`` under one adapter name and see only that adapter's segment.

MoLA dispatches tokens to experts by index: the (token, expert) pairs are sorted by expert, each
pair runs through its expert's LoRA (``mlora.ops.routed_lora``: group offsets stay on the device)
and the weighted results are scattered back. The segment's real tokens come in canonical order
(``SegmentRandom.canonical_order``), so there are exactly n*k pairs, known on the host: no device
sync. DoRA experts scale each pair by its expert's magnitude over weight norm, in the same pass.
A segment with padding but no canonical index (``MultiLoraModel.forward``, evaluation) takes
its real tokens in segment order (one host sync for their count) and runs the same path: there
is one routed path, tested against a dense loop in fp64 and fp32.

In training, each module reports to its model's ``context.aux_losses`` (see
``mlora.batching.aux_losses``) the routed-token counts per expert (LoRAMoE: the router probability
mass, it is dense) and, for MoLA with ``router_loss``, Mixtral's load-balancing loss over the
segment's real tokens (upstream offers it "for testing", off by default). LoRAMoE has no router
loss, as upstream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlora.adapters.lora import LoraAdapter, dora_delta, dora_scales, slot_dropout
from mlora.adapters.routing import load_balance, top_k
from mlora.adapters.routing import load_balancing_loss as load_balancing_loss  # re-exported
from mlora.adapters.spec import AdapterInput
from mlora.batching.aux_losses import RouterStats
from mlora.batching.layout import LayoutContext
from mlora.batching.randomness import SegmentRandom
from mlora.ops.routed_lora import RoutedPairs, routed_lora, weighted_lora

DEFAULT_ROUTER_INIT_RANGE = 5.0  # upstream's default for loramoe / mola: nn.Linear's own init


class ExpertMixture(nn.Module):
    """What LoRAMoE and MoLA share: the router and E expert LoRAs on one linear layer.

    Args:
        in_features, out_features: the wrapped layer's shape.
        num_experts: E.
        r, scaling, dropout, init, use_dora: each expert's LoRA shape (see ``LoraAdapter``).
        base_weight: the dense (out, in) base weight; required with ``use_dora``.
        router_init_range: router init ``kaiming_uniform_(a=sqrt(router_init_range))``.
        context, adapter_name: where (and under which adapter) to report router statistics and
            losses in training; None: report nothing (a standalone layer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "original",
        use_dora: bool = False,
        base_weight: torch.Tensor | None = None,
        router_init_range: float = DEFAULT_ROUTER_INIT_RANGE,
        context: LayoutContext | None = None,
        adapter_name: str | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.adapter_name = adapter_name
        self.num_experts = num_experts
        self.out_features = out_features
        self.moe_gate = nn.Linear(in_features, num_experts, bias=False)
        nn.init.kaiming_uniform_(self.moe_gate.weight, a=math.sqrt(router_init_range))
        self.experts = nn.ModuleList(
            LoraAdapter(in_features, out_features, r, scaling, dropout, init, use_dora, base_weight)
            for _ in range(num_experts)
        )

    @property
    def needs_base_weight(self) -> bool:
        """The experts use DoRA: ``MultiLoraLinear`` then passes the dense base weight."""
        return self.experts[0].needs_base_weight

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) fp32 routing probabilities of the (N, in) input."""
        return torch.softmax(self.moe_gate(x.to(self.moe_gate.weight.dtype)), dim=-1)

    def _reporting(self) -> bool:
        return self.training and self.context is not None and self.adapter_name is not None


class LoraMoeAdapter(ExpertMixture):
    """LoRAMoE (Dou et al. 2023) on one linear layer: every expert, softmax-weighted.

    Without dropout the mixture is one LoRA of rank E*r whose rank blocks the router
    probabilities scale (two matmuls, ``rank_stacked``); with dropout in training each expert
    runs on its own masked input. Dense by definition, so it has no load-balancing loss
    (neither has upstream).
    """

    def forward(self, inputs: AdapterInput) -> torch.Tensor:
        """What this adapter adds to the base output for its tokens.

        Args:
            inputs: the segment's tokens and what the layer gives (``AdapterInput``).

        Returns:
            (N, out) fp32 delta.
        """
        x, base_result = inputs.x, inputs.base_result
        base_weight, base_bias = inputs.base_weight, inputs.base_bias
        random, token_mask = inputs.random, inputs.token_mask
        probs = self.router_probs(x)  # (N, E)
        if self.rank_stacked():
            delta = self._stacked_delta(x, probs)
        else:
            delta = self._per_expert_delta(x, probs, base_result, base_weight, base_bias, random)
        if self._reporting():  # dense: an expert's "load" is its share of the router's mass
            mask = token_mask
            mass = probs if mask is None else probs * mask[:, None].to(probs.dtype)
            self.context.aux_losses.add_load(self.adapter_name, mass.sum(dim=0))
        return delta

    def rank_stacked(self) -> bool:
        """Whether the experts run as one LoRA of rank E*r (``_stacked_delta``): plain LoRA
        experts with no dropout in effect. With dropout each expert draws its own mask, and
        DoRA rescales each expert's rows by its own norm, so those run expert by expert."""
        plain = not self.needs_base_weight
        return plain and (not self.training or all(e.dropout_p == 0 for e in self.experts))

    def _stacked_delta(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """(N, out) ``sum_e p_e * s * B_e A_e x`` in two matmuls (``ops.weighted_lora``)."""
        experts = list(self.experts)
        return weighted_lora(
            x.to(experts[0].lora_A.weight.dtype),
            probs,
            [e.lora_A.weight for e in experts],
            [e.lora_B.weight for e in experts],
            [e.scaling for e in experts],
        )

    def _per_expert_delta(
        self,
        x: torch.Tensor,
        probs: torch.Tensor,
        base_result: torch.Tensor,
        base_weight: torch.Tensor | None,
        base_bias: torch.Tensor | None,
        random: SegmentRandom | None,
    ) -> torch.Tensor:
        """(N, out) the probability-weighted sum of each expert's own forward (its dropout
        mask drawn from ``random`` in expert order, its DoRA scale)."""
        if base_weight is not None:  # DoRA: cast once for all experts, not a copy each
            base_weight = base_weight.to(self.experts[0].lora_A.weight.dtype)
        delta = x.new_zeros(x.shape[0], self.out_features, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            out = expert(AdapterInput(x, base_result, base_weight, base_bias, random))
            delta = delta + probs[:, e : e + 1] * out
        return delta


class MolaAdapter(ExpertMixture):
    """MoLA (Gao et al. 2024) on one linear layer: each token runs its top-k experts only.

    Args:
        top_k: experts per token; their probabilities are renormalised to sum to 1.
        router_loss: in training, add ``aux_loss_coef`` times Mixtral's load-balancing loss
            over the segment's real tokens to the adapter's loss (via ``context.aux_losses``).
        aux_loss_coef: its weight.
        Others: see ``ExpertMixture``.
    """

    def __init__(
        self,
        *args,
        top_k: int = 2,
        router_loss: bool = False,
        aux_loss_coef: float = 0.001,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {top_k}")
        self.top_k = top_k
        self.router_loss = router_loss
        self.aux_loss_coef = aux_loss_coef
        self.routed_impl = "auto"  # ``routed_lora``'s implementation; tests pin each one

    @property
    def router_stat_experts(self) -> int | None:
        """Experts whose router sums this mixture records (``AdapterHost``'s hooks); None
        without a router loss."""
        return self.num_experts if self.router_loss else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs (N, E), kept weights (N, k) summing to 1, selected experts (N, k))."""
        probs = self.router_probs(x)
        weights, selected = top_k(probs, self.top_k)
        return probs, weights, selected

    def forward(self, inputs: AdapterInput) -> torch.Tensor:
        """What this adapter adds to the base output for its tokens (same contract as LoRA).

        Args:
            inputs: the segment's tokens and what the layer gives (``AdapterInput``).

        Returns:
            (N, out) fp32 delta.
        """
        x, random, token_mask = inputs.x, inputs.random, inputs.token_mask
        # the real tokens in canonical order: routing and the experts' draws never see
        # padding or the packing order (``SegmentRandom.canonical_order``)
        canonical = None if random is None else random.canonical_order(token_mask)
        if canonical is not None:
            random = random.plain()
        elif token_mask is not None:  # padding, no canonical index: the real tokens in order
            canonical = token_mask.nonzero().squeeze(1)  # a host sync, as reading group sizes
        if canonical is None:
            return self._routed(x, None, inputs, random)
        delta = self._routed(x.index_select(0, canonical), canonical, inputs, random)
        return delta.new_zeros(x.shape[0], delta.shape[1]).index_copy(0, canonical, delta)

    def _routed(
        self,
        x: torch.Tensor,
        canonical: torch.Tensor | None,
        inputs: AdapterInput,
        random: SegmentRandom | None,
    ) -> torch.Tensor:
        """The (n, out) delta of the real tokens ``x`` (n, in), taken at ``canonical`` from the
        segment (None: ``x`` is the whole segment): every one of the n*k pairs is real."""
        probs, weights, selected = self.route(x)  # (n, E), (n, k), (n, k)
        pairs = RoutedPairs.group(selected.reshape(-1), weights.reshape(-1), self.top_k)
        dora = None
        if self.needs_base_weight:
            dora = (inputs.base_result, canonical, inputs.base_weight, inputs.base_bias)
        delta = self._routed_lora(x, pairs, random, dora)
        if self._reporting():
            self._report(probs, selected)
        return delta

    def _routed_lora(
        self,
        x: torch.Tensor,
        pairs: RoutedPairs,
        random: SegmentRandom | None,
        dora: tuple | None = None,
    ) -> torch.Tensor:
        """The experts over all n*k pairs without a host sync (``routed_lora``).

        The pairs' dropout is drawn token by token (``slot_dropout``: the adapter's stream over
        the canonical tokens), then each pair goes through its expert's LoRA. DoRA experts
        (``dora``: the segment's base output, the segment index of each of ``x``'s tokens or
        None when ``x`` is the segment, the dense base weight and bias) rescale each pair by its
        expert's magnitude over weight norm, as ``LoraAdapter.forward`` does for one expert.
        """
        first = self.experts[0]
        inp = pairs.gather(x).to(first.lora_A.weight.dtype)  # (P, in)
        inp = slot_dropout(inp, pairs, first.dropout_p, self.training, random)
        out = routed_lora(
            inp,
            pairs.expert,
            [expert.lora_A.weight for expert in self.experts],
            [expert.lora_B.weight for expert in self.experts],
            [expert.scaling for expert in self.experts],
            impl=self.routed_impl,
        )  # (P, out), scaled
        if dora is not None:
            base_result, picked, base_weight, base_bias = dora
            weight = base_weight.to(inp.dtype)
            scale = dora_scales(self.experts, weight).index_select(0, pairs.expert)  # (P, out)

            def undropped_base() -> torch.Tensor:  # W x of each pair's token, without the bias
                rows = pairs.token if picked is None else pairs.gather(picked)
                base = base_result.index_select(0, rows).to(inp.dtype)
                return base if base_bias is None else base - base_bias

            active = first.dropout_p != 0 and self.training
            out = dora_delta(scale, out, inp, weight, active, undropped_base)
        return pairs.combine(out)  # (n, out): fp32, or fp64 experts' fp64

    def _report(self, probs: torch.Tensor, selected: torch.Tensor) -> None:
        """Routed counts of the (real) tokens and, with ``router_loss``, the weighted aux loss."""
        assert self.context is not None and self.adapter_name is not None
        slots = F.one_hot(selected, self.num_experts)  # (n, k, E), built once for both
        collector = self.context.aux_losses
        collector.add_load(self.adapter_name, slots.sum(dim=(0, 1)))
        if not self.router_loss:
            return
        if collector.global_stats:  # data parallel: sums, finished over ranks
            coef = self.aux_loss_coef * self.num_experts
            stats = RouterStats.balance(probs, slots.sum(dim=1), coef)
            collector.add_stats(self.adapter_name, self, stats)
        else:
            loss = self.num_experts * load_balance(probs, slots, None)
            collector.add(self.adapter_name, self.aux_loss_coef * loss)
