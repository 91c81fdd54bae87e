"""How a step's micro-batches split into forward passes under a token budget (``pass_tokens``).

One pass for all adapters of a step is what makes the base's matmuls large on a GPU. On a CPU
they are large enough at about a thousand tokens, and the activations autograd keeps grow with
the pass: four SmolLM2 adapters in one 2450-token pass keep 2.3 GiB until backward, and glibc
holds another 1.5 GiB it freed on the way. Splitting the step into passes of whole adapters,
one backward after each, keeps only one pass's activations at a time and gives every adapter
the same gradients (its segment lies whole in one pass, its dropout comes from its own stream).
"""

from __future__ import annotations

from collections.abc import Sequence

from mlora.data.rows import TokenizedRow

AUTO_CPU_PASS_TOKENS = 1536
"""``pass_tokens: "auto"`` on CPU (see ``resolve_pass_tokens``)."""


def resolve_pass_tokens(value: int | str, device_type: str) -> int:
    """The budget the ``pass_tokens`` key asks for; 0 means one pass per step.

    ``auto`` is ``AUTO_CPU_PASS_TOKENS`` on CPU: about a third less peak memory on the SmolLM2
    benchmark for at most a few percent more time (``benchmarks/bench_pass_tokens.py``, README;
    1024 saved a little more memory and cost more time). On a GPU it is 0: the per-layer recompute
    that ``gradient_checkpoint: auto`` turns on there already bounds activation memory, and a
    large pass keeps the device busy.
    """
    if value == "auto":
        return AUTO_CPU_PASS_TOKENS if device_type == "cpu" else 0
    return int(value)


def pass_size(rows: Sequence[TokenizedRow], form: str) -> int:
    """Tokens ``rows`` take in a pass: their lengths in a stream; padded to the longest row
    otherwise (bins hold at most that much)."""
    if not rows:
        return 0
    if form == "stream":
        return sum(len(row) for row in rows)
    return len(rows) * max(len(row) for row in rows)


def forward_passes(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of entry indices, one group per forward pass.

    Args:
        sizes: each entry's tokens (``pass_size`` of its micro-batch), in step order.
        budget: the most tokens a pass should hold; 0: one pass for all. An entry larger than
            the budget gets a pass of its own (a micro-batch is never split).

    Returns:
        The fewest groups the budget allows, as even as they can be: the smallest cap on a
        group's tokens that still needs no more groups.
    """
    if not sizes:
        return []
    if budget <= 0 or sum(sizes) <= budget:
        return [list(range(len(sizes)))]
    fewest = len(_fill(sizes, budget))
    low, high = 1, budget
    while low < high:
        middle = (low + high) // 2
        if len(_fill(sizes, middle)) <= fewest:
            high = middle
        else:
            low = middle + 1
    return _fill(sizes, low)


def _fill(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Groups filled in order up to ``cap`` tokens each: the fewest consecutive groups under
    that cap (an entry over it alone)."""
    groups: list[list[int]] = [[]]
    held = 0
    for index, size in enumerate(sizes):
        if groups[-1] and held + size > cap:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += size
    return groups
