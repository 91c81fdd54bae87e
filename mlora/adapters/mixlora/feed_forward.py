"""MixLoRA: the frozen FFN of each decoder layer shared by E LoRA experts, picked per token.

For the tokens of a MixLoRA adapter's segment (flattened to N tokens), with a gated MLP
``down(act(gate(x)) * up(x))``:

    G, U = gate(x), up(x)                           # frozen, once for the N tokens
    route x -> for each expert e its tokens idx_e and weights w_e (mlora.adapters.routing)
    h_e = act(G[idx_e] + dG_e(x[idx_e])) * (U[idx_e] + dU_e(x[idx_e]))
    y[idx_e] += w_e * (down(h_e) + dD_e(h_e))       # index_add: each expert sees only its tokens

where ``dP_e`` is expert e's LoRA (or DoRA) on projection P, absent when P is not a target.
An fc1/fc2 MLP (Phi) is the same with ``fc2(act(fc1(x)))``. Tokens of other adapters, and
tokens no segment covers, run the model's own MLP module (with any plain LoRA its linears carry)
under a layout restricted to them, so MixLoRA segments and ordinary segments share one batch.
Router jitter and dropout come from each adapter's own random stream
(``mlora.batching.randomness``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from mlora.adapters import LoraAdapter, MultiLoraLinear, dense_weight
from mlora.adapters.lora import adapter_dropout, dora_delta, dora_scales, slot_dropout
from mlora.adapters.routing import RouterSpec, route
from mlora.adapters.spec import AdapterHost, LoraSpec
from mlora.batching.layout import AdapterSegment, BatchLayout, LayoutContext
from mlora.batching.randomness import SegmentRandom
from mlora.ops.routed_lora import RoutedPairs, routed_lora
from mlora.ops.segments import join_segments, split_segments

# The MLP shapes we know: (projection names in call order, kind).
GATED = ("gate_proj", "up_proj", "down_proj")
FC = ("fc1", "fc2")
_ACT_ATTRS = ("act_fn", "activation_fn", "act")


@dataclass(frozen=True)
class MlpShape:
    """Which known MLP form a module has: its projections and its activation."""

    projections: tuple[str, ...]
    activation: nn.Module


def mlp_shape(mlp: nn.Module) -> MlpShape | None:
    """The shape of ``mlp`` if it is a gated (gate/up/down) or fc1/fc2 MLP, else None."""
    children = dict(mlp.named_children())
    for projections in (GATED, FC):
        linears = [children.get(name) for name in projections]
        if all(isinstance(m, nn.Linear | MultiLoraLinear) for m in linears):
            activation = next((getattr(mlp, a) for a in _ACT_ATTRS if hasattr(mlp, a)), None)
            if isinstance(activation, nn.Module) and not list(mlp.parameters(recurse=False)):
                return MlpShape(projections, activation)
    return None


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if isinstance(layer, MultiLoraLinear) else layer


class MixLoraExperts(nn.Module):
    """One adapter's router and LoRA experts on one FFN.

    Args:
        hidden: the FFN input width.
        shapes: (in, out) features of each adapted projection, by name.
        base_weights: the dense base weight of each adapted projection (DoRA init), or None.
        expert: each expert's LoRA shape (r, scaling, dropout, init, DoRA).
        router: the adapter's routing settings.
        activation: the experts' activation.
    """

    def __init__(
        self,
        hidden: int,
        shapes: dict[str, tuple[int, int]],
        base_weights: dict[str, torch.Tensor] | None,
        expert: LoraSpec,
        router: RouterSpec,
        activation: nn.Module,
    ) -> None:
        super().__init__()
        self.router_spec: RouterSpec = router
        self.router = nn.Linear(hidden, router.num_experts, bias=False)
        nn.init.normal_(self.router.weight, mean=0.0, std=router.init_range)
        # Keyed "<projection>_experts": a child named like the projection itself would be
        # taken for a target linear by MultiLoraModel's module walk.
        self.experts = nn.ModuleDict(
            {
                f"{name}_experts": nn.ModuleList(
                    LoraAdapter(
                        fan_in,
                        fan_out,
                        expert.r,
                        expert.scaling,
                        expert.dropout,
                        expert.init,
                        expert.use_dora,
                        None if base_weights is None else base_weights[name],
                    )
                    for _ in range(router.num_experts)
                )
                for name, (fan_in, fan_out) in shapes.items()
            }
        )
        self.activation = activation
        self.use_dora = expert.use_dora
        self.ffn_dropout = router.ffn_dropout
        self.routed_impl = "auto"  # ``routed_lora``'s implementation; tests pin each one
        # ``mixlora-dynamic`` gives every token E slots, the unused ones (top-p keeps k of E)
        # with weight 0: whether they are dropped after one host read of how many are used
        # (True), or run as zero-weight pairs (False: no read, E/k times the expert work).
        # None: dropped on the CPU, where a read costs nothing; run on accelerators, where it
        # would stall the queue. The draws are the same either way.
        self.drop_unused_slots: bool | None = None

    def expert(self, projection: str, index: int) -> LoraAdapter | None:
        """Expert ``index``'s LoRA on ``projection``, or None if the projection is not adapted."""
        key = f"{projection}_experts"
        return self.experts[key][index] if key in self.experts else None

    @property
    def router_stat_experts(self) -> int | None:
        """Experts whose router sums this router records (``AdapterHost``'s hooks); None
        without a router loss."""
        return self.router_spec.num_experts if self.router_spec.router_loss else None

    @property
    def slots_per_token(self) -> int:
        """(token, expert) slots each token gets in ``dispatch_pairs``: top-k's k, switch's 1,
        and E for ``mixlora-dynamic`` (top-p keeps a varying number)."""
        spec = self.router_spec
        if spec.strategy == "mixlora":
            return spec.top_k
        return 1 if spec.strategy == "mixlora-switch" else spec.num_experts

    def drops_unused_slots(self, device: torch.device) -> bool:
        """Whether ``dispatch_pairs`` drops the zero-weight slots of ``mixlora-dynamic`` here
        (one host read; see ``drop_unused_slots``)."""
        if self.router_spec.strategy != "mixlora-dynamic":
            return False
        drop = self.drop_unused_slots
        return device.type == "cpu" if drop is None else drop

    def router_logits(self, x: torch.Tensor, random: SegmentRandom | None = None) -> torch.Tensor:
        """(N, E) fp32 logits; the router input gets multiplicative jitter in training, drawn
        from ``random`` (the adapter's stream)."""
        x = x.float()
        jitter = self.router_spec.jitter_noise
        if self.training and jitter > 0:
            x = x * (random or SegmentRandom(None)).uniform(x, 1.0 - jitter, 1.0 + jitter)
        return self.router(x)


