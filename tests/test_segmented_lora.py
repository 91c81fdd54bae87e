"""segmented_lora: the grouped and function paths equal the per-segment loop, values and grads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mlora.ops import GROUPED_AVAILABLE, resolve_impl, segmented_lora

IN, OUT = 32, 48  # 16-byte aligned for fp32 and bf16, so grouped_mm accepts them
FAST_IMPLS = ["grouped", "function"] if GROUPED_AVAILABLE else ["function"]


@dataclass(frozen=True)
class Case:
    """One layout: ``segments`` over ``num_tokens`` tokens with one rank per segment."""

    name: str
    num_tokens: int
    segments: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]


def even_segments(num_tokens: int, count: int) -> tuple[tuple[int, int], ...]:
    step = num_tokens // count
    return tuple((g * step, (g + 1) * step) for g in range(count))


def ragged_segments(seed: int, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` segments of random lengths (some empty), with random gaps between them."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (count,), generator=generator).tolist()
    gaps = torch.randint(0, 3, (count + 1,), generator=generator).tolist()
    segments, cursor = [], gaps[0]
    for length, gap in zip(lengths, gaps[1:], strict=True):
        segments.append((cursor, cursor + length))
        cursor += length + gap
    return tuple(segments)


def ragged_case(name: str, seed: int, count: int, ranks: tuple[int, ...]) -> Case:
    segments = ragged_segments(seed, count)
    return Case(name, segments[-1][1] + 3, segments, ranks)


CASES = [
    Case("G1", 24, ((0, 24),), (8,)),
    Case("G4", 64, even_segments(64, 4), (8,) * 4),
    ragged_case("G16-ragged-ranks", 1, 16, tuple(2 + g % 7 for g in range(16))),
    ragged_case("G64-ragged", 2, 64, tuple(4 + 4 * (g % 3) for g in range(64))),
    Case("empty-segments", 32, ((0, 0), (0, 10), (10, 10), (10, 32), (32, 32)), (4, 8, 2, 16, 4)),
    Case("gaps", 40, ((3, 10), (15, 20), (25, 34)), (8, 8, 8)),
    Case("unequal-ranks", 40, ((0, 5), (5, 30), (30, 40)), (1, 5, 16)),
    Case("unequal-lengths", 70, ((0, 1), (1, 3), (3, 60), (60, 70)), (8, 8, 8, 8)),
]


@dataclass
class Inputs:
    x: torch.Tensor  # (T, IN)
    lora_a: list[torch.Tensor]  # (r_g, IN) each
    lora_b: list[torch.Tensor]  # (OUT, r_g) each
    scales: list[float]


def make_inputs(
    case: Case,
    dtype: torch.dtype = torch.float32,
    x_dtype: torch.dtype | None = None,
    x_grad: bool = True,
    weight_grad: bool = True,
    seed: int = 0,
) -> Inputs:
    """Seeded random inputs; B is random (not PEFT's zeros) so every gradient is non-trivial."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    x = randn(case.num_tokens, IN).to(x_dtype or dtype).requires_grad_(x_grad)
    lora_a = [randn(r, IN, std=IN**-0.5).to(dtype).requires_grad_(weight_grad) for r in case.ranks]
    lora_b = [randn(OUT, r, std=r**-0.5).to(dtype).requires_grad_(weight_grad) for r in case.ranks]
    scales = [16 / math.sqrt(r) for r in case.ranks]  # rsLoRA: alpha / sqrt(r), alpha = 16
    return Inputs(x, lora_a, lora_b, scales)


def random_grad(num_tokens: int, seed: int = 1) -> torch.Tensor:
    """A seeded (T, OUT) incoming gradient."""
    return torch.randn(num_tokens, OUT, generator=torch.Generator().manual_seed(seed))


def run(
    inputs: Inputs, segments: tuple[tuple[int, int], ...], impl: str, grad: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Forward, then backward with ``grad`` (None: ``out.sum()``, a stride-0 gradient)."""
    leaves = {"x": inputs.x}
    leaves |= {f"A{g}": a for g, a in enumerate(inputs.lora_a)}
    leaves |= {f"B{g}": b for g, b in enumerate(inputs.lora_b)}
    for leaf in leaves.values():
        leaf.grad = None
    out = segmented_lora(inputs.x, segments, inputs.lora_a, inputs.lora_b, inputs.scales, impl)
    if out.requires_grad:
        if grad is None:
            out.sum().backward()
        else:
            out.backward(grad)
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """Max error at most ``tol`` times the tensor's largest magnitude (at least 1): summation
    order differs between paths, so error scales with the values, not with each element."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol} * {scale:.3g}"


def assert_same(
    actual: tuple[torch.Tensor, dict], expected: tuple[torch.Tensor, dict], tol: float = 1e-5
) -> None:
    """Same output and, leaf by leaf, the same gradient (or both None)."""
    assert_close(actual[0], expected[0], tol, "output")
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        if grad is None:
            assert actual[1][name] is None, name
        else:
            assert_close(actual[1][name], grad, tol, name)


@pytest.mark.parametrize("grad_kind", ["random", "sum"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fast_paths_equal_loop_fp32(case: Case, impl: str, grad_kind: str) -> None:
    inputs = make_inputs(case)
    grad = random_grad(case.num_tokens) if grad_kind == "random" else None
    expected = run(inputs, case.segments, "loop", grad)
    assert_same(run(inputs, case.segments, impl, grad), expected)


@pytest.mark.parametrize("grad_kind", ["random", "sum"])
@pytest.mark.parametrize("impl", [*FAST_IMPLS, "loop"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c.name)
def test_bf16_close_to_fp32_loop(case: Case, impl: str, grad_kind: str) -> None:
    inputs = make_inputs(case, dtype=torch.bfloat16)
    grad = random_grad(case.num_tokens).bfloat16() if grad_kind == "random" else None
    out, grads = run(inputs, case.segments, impl, grad)
    assert out.dtype == torch.bfloat16 and grads["A0"].dtype == torch.bfloat16
    reference = make_inputs(case, dtype=torch.float32)
    with torch.no_grad():  # the same bf16 values, computed in fp32
        reference.x.copy_(inputs.x.float())
        for ref, low in zip(
            reference.lora_a + reference.lora_b, inputs.lora_a + inputs.lora_b, strict=True
        ):
            ref.copy_(low.float())
    expected_out, expected_grads = run(
        reference, case.segments, "loop", None if grad is None else grad.float()
    )
    # bf16 keeps 8 significant bits (step 2**-8 = 0.4%); allow about five steps of the scale.
    assert_close(out.float(), expected_out, 2e-2, "output")
    for name, expected in expected_grads.items():
        assert_close(grads[name].float(), expected, 2e-2, name)


@pytest.mark.parametrize("impl", [*FAST_IMPLS, "loop"])
def test_bf16_activations_fp32_adapters_compute_in_fp32(impl: str) -> None:
    case = CASES[2]
    inputs = make_inputs(case, dtype=torch.float32, x_dtype=torch.bfloat16)
    grad = random_grad(case.num_tokens)
    out, grads = run(inputs, case.segments, impl, grad)
    assert out.dtype == torch.float32 and grads["x"].dtype == torch.bfloat16
    assert_same((out, grads), run(inputs, case.segments, "loop", grad))


@pytest.mark.parametrize("impl", [*FAST_IMPLS, "loop"])
def test_equals_dense_block_diagonal_computation(impl: str) -> None:
    """An independent formula: all adapters on all tokens, masked block-diagonally per rank."""
    case = CASES[2]
    inputs = make_inputs(case, x_grad=False, weight_grad=False)
    hidden = inputs.x @ torch.cat(inputs.lora_a).T  # (T, sum r)
    mask = torch.zeros_like(hidden)
    column = 0
    for (start, end), r, scale in zip(case.segments, case.ranks, inputs.scales, strict=True):
        mask[start:end, column : column + r] = scale
        column += r
    expected = (hidden * mask) @ torch.cat(inputs.lora_b, dim=1).T  # (T, OUT)
    out = segmented_lora(inputs.x, case.segments, inputs.lora_a, inputs.lora_b, inputs.scales, impl)
    assert_close(out, expected, 1e-5, "output")


@pytest.mark.parametrize("impl", [*FAST_IMPLS, "loop"])
def test_tokens_outside_segments_get_zero_delta_and_zero_grad(impl: str) -> None:
    case = CASES[5]  # gaps before, between and after the segments
    inputs = make_inputs(case)
    out, grads = run(inputs, case.segments, impl, random_grad(case.num_tokens))
    outside = torch.ones(case.num_tokens, dtype=torch.bool)
    for start, end in case.segments:
        outside[start:end] = False
    assert outside.sum() == 40 - 21
    assert torch.equal(out[outside], torch.zeros_like(out[outside]))
    assert torch.equal(grads["x"][outside], torch.zeros_like(grads["x"][outside]))
    assert grads["x"][~outside].abs().min() > 0


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("frozen", ["weights", "x", "some-weights", "all"])
def test_inputs_without_grad(impl: str, frozen: str) -> None:
    case = CASES[2]
    inputs = make_inputs(
        case, x_grad=frozen not in ("x", "all"), weight_grad=frozen not in ("weights", "all")
    )
    if frozen == "some-weights":
        for weight in inputs.lora_a[::2] + inputs.lora_b[1::3]:
            weight.requires_grad_(False)
    grad = random_grad(case.num_tokens)
    actual, expected = (
        run(inputs, case.segments, impl, grad),
        run(inputs, case.segments, "loop", grad),
    )
    assert_same(actual, expected)
    assert (actual[1]["x"] is None) == (frozen in ("x", "all"))
    assert (actual[1]["A0"] is None) == (frozen != "x")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_gradient_through_dropped_input(impl: str) -> None:
    """The caller applies dropout before the op; dropped inputs get zero gradient in every path."""
    case, p = CASES[3], 0.3
    inputs = make_inputs(case)
    keep = torch.rand(case.num_tokens, IN, generator=torch.Generator().manual_seed(1)) >= p
    grad = random_grad(case.num_tokens)
    results = {}
    for name in (impl, "loop"):
        inputs.x.grad = None
        dropped = inputs.x * keep / (1 - p)
        out = segmented_lora(
            dropped, case.segments, inputs.lora_a, inputs.lora_b, inputs.scales, name
        )
        out.backward(grad)
        results[name] = (out.detach(), inputs.x.grad)
    assert_close(results[impl][0], results["loop"][0], 1e-5, "output")
    assert_close(results[impl][1], results["loop"][1], 1e-5, "x")
    assert torch.equal(results[impl][1][~keep], torch.zeros_like(results[impl][1][~keep]))


def torch_grouped_mm_runs(features_in: int, features_out: int, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` itself multiplies (16, in) rows by two (in, out) groups."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    x = torch.randn(16, features_in, dtype=dtype)
    weights = torch.randn(2, features_out, features_in, dtype=dtype).transpose(1, 2)
    try:
        torch._grouped_mm(x, weights, offs=torch.tensor([8, 16], dtype=torch.int32))
    except RuntimeError:  # torch's refusal: a dtype or stride it has no kernel for
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_picks_a_working_path(dtype: torch.dtype) -> None:
    """auto runs grouped where supported (fp32/bf16 with aligned features), else function."""
    case = CASES[2]
    inputs = make_inputs(case, dtype=dtype)
    odd_x = inputs.x.detach()[:, : IN - 2].contiguous()  # 30 features: not 16-byte aligned
    odd_a = [a.detach()[:, : IN - 2] for a in inputs.lora_a]
    # What torch itself can run, asked directly (not through our support check): auto takes
    # grouped exactly where torch's grouped matmul runs these shapes and dtype on the CPU.
    out = inputs.lora_b[0].shape[0]
    assert resolve_impl("auto", inputs.x, inputs.lora_a, inputs.lora_b) == (
        "grouped" if torch_grouped_mm_runs(IN, out, dtype) else "function"
    )
    assert not torch_grouped_mm_runs(IN - 2, out, dtype)  # torch refuses unaligned strides
    assert resolve_impl("auto", odd_x, odd_a, inputs.lora_b) == "function"
    for x, lora_a in ((inputs.x, inputs.lora_a), (odd_x, odd_a)):
        args = (x, case.segments, lora_a, inputs.lora_b, inputs.scales)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert_close(segmented_lora(*args), segmented_lora(*args, impl="loop"), tol, "output")


def test_rejects_bad_arguments() -> None:
    case = CASES[1]
    inputs = make_inputs(case, dtype=torch.float64)
    args = (inputs.x, case.segments, inputs.lora_a, inputs.lora_b, inputs.scales)
    with pytest.raises(ValueError, match="unknown segmented LoRA impl"):
        segmented_lora(*args, impl="fast")
    with pytest.raises(ValueError, match="grouped_mm cannot run"):
        segmented_lora(*args, impl="grouped")
    overlapping = ((0, 20), (10, 30), (30, 40), (40, 64))
    with pytest.raises(ValueError, match="sorted, non-overlapping"):
        segmented_lora(inputs.x, overlapping, *args[2:])
    with pytest.raises(ValueError, match="one of each per segment"):
        segmented_lora(inputs.x, case.segments[:3], *args[2:])
    with pytest.raises(ValueError, match="lora_a must be"):
        segmented_lora(inputs.x, case.segments, inputs.lora_b, inputs.lora_a, inputs.scales)
