"""The router of every MoE kind: which experts each token goes to, with what weight, and the
router losses. MoLA and MeteoRA use its ``top_k`` / ``top_k_weights`` and Mixtral's
``load_balance``; MixLoRA's three strategies (``route``) are below.

All three strategies start from the router's softmax ``p = softmax(logits)`` over E experts:

``mixlora``
    the ``top_k`` largest probabilities, renormalised to sum to 1 (Mixtral).
``mixlora-dynamic``
    ``p = softmax(logits / temperature)`` (temperature 0: none); the fewest experts, largest
    first, whose probabilities sum past ``top_p``; their probabilities as weights, not
    renormalised (upstream MoE-PEFT).
``mixlora-switch``
    the argmax expert with its probability as weight (Switch Transformers). In training each
    expert takes at most ``expert_capacity`` tokens per row, in position order; the tokens past
    it are routed nowhere and the FFN wrapper gives them the frozen FFN's output.

Load balancing (every strategy): ``coef * E * sum_e f_e * P_e``, with ``f_e`` the fraction of
real tokens sent to expert e (before capacity) and ``P_e`` the mean router probability of e over
real tokens; padding is excluded. Switch adds the z-loss ``z_coef * mean(logsumexp(logits)^2)``.
Losses and counts are computed in training only (eval and generation discard them). Under data
parallel the router losses are means over the whole micro-batch: ``route`` then returns the
router sums of this rank's tokens (``Routing.stats``, see ``mlora.batching.aux_losses.RouterStats``)
for the trainer to finish over all ranks, instead of a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlora.batching.aux_losses import RouterStats


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest probabilities of each token, renormalised to sum 1, and their experts.

    Args:
        probs: (N, E) probabilities.

    Returns:
        (N, k) weights and (N, k) long expert indices (largest first).
    """
    values, index = probs.topk(k, dim=-1)  # (N, k)
    return values / values.sum(-1, keepdim=True), index