class MixLoraFeedForward(nn.Module, AdapterHost):
    """Stands in for a decoder layer's MLP; MixLoRA segments take the expert path.

    The model's MLP module is kept (unregistered, so module paths do not change) for the rows
    of other adapters; its projections are registered here under their own names, so
    ``model.layers.0.mlp.gate_proj`` is still the same module and plain LoRA on FFN linears,
    PEFT key names and ``.to()`` keep working.

    Args:
        mlp: the model's MLP module (a known shape, see ``mlp_shape``).
        context: the model's layout context.
        shape: ``mlp_shape(mlp)`` when the caller has it already.
    """

    def __init__(
        self, mlp: nn.Module, context: LayoutContext, shape: MlpShape | None = None
    ) -> None:
        super().__init__()
        shape = shape or mlp_shape(mlp)
        assert shape is not None
        object.__setattr__(self, "mlp", mlp)  # not a submodule: paths stay as they were
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.projections = shape.projections
        self.default_activation = shape.activation
        self.moes = nn.ModuleDict()
        self.context = context

    host_rank = 1  # after every linear layer's adapters (see AdapterHost)

    def hosted(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        if name in self.moes:
            yield f"moes.{name}", self.moes[name]

    def remove_hosted(self, name: str) -> None:
        if name in self.moes:
            del self.moes[name]

    def __setattr__(self, name: str, value: object) -> None:
        # A projection replaced later (MultiLoraModel wrapping gate_proj for a plain LoRA) must
        # be replaced in the model's MLP too, which runs the other segments' rows.
        super().__setattr__(name, value)
        mlp = self.__dict__.get("mlp")
        if mlp is not None and isinstance(value, nn.Module) and name in mlp._modules:
            setattr(mlp, name, value)

    def train(self, mode: bool = True) -> MixLoraFeedForward:
        super().train(mode)
        self.mlp.train(mode)
        return self

    def linear(self, name: str) -> nn.Module:
        """The frozen base linear layer of projection ``name`` (unwrapped from MultiLoraLinear)."""
        return _base(getattr(self, name))

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        n = flat.shape[0]
        layout = self.context.layout_for(n)
        if layout is None or not self.moes:
            return self.mlp(x)
        moe_segments = [s for s in layout.segments if s.adapter in self.moes and s.size > 0]
        if not moe_segments:
            return self.mlp(x)
        # The pass as alternating ranges: MixLoRA segments, and the tokens between them.
        ranges: list[tuple[int, int]] = []
        owners: list[AdapterSegment | None] = []
        cursor = 0
        for seg in moe_segments:
            if seg.start > cursor:
                ranges.append((cursor, seg.start))
                owners.append(None)
            ranges.append((seg.start, seg.end))
            owners.append(seg)
            cursor = seg.end
        if cursor < n:
            ranges.append((cursor, n))
            owners.append(None)
        pieces = split_segments(flat, ranges)
        outputs: list[torch.Tensor | None] = [
            None if seg is None else self._moe_segment(seg, piece, n)
            for seg, piece in zip(owners, pieces, strict=True)
        ]
        others = [i for i, seg in enumerate(owners) if seg is None]
        if others:
            rest = self._other_tokens(
                layout, [ranges[i] for i in others], [pieces[i] for i in others]
            )
            for i, out in zip(others, rest, strict=True):
                outputs[i] = out
        joined = join_segments([o for o in outputs if o is not None], ranges, n)
        return joined.view(*x.shape[:-1], -1)

    def _other_tokens(
        self,
        layout: BatchLayout,
        ranges: list[tuple[int, int]],
        pieces: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """The model's MLP on the tokens outside MixLoRA segments, under a layout of just them.

        Args:
            ranges: the token ranges outside MixLoRA segments; pieces: their (n_i, H) inputs.

        Returns:
            One (n_i, H) output per range.
        """
        sizes = [end - start for start, end in ranges]
        segments: list[AdapterSegment] = []  # other adapters' segments, in the joined tokens
        offset = 0
        for (start, end), size in zip(ranges, sizes, strict=True):
            for seg in layout.segments:
                if start <= seg.start and seg.end <= end and seg.adapter not in self.moes:
                    shift = offset - start
                    segments.append(replace(seg, start=seg.start + shift, end=seg.end + shift))
            offset += size
        joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (M, H), M < N
        ctx = self.context
        mask, rows, real_index, tasks = (
            ctx.token_mask,
            ctx.token_rows,
            ctx.token_real_index,
            ctx.token_tasks,
        )

        def select(per_token: torch.Tensor | None) -> torch.Tensor | None:
            if per_token is None:
                return None
            return torch.cat([per_token[start:end] for start, end in ranges])

        sub_layout = BatchLayout(tuple(segments), offset)
        with ctx.use(sub_layout, select(mask), select(rows), select(real_index), select(tasks)):
            out = self.mlp(joined)  # (M, H)
        local, cursor = [], 0
        for size in sizes:
            local.append((cursor, cursor + size))
            cursor += size
        return split_segments(out, local)

    def _moe_segment(self, seg: AdapterSegment, x: torch.Tensor, n: int) -> torch.Tensor:
        """The MixLoRA FFN output (T, H) of one segment's tokens ``x`` (T, H) in a pass of n.

        The segment's real tokens are taken in canonical order (rows end to end, as given to
        collate), so routing, the switch capacity and every draw (router jitter, expert and FFN
        dropout) see the same token sequence however the rows were padded or packed; padding
        gets a zero output. A segment with padding but no canonical index
        (``MultiLoraModel.forward``, evaluation) takes its real tokens in segment order (one
        host sync for their count).
        """
        moe = self.moes[seg.adapter]
        random = self.context.segment_random(seg, n, x.device)
        real = self.context.segment_token_mask(seg, n)
        order = random.canonical_order(real)
        if order is None and real is not None:
            order = real.nonzero().squeeze(1)
        rows = self.context.segment_token_rows(seg, n, x.device)
        if order is not None:  # only real tokens from here on
            x = x.index_select(0, order)
            rows = None if rows is None else rows.index_select(0, order)
            random = random.plain()
        logits = moe.router_logits(x, random)
        collector = self.context.aux_losses
        routing = route(logits, moe.router_spec, None, rows, self.training, collector.global_stats)
        if routing.aux_loss is not None:
            collector.add(seg.adapter, routing.aux_loss)
        if routing.stats is not None:
            collector.add_stats(seg.adapter, moe, routing.stats)
        if routing.counts is not None:
            collector.add_load(seg.adapter, routing.counts)
        out = self.dispatch_pairs(moe, x, routing.weights, routing.routed, random)
        out = adapter_dropout(out, moe.ffn_dropout, moe.training, random).to(x.dtype)
        if order is None:
            return out
        return out.new_zeros(seg.size, out.shape[1]).index_copy(0, order, out)

    def dispatch_pairs(
        self,
        moe: MixLoraExperts,
        x: torch.Tensor,
        weights: torch.Tensor,
        routed: torch.Tensor,
        random: SegmentRandom | None = None,
    ) -> torch.Tensor:
        """Sum of each token's routed experts' FFN outputs, weighted, as (token, slot) pairs.

        Every token is real (canonical order) and gets k slots (``slots_per_token``), so there
        are n*k pairs, a number the host knows: no sync. A slot that is not routed goes to a
        pseudo-expert E with zero LoRA weights: with weight 1 for a switch token past capacity
        (the frozen FFN), with weight 0 for the unused slots of ``mixlora-dynamic`` (dropped
        after one host read where ``drops_unused_slots``). Pairs are sorted by expert and each
        projection's expert LoRAs run as one ``routed_lora`` (``moe.routed_impl``: loop,
        grouped or masked); DoRA experts rescale each pair's output by its expert's magnitude
        over weight norm, which is computed from the weights alone.

        Args:
            x: (N, H) real tokens; weights: (N, E); routed: (N, E) bool, at most k per token.
            random: the adapter's stream over the N tokens in canonical order (expert dropout,
                drawn token by token for all n*k slots: ``slot_dropout``).

        Returns:
            (N, H_out) fp32.
        """
        num_experts = routed.shape[1]
        k = moe.slots_per_token
        strategy = moe.router_spec.strategy
        pseudo = strategy in ("mixlora-switch", "mixlora-dynamic")
        slots = torch.argsort(~routed, dim=-1, stable=True)[:, :k]  # (N, k) routed ones first
        hit = routed.gather(1, slots)  # (N, k) False: an unrouted slot
        slot_expert = torch.where(hit, slots, num_experts).reshape(-1)  # (N*k,)
        unrouted = 1.0 if strategy == "mixlora-switch" else 0.0
        slot_weight = torch.where(hit, weights.gather(1, slots), unrouted).reshape(-1)
        pairs = RoutedPairs.group(slot_expert, slot_weight, k)
        if moe.drops_unused_slots(x.device):  # the pseudo-expert's pairs sort last
            pairs = pairs.first(int(routed.sum()))  # the host read
        xs = pairs.gather(x)  # (P, H)
        dense = self._dense_weights(moe)

        def project(name: str, inp: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
            experts = [moe.expert(name, e) for e in range(num_experts)]
            if experts[0] is None:
                return base
            a = [e.lora_A.weight for e in experts]
            b = [e.lora_B.weight for e in experts]
            scales = [e.scaling for e in experts]
            if pseudo:  # the zero-LoRA pseudo-expert of unrouted slots
                a, b, scales = (
                    [*a, a[0].new_zeros(a[0].shape)],
                    [*b, b[0].new_zeros(b[0].shape)],
                    [*scales, 0.0],
                )
            p, training = experts[0].dropout_p, experts[0].training
            dropped = slot_dropout(inp.to(a[0].dtype), pairs, p, training, random)
            lora = routed_lora(dropped, pairs.expert, a, b, scales, moe.routed_impl)  # (P, out)
            if experts[0].magnitude is None:
                return (base + lora).to(base.dtype)
            weight = dense[name].to(dropped.dtype)
            scale = dora_scales(experts, weight)  # (E, out); the pseudo-expert's row is 1
            if pseudo:
                scale = torch.cat([scale, torch.ones_like(scale[:1])])
            scale = scale.index_select(0, pairs.expert)  # (P, out)
            bias = self.linear(name).bias
            delta = dora_delta(
                scale,
                lora,
                dropped,
                weight,
                experts[0].dropout_p != 0 and experts[0].training,
                lambda: base if bias is None else base - bias,  # W x, without the bias
            )
            return (base + delta).to(base.dtype)

        first = self.projections[0]
        shared = pairs.gather(self.linear(first)(x))  # (P, I): once for all experts
        if self.projections == GATED:
            up = pairs.gather(self.linear("up_proj")(x))
            hidden = moe.activation(project(first, xs, shared)) * project("up_proj", xs, up)
        else:
            hidden = moe.activation(project(first, xs, shared))
        down = self.projections[-1]
        out = project(down, hidden, self.linear(down)(hidden)).float()  # (P, H_out)
        return pairs.combine(out)

    def _dense_weights(self, moe: MixLoraExperts) -> dict[str, torch.Tensor]:
        """The fp32 dense base weight of each adapted projection for DoRA experts (else none):
        dequantized and cast once per call, not once per expert."""
        if not moe.use_dora:
            return {}
        adapted = [name for name in self.projections if moe.expert(name, 0) is not None]
        return {name: dense_weight(self.linear(name)).float() for name in adapted}


# --- attaching ---------------------------------------------------------------------------------


def mixlora_layers(model: nn.Module) -> Iterator[tuple[str, MixLoraFeedForward]]:
    """(path, wrapper) of every MixLoRA FFN wrapper of ``model``, in model order."""
    for path, module in model.named_modules():
        if isinstance(module, MixLoraFeedForward):
            yield path, module
