"""LoRA for one adapter on one linear layer, with DoRA as a variant (PEFT's math exactly).

LoRA adds ``scaling * B(A(dropout(x)))`` to the frozen layer's output. DoRA additionally
rescales each output row by a trained magnitude over the norm of the adapted weight
``m / ||W + scaling * B A||`` (the norm is detached, as in the DoRA paper section 4.3 and PEFT).
Adapter weights are kept in fp32 whatever the base dtype. Dropout masks are drawn from the
generator the caller passes (each adapter's own stream, ``mlora.batching.randomness``), never from
the global RNG, so one adapter's masks do not depend on which other adapters share the pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlora.adapters.spec import AdapterInput
from mlora.batching.randomness import SegmentRandom
from mlora.ops.routed_lora import RoutedPairs


def init_lora_weights(lora_A: nn.Linear, lora_B: nn.Linear, init: str, r: int) -> None:
    """PEFT's initialisation: B = 0 so the adapter starts as the identity on the base model.

    Args:
        init: "original" (Kaiming uniform A, PEFT's default) or "gaussian" (A ~ N(0, 1/r)).
    """
    if init == "gaussian":
        nn.init.normal_(lora_A.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)


def adapter_dropout(
    x: torch.Tensor, p: float, training: bool, random: SegmentRandom | None
) -> torch.Tensor:
    """Inverted dropout (as ``nn.Dropout``) with masks from the adapter's own stream.

    Args:
        x: (N, in) input; returned unchanged when not ``training`` or ``p`` is 0.
        p: drop probability.
        random: the adapter's stream over these tokens (None: the global RNG).
    """
    if not training or p == 0:
        return x
    return x * (random or SegmentRandom(None)).keep(x, p)


def slot_dropout(
    x: torch.Tensor,
    pairs: RoutedPairs,
    p: float,
    training: bool,
    random: SegmentRandom | None,
) -> torch.Tensor:
    """Dropout of MoE (token, slot) pairs grouped by expert, drawn token by token.

    The masks are drawn for the ``n * slots`` pairs in token order (each token's slots side by
    side, as one row of ``slots * in`` units) and then put in the pairs' expert order, so a
    token's masks do not depend on which experts the other tokens chose, and a data-parallel
    rank draws exactly its tokens' part of the whole micro-batch (``SegmentRandom.plain``).

    Args:
        x: (P, in) the pairs' inputs, in ``pairs``' order (all n * slots of them, or the first
            ones: MixLoRA dropping the unused slots of ``mixlora-dynamic`` draws the same).
        pairs: the pairs (their token-order index ``token * slots + slot``: ``pairs.order``).
        random: the adapter's stream over the n tokens in canonical order (None: global RNG).
    """
    if not training or p == 0:
        return x
    n, slots = pairs.tokens, pairs.slots
    keep = (random or SegmentRandom(None)).keep(x.new_empty(n, slots * x.shape[1]), p)
    return x * keep.view(n * slots, -1).index_select(0, pairs.order)


class DoraMagnitude(nn.Module):
    """DoRA's trained magnitude, one value per output feature (PEFT: lora_magnitude_vector)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features))

    @staticmethod
    def weight_norm(
        weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Row norms of the adapted weight, shape (out,)."""
        return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)

    def reset(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> None:
        """Start at the norm of the adapted weight so the adapter starts as the identity."""
        with torch.no_grad():
            self.weight.copy_(self.weight_norm(weight.float(), lora_weight.float(), scaling))


class LoraVariant:
    """Plain LoRA's hooks; a variant (DoRA) overrides them (PEFT's ``LoraVariant`` pattern).

    A variant is stateless: what it trains (DoRA's magnitude) lives on the adapter, so the
    adapter's parameter names, and the saved tensor names, do not depend on the variant.
    """

    needs_base_weight = False  # whether ``forward`` / ``init`` need the dense base weight

    def init(self, adapter: LoraAdapter, base_weight: torch.Tensor | None) -> None:
        """Create the variant's own parameters on ``adapter`` (plain LoRA has none)."""

    def forward(
        self,
        adapter: LoraAdapter,
        x: torch.Tensor,
        base_result: torch.Tensor,
        base_weight: torch.Tensor | None,
        base_bias: torch.Tensor | None,
        random: SegmentRandom | None,
    ) -> torch.Tensor:
        """(N, out) what ``adapter`` adds to ``base_result`` for the (N, in) input ``x``."""
        dropped = adapter_dropout(x, adapter.dropout_p, adapter.training, random)
        return adapter.lora_B(adapter.lora_A(dropped)) * adapter.scaling

    def merged_weight(self, adapter: LoraAdapter, base_weight: torch.Tensor) -> torch.Tensor:
        """(out, in) the weight that gives base + adapter in one linear (no dropout)."""
        return base_weight + adapter.scaling * adapter.lora_weight()


class DoraVariant(LoraVariant):
    """DoRA: each output row of the adapted weight rescaled to a trained magnitude,
    ``m / ||W + s B A||`` (row norms, detached as in the paper section 4.3 and PEFT)."""

    needs_base_weight = True

    def init(self, adapter: LoraAdapter, base_weight: torch.Tensor | None) -> None:
        if base_weight is None:
            raise ValueError("DoRA needs the base weight to initialise its magnitude")
        adapter.magnitude = DoraMagnitude(adapter.lora_B.out_features)
        adapter.magnitude.reset(base_weight, adapter.lora_weight(), adapter.scaling)

    def scale(self, adapter: LoraAdapter, weight: torch.Tensor) -> torch.Tensor:
        """(out,) ``m / ||W + s B A||`` with the norm detached."""
        assert adapter.magnitude is not None
        lora_weight = adapter.lora_weight().detach()
        norm = DoraMagnitude.weight_norm(weight, lora_weight, adapter.scaling).detach()
        return adapter.magnitude.weight / norm

    def forward(
        self,
        adapter: LoraAdapter,
        x: torch.Tensor,
        base_result: torch.Tensor,
        base_weight: torch.Tensor | None,
        base_bias: torch.Tensor | None,
        random: SegmentRandom | None,
    ) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("DoRA's forward needs the base weight")
        weight = base_weight.to(x.dtype)
        dropped = adapter_dropout(x, adapter.dropout_p, adapter.training, random)
        return dora_delta(
            self.scale(adapter, weight).view(1, -1),
            adapter.lora_B(adapter.lora_A(dropped)) * adapter.scaling,
            dropped,
            weight,
            adapter.dropout_p != 0 and adapter.training,
            lambda: base_result if base_bias is None else base_result - base_bias,
        )

    def merged_weight(self, adapter: LoraAdapter, base_weight: torch.Tensor) -> torch.Tensor:
        weight = base_weight.to(adapter.lora_A.weight.dtype)
        adapted = weight + adapter.scaling * adapter.lora_weight()
        return self.scale(adapter, weight).view(-1, 1) * adapted


LORA = LoraVariant()
DORA = DoraVariant()


class LoraAdapter(nn.Module):
    """One adapter's LoRA matrices, dropout and variant (DoRA: ``DoraVariant``) for one layer.

    Args:
        in_features, out_features: the wrapped layer's shape.
        r: rank.
        scaling: output scale (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout: probability applied to the adapter's input (0 disables).
        init: "original" or "gaussian" initialisation of lora_A.
        use_dora: the DoRA variant (a magnitude vector initialised from ``base_weight``).
        base_weight: the dense (out, in) base weight; required with ``use_dora``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "original",
        use_dora: bool = False,
        base_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout_p = dropout
        self.scaling = scaling
        init_lora_weights(self.lora_A, self.lora_B, init, r)
        self.magnitude: DoraMagnitude | None = None  # DoRA's, set by its variant
        self.variant: LoraVariant = DORA if use_dora else LORA
        self.variant.init(self, base_weight)

    @property
    def needs_base_weight(self) -> bool:
        """Whether ``forward`` needs the dense base weight (DoRA)."""
        return self.variant.needs_base_weight

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """(out, in) fp32 weight equal to the base layer plus this adapter (eval mode)."""
        return self.variant.merged_weight(self, base_weight)

    def lora_weight(self) -> torch.Tensor:
        """B @ A, shape (out, in), without the scale."""
        return self.lora_B.weight @ self.lora_A.weight

    def forward(self, inputs: AdapterInput) -> torch.Tensor:
        """What this adapter adds to the base output for its tokens.

        Args:
            inputs: the segment's tokens and what the layer gives (``AdapterInput``).

        Returns:
            (N, out) fp32 delta.
        """
        x, base_result = inputs.x, inputs.base_result
        base_weight, base_bias, random = inputs.base_weight, inputs.base_bias, inputs.random
        x = x.to(self.lora_A.weight.dtype)
        return self.variant.forward(self, x, base_result, base_weight, base_bias, random)


def dora_delta(
    scale: torch.Tensor,
    lora: torch.Tensor,
    dropped: torch.Tensor,
    weight: torch.Tensor,
    dropout_active: bool,
    undropped_base: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """What DoRA adds to the frozen output: ``(g - 1) * W d(x) + g * s B A d(x)``, the one
    place of the rule (Liu et al. 2024 with PEFT's dropout handling).

    With dropout active the base term must see the dropped input, so it is recomputed as
    ``W d(x)``; without, ``d(x) = x`` and PEFT reuses the frozen output without its bias.

    Args:
        scale: (N, out) or (1, out) ``g = m / ||W + s B A||`` (norm detached).
        lora: (N, out) ``s B A d(x)``, already scaled.
        dropped: (N, in) ``d(x)``, the adapter's dropped input.
        weight: (out, in) ``W``, in ``dropped``'s dtype.
        dropout_active: whether dropout was applied (training with p > 0).
        undropped_base: returns (N, out) ``W x`` (the frozen output without bias); called
            only without dropout.
    """
    base = F.linear(dropped, weight) if dropout_active else undropped_base()
    return (scale - 1) * base + scale * lora


def dora_scales(adapters: Sequence[LoraAdapter], weight: torch.Tensor) -> torch.Tensor:
    """(len(adapters), out) each DoRA adapter's magnitude over the row norms of its adapted
    weight ``W + s B A`` (``DoraVariant.scale``): the factor a routed (token, expert) pair
    applies without running the adapters one by one."""
    return torch.stack([DORA.scale(adapter, weight) for adapter in adapters])