def load_balance(
    probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_e f_e * P_e`` over the real tokens: Mixtral's load-balancing loss before its
    ``E * coef`` factor (callers keep their own multiplication order, so numbers do not move).

    ``f_e`` is the fraction of choices that picked expert ``e`` and ``P_e`` the mean router
    probability of ``e`` (transformers' ``load_balancing_loss_func`` for one layer).

    Args:
        probs: (N, E) router probabilities.
        chosen: (N, E) multi-hot chosen experts, or (N, k, E) one-hot per top-k slot (MoLA:
            transformers' summation order; a multi-hot sum rounds differently).
        mask: (N,) bool, True for real tokens; None counts every token.
    """
    chosen = chosen.to(probs.dtype)
    if mask is None:
        return (chosen.mean(dim=0) * probs.mean(dim=0)).sum()
    weight = mask.to(probs.dtype)  # (N,)
    count = weight.sum().clamp_min(1.0)
    fraction = (chosen * weight.view(-1, *[1] * (chosen.dim() - 1))).sum(dim=0) / count
    return (fraction * ((probs * weight[:, None]).sum(dim=0) / count)).sum()


def top_k_weights(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest probabilities of each token renormalised to sum 1 (Mixtral's top-k;
    MeteoRA's ``softmax(top-k logits / T)`` is this over ``softmax(logits / T)``).

    Args:
        probs: (N, E) probabilities.
        k: experts kept per token.

    Returns:
        (N, E) weights (0 where not kept) and (N, E) bool, the kept experts.
    """
    values, index = top_k(probs, k)  # (N, k)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, True)
    return torch.zeros_like(probs).scatter(1, index, values), routed


def load_balancing_loss(
    probs: torch.Tensor, selected: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mixtral's auxiliary loss ``E * sum_e f_e * P_e`` of top-k ``selected`` (N, k) experts,
    without any coefficient (see ``load_balance``)."""
    return num_experts * load_balance(probs, F.one_hot(selected, num_experts), mask)


@dataclass(frozen=True)
class RouterSpec:
    """How one MixLoRA adapter routes tokens to its experts and what its router losses weigh.

    Attributes:
        strategy: "mixlora" (softmax top-k, renormalised), "mixlora-dynamic" (top-p) or
            "mixlora-switch" (top-1 with a per-row capacity in training).
        num_experts: experts per FFN.
        top_k: experts per token (mixlora).
        top_p, temperature: mixlora-dynamic's cumulative threshold and softmax temperature.
        init_range: std of the router weight's normal initialisation.
        aux_loss_coef: weight of the load-balancing loss.
        z_loss_coef: weight of the router z-loss (switch).
        router_loss: whether the router losses join the adapter's loss.
        jitter_noise: multiplicative uniform noise on the router input in training.
        expert_capacity: tokens per expert per row in training (switch).
        ffn_dropout: dropout on the MoE FFN output in training (switch).
    """

    strategy: str = "mixlora"
    num_experts: int = 8
    top_k: int = 2
    top_p: float = 0.8
    temperature: float = 0.0
    init_range: float = 0.02
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    router_loss: bool = True
    jitter_noise: float = 0.0
    expert_capacity: int = 32
    ffn_dropout: float = 0.0


@dataclass
class Routing:
    """The routing of N tokens to E experts.

    Attributes:
        weights: (N, E) fp32 weight of expert e's output for token n; 0 where not routed.
        routed: (N, E) bool, token n is computed by expert e.
        aux_loss: scalar, the coefficient-weighted router losses over real tokens; None out of
            training or without ``router_loss``.
        counts: (E,) real tokens routed to each expert; None out of training.
        stats: the router sums behind ``aux_loss`` when asked for them instead (data parallel).
    """

    weights: torch.Tensor
    routed: torch.Tensor
    aux_loss: torch.Tensor | None
    counts: torch.Tensor | None
    stats: RouterStats | None = None


def _top_p(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    ordered, order = probs.sort(dim=-1, descending=True)  # (N, E)
    keep = (ordered.cumsum(-1) - ordered) < top_p  # the sum before this expert is short of top_p
    routed = torch.zeros_like(keep).scatter(1, order, keep)
    return probs * routed, routed


def _capacity(
    chosen: torch.Tensor, rows: torch.Tensor | None, capacity: int, real: torch.Tensor
) -> torch.Tensor:
    """(N, E) bool: ``chosen`` minus the tokens past each expert's capacity within their row.

    Rows may differ in length (packed batches): a token's place in its expert's queue is the
    running count of the expert's real tokens since its row began.
    """
    counted = (chosen & real[:, None]).long()  # (N, E)
    running = counted.cumsum(0)  # (N, E) inclusive count since the segment began
    if rows is not None and rows.numel() > 1:
        index = torch.arange(rows.numel(), device=rows.device)
        starts = torch.ones_like(rows, dtype=torch.bool)
        starts[1:] = rows[1:] != rows[:-1]
        row_start = torch.where(starts, index, 0).cummax(0).values  # (N,) first token of row
        running = running - (running - counted).index_select(0, row_start)
    return chosen & (running <= capacity)


def route(
    logits: torch.Tensor,
    spec: RouterSpec,
    real: torch.Tensor | None,
    rows: torch.Tensor | None,
    training: bool,
    global_stats: bool = False,
) -> Routing:
    """Route N tokens given their router logits.

    Args:
        logits: (N, E) fp32 router logits.
        spec: the adapter's router settings.
        real: (N,) bool, True at real (non-padding) tokens; None: all are real.
        rows: (N,) row index of each token (the switch capacity is per row); None: one row.
        training: apply the switch capacity and compute the counts and router losses.
        global_stats: return the router sums (``Routing.stats``), not the losses; every token
            must be real (``real`` None, the canonical order).

    Returns:
        The routing, with the router losses when training with ``router_loss``.
    """
    padded = real is not None
    real = torch.ones_like(logits[:, 0], dtype=torch.bool) if real is None else real
    if spec.strategy == "mixlora-dynamic":
        scaled = logits / spec.temperature if spec.temperature > 0 else logits
        probs = F.softmax(scaled, dim=-1)
        weights, routed = _top_p(probs, spec.top_p)
        chosen = routed
    elif spec.strategy == "mixlora-switch":
        probs = F.softmax(logits, dim=-1)
        chosen = F.one_hot(probs.argmax(-1), probs.shape[-1]).bool()  # (N, E)
        routed = _capacity(chosen, rows, spec.expert_capacity, real) if training else chosen
        weights = probs * routed
    else:
        probs = F.softmax(logits, dim=-1)
        weights, routed = top_k_weights(probs, spec.top_k)
        chosen = routed
    if padded:  # padding goes to no expert (the FFN wrapper gives it the frozen FFN)
        routed = routed & real[:, None]
        weights = weights * real[:, None]
    if not training:
        return Routing(weights, routed, None, None)
    mask = real.to(probs.dtype)  # (N,)
    counts = (routed.to(probs.dtype) * mask[:, None]).sum(0)
    if not spec.router_loss:
        return Routing(weights, routed, None, counts)
    coef = spec.aux_loss_coef * probs.shape[-1]
    z_coef = spec.z_loss_coef if spec.strategy == "mixlora-switch" else 0.0
    if global_stats:
        assert not padded, "router sums are taken over canonical (real) tokens"
        z = torch.logsumexp(logits, dim=-1).pow(2) if z_coef > 0 else None
        stats = RouterStats.balance(probs, chosen, coef, z, z_coef)
        return Routing(weights, routed, None, counts, stats)
    aux = coef * load_balance(probs, chosen, real)
    if z_coef > 0:
        z = torch.logsumexp(logits, dim=-1).pow(2)  # (N,)
        aux = aux + z_coef * (z * mask).sum() / mask.sum().clamp_min(1)
    return Routing(weights, routed, aux, counts)
