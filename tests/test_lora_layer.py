"""MultiLoraLinear equals PEFT's LoRA / rsLoRA / DoRA layer, in forward and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mlora.adapters import MultiLoraLinear
from mlora.layout import BatchLayout, LayoutContext
from mlora.randomness import SegmentRandom


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
    """Inverted dropout by mlora's documented rule, written here with shifts instead of views:
    three 16-bit draws from the low 48 bits of each 64-bit ``random_`` word, a unit kept when
    its draw is below K = round((1 - p) * 2**16), kept units scaled by 2**16 / K."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        words = torch.empty((n + 2) // 3, dtype=torch.int64).random_(generator=self.generator)
        draws = torch.stack([(words >> (16 * j)) & 0xFFFF for j in range(3)], dim=1).reshape(-1)
        kept = round((1 - self.p) * 65536)
        keep = (draws[:n] < kept).view(x.shape)
        return x * keep * (65536 / kept)


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
    twin = torch.Generator().set_state(context.generators.get("a", torch.device("cpu")).get_state())
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
    """Rows of different adapters (and base-only rows) in one batch equal separate passes."""
    torch.manual_seed(0)
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(16, 12).requires_grad_(False), context)
    for name, dora in [("a", False), ("b", True), ("c", False)]:
        layer.add_adapter(name, 4, 2.0, use_dora=dora)
        nn.init.normal_(layer.adapters[name].lora_B.weight)
    rows = ["a", "a", None, "b", "c", "c"]
    x = torch.randn(len(rows), 7, 16)
    with context.use(BatchLayout.from_row_adapters(rows)):
        mixed = layer(x)
    for i, name in enumerate(rows):
        with context.use(BatchLayout.from_row_adapters([name])):
            alone = layer(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone)
    torch.testing.assert_close(mixed[2], layer.base_layer(x[2]))


def test_zero_b_equals_base_layer() -> None:
    context = LayoutContext()
    layer = MultiLoraLinear(nn.Linear(16, 12).requires_grad_(False), context)
    layer.add_adapter("a", 4, 2.0)
    layer.add_adapter("d", 4, 2.0, use_dora=True)
    x = torch.randn(2, 3, 16)
    with context.use(BatchLayout.from_row_adapters(["a", "d"])):
        torch.testing.assert_close(layer(x), layer.base_layer(x))
