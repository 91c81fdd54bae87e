"""MultiLoraLinear equals PEFT's LoRA / rsLoRA / DoRA layer, in forward and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.batching.layout import BatchLayout, LayoutContext
from mlora.batching.randomness import SegmentRandom
from tests.references import keep_multipliers, lora_delta, twin_generator


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 12, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_layer(base: nn.Module, r: int, alpha: float, dropout: float, variant: str) -> nn.Module:
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["proj"],
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )
    return get_peft_model(copy.deepcopy(base), config)


def copy_peft_weights_into(ours: MultiLoraLinear, name: str, peft_model: nn.Module) -> None:
    layer = peft_model.base_model.model.proj
    adapter = ours.adapters[name]
    with torch.no_grad():
        adapter.lora_A.weight.copy_(layer.lora_A["default"].weight)
        adapter.lora_B.weight.copy_(torch.randn_like(layer.lora_B["default"].weight))
        layer.lora_B["default"].weight.copy_(adapter.lora_B.weight)
        if adapter.magnitude is not None:
            magnitude = layer.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(adapter.magnitude.weight, magnitude)  # same init from W
            magnitude.add_(0.1 * torch.randn_like(magnitude))
            adapter.magnitude.weight.copy_(magnitude)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_matches_peft_forward_and_gradients(variant: str) -> None:
    torch.manual_seed(0)
    base = OneLinear()
    r, alpha = 4, 8.0
    reference = peft_layer(base, r, alpha, 0.0, variant)
    context = LayoutContext()
    ours = MultiLoraLinear(copy.deepcopy(base.proj).requires_grad_(False), context)
    scaling = alpha / (r**0.5 if variant == "rslora" else r)
    ours.add_adapter("a", r, scaling, 0.0, use_dora=variant == "dora")
    copy_peft_weights_into(ours, "a", reference)

    x = torch.randn(3, 5, 16)
    x_ref = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    y_ref = reference(x_ref)
    with context.use(BatchLayout.from_row_adapters(["a", "a", "a"])):
        y_ours = ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    y_ours.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    peft_layer_mod = reference.base_model.model.proj
    ours_adapter = ours.adapters["a"]
    torch.testing.assert_close(
        ours_adapter.lora_A.weight.grad, peft_layer_mod.lora_A["default"].weight.grad
    )
    torch.testing.assert_close(
        ours_adapter.lora_B.weight.grad, peft_layer_mod.lora_B["default"].weight.grad
    )
    if variant == "dora":
        torch.testing.assert_close(
            ours_adapter.magnitude.weight.grad,
            peft_layer_mod.lora_magnitude_vector["default"].weight.grad,
        )


class GeneratorDropout(nn.Module):
    """PEFT's dropout slot filled with mlora's documented draw rule (``keep_multipliers``,
    rebuilt independently in ``tests.references``) on a twin of the adapter's generator."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * keep_multipliers(x.shape, self.p, self.generator)


def test_dropout_rate_and_scale() -> None:
    """Over many units the drop rate is p (to sampling error) and the multipliers average 1."""
    generator = torch.Generator().manual_seed(3)
    for p in (0.05, 0.3):
        keep = SegmentRandom(generator).keep(torch.empty(2000, 1000), p)
        assert abs((keep == 0).float().mean().item() - p) < 3e-3
        assert abs(keep.mean().item() - 1.0) < 5e-3


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_matches_peft_with_the_adapters_own_stream(variant: str) -> None:
    """Dropout on: PEFT's layer, given a generator in the state of our adapter's stream, draws
    the same mask, so outputs and gradients match; the global RNG plays no part."""
    torch.manual_seed(0)
    base = OneLinear()
    reference = peft_layer(base, 4, 8.0, 0.3, variant).train()
    context = LayoutContext()
    ours = MultiLoraLinear(copy.deepcopy(base.proj).requires_grad_(False), context).train()
    ours.add_adapter("a", 4, 2.0, 0.3, use_dora=variant == "dora")
    copy_peft_weights_into(ours, "a", reference)
    context.generators.seed("a", 7)
    twin = twin_generator(context.generators.get("a", torch.device("cpu")))
    reference.base_model.model.proj.lora_dropout["default"] = GeneratorDropout(0.3, twin)
    x = torch.randn(4, 16)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref = reference(x_ref)
    torch.manual_seed(123)  # the global RNG must not matter
    with context.use(BatchLayout.from_row_adapters(["a"] * 4)):
        y_ours = ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    peft_a = reference.base_model.model.proj.lora_A["default"].weight
    torch.testing.assert_close(ours.adapters["a"].lora_A.weight.grad, peft_a.grad)


def test_mixed_batch_equals_each_adapter_alone() -> None:
    """Rows of different adapters (and base-only rows) in one batch, dropout on, equal the
    LoRA / DoRA formula with each adapter's own masks, and so does each adapter run alone."""
    torch.manual_seed(0)
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(16, 12).requires_grad_(False), context).train()
    for name, dora in [("a", False), ("b", True), ("c", False)]:
        layer.add_adapter(name, 4, 2.0, dropout=0.3, use_dora=dora)
        nn.init.normal_(layer.adapters[name].lora_B.weight)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias

    def streams() -> dict[str, torch.Generator]:
        cpu = torch.device("cpu")
        return {n: twin_generator(context.generators.get(n, cpu)) for n in ("a", "b", "c")}

    def expected(name: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(rows, T, out) base + the adapter's delta by the formula, masks from ``generator``."""
        flat = x.reshape(-1, x.shape[-1])
        adapter = layer.adapters[name]
        magnitude = None if adapter.magnitude is None else adapter.magnitude.weight
        keep = keep_multipliers(flat.shape, adapter.dropout_p, generator)
        a, b, s = adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling
        delta = lora_delta(flat, a, b, s, weight, None, magnitude, keep)
        return (flat @ weight.T + bias + delta).view(*x.shape[:-1], -1)

    rows = ["a", "a", None, "b", "c", "c"]
    x = torch.randn(len(rows), 7, 16)
    twins = streams()
    with context.use(BatchLayout.from_row_adapters(rows)):
        mixed = layer(x)
    for name, picked in (("a", [0, 1]), ("b", [3]), ("c", [4, 5])):
        reference = expected(name, x[picked], twins[name])
        torch.testing.assert_close(mixed[picked], reference, rtol=1e-5, atol=1e-5)
        alone_twins = streams()
        with context.use(BatchLayout.from_row_adapters([name] * len(picked))):
            alone = layer(x[picked])
        reference = expected(name, x[picked], alone_twins[name])
        torch.testing.assert_close(alone, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], x[2] @ weight.T + bias)


def test_zero_b_equals_base_layer() -> None:
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(16, 12).requires_grad_(False), context)
    layer.add_adapter("a", 4, 2.0)
    layer.add_adapter("d", 4, 2.0, use_dora=True)
    x = torch.randn(2, 3, 16)
    base = layer.base_layer
    with context.use(BatchLayout.from_row_adapters(["a", "d"])):
        torch.testing.assert_close(layer(x), x @ base.weight.T + base.bias)
