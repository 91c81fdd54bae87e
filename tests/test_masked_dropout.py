"""LoRA dropout keeping a 1-byte mask (``dropout_segmented_lora``) equals the plain path
``dropout -> A -> B``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.batching.randomness import RealRows, SegmentRandom, keep_scale
from mlora.ops import GROUPED_AVAILABLE, segmented_lora
from mlora.ops.masked_dropout import dropped_input, keep_multipliers, scale_by_keep_
from mlora.ops.segmented_lora import dropout_segmented_lora

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
def test_masked_op_equals_plain_autograd(impl: str, dtype: torch.dtype) -> None:
    """Values and gradients (x, every A and B) equal ``segmented_lora(x * keep, impl)`` under
    plain autograd: bit for bit against "function" (the same ops on the same inputs); against
    the per-segment reference "loop" and "grouped" within rounding (their ops differ)."""
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
    assert not mask[1:9].all() and not mask[11:20].all()  # dropout on: units are dropped
    grad = torch.randn(num_tokens, OUT, dtype=dtype)

    def run(masked: bool) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_(True)
        a = [w.clone().requires_grad_(True) for w in lora_a]
        b = [w.clone().requires_grad_(True) for w in lora_b]
        if masked:
            out = dropout_segmented_lora(xs, mask, ranges, segments, a, b, scales)
        else:  # the plain path: the fp32 multipliers and dropped input under autograd
            dropped = xs * keep_multipliers(mask, ranges, dtype)
            out = segmented_lora(dropped, segments, a, b, scales, impl)
        out.backward(grad)
        return [out.detach(), xs.grad, *(w.grad for w in (*a, *b))]

    exact = impl == "function"
    tolerance = 0 if exact else (1e-12 if dtype == torch.float64 else 1e-5)
    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dropped_input_rounds_as_the_multipliers(dtype: torch.dtype) -> None:
    """``x`` times the mask's bytes, then each range times its scale, is ``x * keep`` bit for
    bit (signed zeros included), in place or not: in half precision too, where a Python-float
    scale would enter at fp32 precision instead of ``keep``'s rounded value."""
    torch.manual_seed(3)
    ranges = [(2, 9, keep_scale(0.3)), (12, 20, keep_scale(0.05))]  # rows 0-2, 9-12: no dropout
    mask = random_mask(20, ranges, seed=4)
    x = torch.randn(20, IN).to(dtype)
    grad = torch.randn(20, IN).to(dtype)
    keep = keep_multipliers(mask, ranges, dtype)
    bits = BITS[dtype.itemsize]
    assert torch.equal(dropped_input(x, mask, ranges).view(bits), (x * keep).view(bits))
    scaled = scale_by_keep_(grad.clone(), mask, ranges)
    assert torch.equal(scaled.view(bits), (grad * keep).view(bits))


def test_masked_op_takes_only_the_gradients_asked_for() -> None:
    """Frozen A (or x without grad) gets no gradient; the others are still the plain path's."""
    torch.manual_seed(1)
    x = torch.randn(10, IN)
    ranges = [(0, 6, keep_scale(0.2))]
    mask = random_mask(10, ranges, seed=2)
    a = [torch.randn(4, IN), torch.randn(4, IN, requires_grad=True)]
    b = [torch.randn(OUT, 4, requires_grad=True), torch.randn(OUT, 4, requires_grad=True)]
    out = dropout_segmented_lora(x, mask, ranges, [(0, 6), (6, 10)], a, b, [1.0, 2.0])
    out.sum().backward()
    plain_b = [w.detach().clone().requires_grad_(True) for w in b]
    plain_a1 = a[1].detach().clone().requires_grad_(True)
    dropped = x * keep_multipliers(mask, ranges, x.dtype)
    plain = segmented_lora(dropped, [(0, 6), (6, 10)], [a[0], plain_a1], plain_b, [1.0, 2.0])
    plain.sum().backward()
    assert a[0].grad is None
    for got, want in zip(
        [a[1].grad, *(w.grad for w in b)], [plain_a1.grad, *(w.grad for w in plain_b)], strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_op_rejects_a_mask_of_the_wrong_shape() -> None:
    x = torch.randn(4, IN)
    weights = ([torch.randn(2, IN)], [torch.randn(OUT, 2)], [1.0])
    with pytest.raises(ValueError, match="mask must be bool"):
        dropout_segmented_lora(x, torch.ones(4, IN + 1, dtype=torch.bool), (), [(0, 4)], *weights)


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
