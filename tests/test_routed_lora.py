"""Routed LoRA (mixture-of-LoRA dispatch without host syncs) against an independent reference.

The reference is written per row: ``s_e * B_e @ (A_e @ x_p)`` for each row's expert, in a
Python loop over rows, nothing batched. Every implementation must equal it in the output and in
the gradients of x and every A and B: unequal ranks, empty experts, a stride-0 incoming gradient
(``delta.sum().backward()``), unsorted rows for ``masked``.
"""

from __future__ import annotations

import pytest
import torch

from mlora.ops.routed_lora import routed_lora


def per_row_reference(x, experts, lora_a, lora_b, scales) -> torch.Tensor:
    rows = []
    for p in range(x.shape[0]):
        e = int(experts[p])
        rows.append(scales[e] * (lora_b[e] @ (lora_a[e] @ x[p])))
    return torch.stack(rows) if rows else x.new_zeros(0, lora_b[0].shape[0])


def problem(num_rows: int, counts: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ranks = [4, 8, 2, 6][: len(counts)]
    x = torch.randn(num_rows, 16, generator=gen, requires_grad=True)
    lora_a = [torch.randn(r, 16, generator=gen).requires_grad_() for r in ranks]
    lora_b = [torch.randn(12, r, generator=gen).requires_grad_() for r in ranks]
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    scales = [0.5, 2.0, 1.0 / 3, 1.5][: len(counts)]
    return x, experts, lora_a, lora_b, scales


def grads(out: torch.Tensor, tensors, stride0: bool) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    if stride0:
        out.sum().backward()  # an expanded (stride-0) gradient
    else:
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        (out * probe).sum().backward()
    return [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]


@pytest.mark.parametrize("impl", ["loop", "grouped", "masked", "auto"])
@pytest.mark.parametrize("counts", [[5], [3, 0, 4, 2], [0, 7, 0, 1], [0, 0, 0, 0]])
@pytest.mark.parametrize("stride0", [False, True])
def test_every_impl_equals_the_per_row_reference(impl: str, counts: list[int], stride0: bool):
    x, experts, lora_a, lora_b, scales = problem(sum(counts), counts)
    tensors = [x, *lora_a, *lora_b]
    want = per_row_reference(x, experts, lora_a, lora_b, scales)
    got = routed_lora(x, experts, lora_a, lora_b, scales, impl=impl)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if sum(counts) == 0:  # no rows: nothing to differentiate
        return
    expected = grads(want, tensors, stride0)
    for g, e in zip(grads(got, tensors, stride0), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_masked_needs_no_sorting():
    x, experts, lora_a, lora_b, scales = problem(9, [3, 2, 4])
    shuffled = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    got = routed_lora(x[shuffled], experts[shuffled], lora_a, lora_b, scales, impl="masked")
    want = per_row_reference(x[shuffled], experts[shuffled], lora_a, lora_b, scales)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_refused():
    x, experts, lora_a, lora_b, scales = problem(2, [2])
    with pytest.raises(ValueError, match="unknown routed LoRA impl"):
        routed_lora(x, experts, lora_a, lora_b, scales, impl="fast")


def test_group_by_expert_sorts_pairs_stably_and_names_their_tokens() -> None:
    """Pairs ``token * k + slot``, k = 2: grouped by expert, token order kept within one."""
    from mlora.ops.routed_lora import group_by_expert

    order, token, expert = group_by_expert(torch.tensor([2, 0, 1, 0, 2, 3]), 2)
    assert order.tolist() == [1, 3, 2, 0, 4, 5]
    assert token.tolist() == [0, 1, 1, 0, 2, 2]
    assert expert.tolist() == [0, 0, 1, 2, 2, 3]


def test_routed_pairs_combine_each_tokens_slots_with_their_weights() -> None:
    """Gather, a per-pair function, combine: each token's sum over its k slots of the slot's
    weight times the function of (token, expert), written as a per-token loop; ``first``
    keeps the pairs of the experts before a cut (a pseudo-expert's pairs, sorted last)."""
    from mlora.ops.routed_lora import RoutedPairs

    torch.manual_seed(0)
    n, k, experts = 7, 3, 4
    x = torch.randn(n, 5, dtype=torch.float64)
    slot_expert = torch.randint(0, experts + 1, (n * k,))  # expert 4: the pseudo-expert
    slot_weight = torch.rand(n * k, dtype=torch.float64)
    shift = torch.randn(experts + 1, 5, dtype=torch.float64)  # the "expert": x + shift[e]
    pairs = RoutedPairs.group(slot_expert, slot_weight, k)
    assert pairs.expert.tolist() == sorted(slot_expert.tolist())
    real = int((slot_expert < experts).sum())
    for kept, cut in ((pairs, experts + 1), (pairs.first(real), experts)):
        got = kept.combine(kept.gather(x) + shift.index_select(0, kept.expert))
        expected = torch.zeros(n, 5, dtype=torch.float64)
        for t in range(n):
            for s in range(k):
                e = int(slot_expert[t * k + s])
                if e < cut:
                    expected[t] += slot_weight[t * k + s] * (x[t] + shift[e])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
