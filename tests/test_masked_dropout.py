"""dropout_branch: LoRA dropout keeping a 1-byte mask equals the plain dropout -> A -> B path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.batching.randomness import RealRows, SegmentRandom, keep_scale
from mlora.ops import GROUPED_AVAILABLE, segmented_lora
from mlora.ops.masked_dropout import dropout_branch, keep_multipliers

IN, OUT = 32, 48
IMPLS = ["loop", "function", *(["grouped"] if GROUPED_AVAILABLE else [])]


def random_mask(num_tokens: int, ranges: list[tuple[int, int, float]], seed: int) -> torch.Tensor:
    """(T, IN) bool: random drops inside ``ranges``, True elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(num_tokens, IN, dtype=torch.bool)
    for start, end, _ in ranges:
        mask[start:end] = torch.rand(end - start, IN, generator=generator) > 0.3
    return mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_branch_equals_plain_autograd(impl: str, dtype: torch.dtype) -> None:
    """Values and gradients (x, every A and B) equal ``segmented_lora(x * keep)`` under plain
    autograd: bit for bit (the same ops on the same inputs), so within 1e-6 in fp64."""
    if impl == "grouped" and dtype == torch.float64:
        pytest.skip("grouped_mm has no float64")
    torch.manual_seed(0)
    segments = [(1, 9), (9, 9), (11, 20)]  # a gap, an empty segment, a tail
    ranks = [4, 8, 2]
    ranges = [(1, 9, keep_scale(0.3)), (11, 20, keep_scale(0.05))]  # the empty one: no dropout
    num_tokens = 22
    x = torch.randn(num_tokens, IN, dtype=dtype)
    lora_a = [torch.randn(r, IN, dtype=dtype) for r in ranks]
    lora_b = [torch.randn(OUT, r, dtype=dtype) for r in ranks]
    scales = [2.0, 0.5, 1.5]
    mask = random_mask(num_tokens, ranges, seed=1)
    grad = torch.randn(num_tokens, OUT, dtype=dtype)

    def run(masked: bool) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_(True)
        weights = [w.clone().requires_grad_(True) for w in (*lora_a, *lora_b)]
        count = len(segments)

        def branch(dropped: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
            return segmented_lora(dropped, segments, ws[:count], ws[count:], scales, impl)

        if masked:
            out = dropout_branch(xs, mask, ranges, branch, *weights)
        else:
            keep = keep_multipliers(mask, ranges, dtype)
            out = branch(xs * keep, *weights)
        out.backward(grad)
        return [out.detach(), xs.grad, *(w.grad for w in weights)]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float64 else 0)


def test_keep_mask_holds_the_draws_of_keep() -> None:
    """``keep_mask * keep_scale`` is ``keep`` from the same stream state, spread over real rows
    and padding included, so the masks of the fast path are the adapter's usual ones."""
    rows = RealRows(index=torch.tensor([0, 1, 2, 0, 3, 4, 5]), count=6)
    like = torch.empty(7, 40)
    for random_rows in (None, rows):
        for p in (0.05, 0.3):
            first = torch.Generator().manual_seed(5)
            second = torch.Generator().manual_seed(5)
            keep = SegmentRandom(first, random_rows).keep(like, p)
            mask = SegmentRandom(second, random_rows).keep_mask(like, p)
            assert mask.dtype == torch.bool
            torch.testing.assert_close(mask.float() * keep_scale(p), keep, rtol=0, atol=0)
            assert first.get_state().equal(second.get_state())


def layer_with_adapters() -> tuple[MultiLoraLinear, LayoutContext]:
    torch.manual_seed(0)
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(IN, OUT).requires_grad_(False), context).train()
    for name, p in [("a", 0.1), ("b", 0.3), ("c", 0.0)]:
        layer.add_adapter(name, 4, 2.0, dropout=p)
        nn.init.normal_(layer.adapters[name].lora_B.weight)
    for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
        context.generators.seed(name, seed)
    return layer, context


def test_layer_gradients_equal_the_plain_dropout_path() -> None:
    """The layer (dropout on, three adapters and base-only rows) gives exactly the output and
    gradients of the plain path ``x * keep -> A -> B`` with the same stream states."""
    layer, context = layer_with_adapters()
    rows = ["a", "a", None, "b", "c", "c"]
    x = torch.randn(len(rows), 5, IN)
    grad = torch.randn(len(rows), 5, OUT)
    start = context.generators.get_state()

    def plain(flat: torch.Tensor) -> torch.Tensor:
        segments = [s for s in context.layout_for(flat.shape[0]).segments if s.size > 0]
        adapters = [layer.adapters[s.adapter] for s in segments]
        dropped = layer._dropped(flat, segments, adapters)
        return segmented_lora(
            dropped,
            [(s.start, s.end) for s in segments],
            [a.lora_A.weight for a in adapters],
            [a.lora_B.weight for a in adapters],
            [a.scaling for a in adapters],
        )

    def run(use_plain: bool) -> list[torch.Tensor]:
        context.generators.set_state(start)
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        with context.use(BatchLayout.from_row_adapters(rows)):
            if use_plain:
                flat = xs.reshape(-1, IN)
                out = (layer.base_layer(flat) + plain(flat)).view(len(rows), 5, OUT)
            else:
                out = layer(xs)
        out.backward(grad)
        params = [p.grad for n, p in layer.named_parameters() if p.requires_grad]
        return [out.detach(), xs.grad, *params]

    got, want = run(False), run(True)
    assert len(got) == 2 + 6  # output, x and the A and B of three adapters
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_layer_keeps_no_fp32_copy_of_its_input() -> None:
    """What autograd keeps for backward: the input itself and a 1-byte mask, no (N, in) fp32
    multipliers or dropped input (4 bytes a unit each)."""
    layer, context = layer_with_adapters()
    rows = ["a", "b", "b", "c"]
    x = torch.randn(len(rows), 6, IN, requires_grad=True)
    big: list[torch.Tensor] = []

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.numel() == x.numel() and saved.dtype == torch.float32:  # (N, in) fp32
            big.append(saved)
        return saved

    layout = BatchLayout.from_row_adapters(rows)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context.use(layout):
        out = layer(x)
    out.sum().backward()  # outside the hooks: backward's own recomputation is not kept
    assert x.grad is not None
    assert {t.untyped_storage().data_ptr() for t in big} == {x.untyped_storage().data_ptr()}
