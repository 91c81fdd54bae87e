"""LoRA variants (PEFT's pattern): DoRA is a ``DoraVariant`` object on the adapter.

References are written here from the papers' formulas, independently of ``mlora``'s code:
LoRA ``y = x W^T + b + s x A^T B^T``; DoRA ``y = (m / ||W + s B A||_row) * x (W + s B A)^T + b``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlora.adapters import DoraVariant, LoraAdapter, LoraVariant
from mlora.adapters.spec import AdapterInput

IN, OUT, R, SCALE = 12, 10, 4, 0.5


def adapter_with_weights(use_dora: bool, weight: torch.Tensor) -> LoraAdapter:
    torch.manual_seed(1)
    adapter = LoraAdapter(IN, OUT, R, SCALE, dropout=0.0, use_dora=use_dora, base_weight=weight)
    with torch.no_grad():  # B != 0 and a magnitude away from its init, so every term counts
        adapter.lora_B.weight.normal_(0, 0.3)
        if adapter.magnitude is not None:
            adapter.magnitude.weight.add_(0.2 * torch.randn(OUT))
    return adapter.eval()


def reference_weight(adapter: LoraAdapter, weight: torch.Tensor, use_dora: bool) -> torch.Tensor:
    """The adapted weight from the formulas above (hand-written, not the variant's code)."""
    a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    adapted = weight + SCALE * (b @ a)
    if not use_dora:
        return adapted
    magnitude = adapter.magnitude.weight.detach()
    row_norm = adapted.pow(2).sum(dim=1).sqrt()
    return (magnitude / row_norm).unsqueeze(1) * adapted


@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_and_merged_weight_equal_the_formula(use_dora: bool) -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(OUT, IN), torch.randn(OUT), torch.randn(7, IN)
    adapter = adapter_with_weights(use_dora, weight)
    assert type(adapter.variant) is (DoraVariant if use_dora else LoraVariant)
    assert adapter.needs_base_weight is use_dora
    expected = F.linear(x, reference_weight(adapter, weight, use_dora), bias)
    base = F.linear(x, weight, bias)
    delta = adapter(AdapterInput(x, base, weight if use_dora else None, bias))
    torch.testing.assert_close(base + delta, expected, atol=1e-5, rtol=1e-5)
    merged = adapter.merged_weight(weight)  # merged equals unmerged
    torch.testing.assert_close(F.linear(x, merged, bias), expected, atol=1e-5, rtol=1e-5)


def test_dora_starts_as_the_identity_and_needs_the_base_weight() -> None:
    """At init B = 0 and m = ||W||: the merged weight is W itself."""
    weight = torch.randn(OUT, IN)
    adapter = LoraAdapter(IN, OUT, R, SCALE, use_dora=True, base_weight=weight)
    torch.testing.assert_close(adapter.merged_weight(weight), weight)
    with pytest.raises(ValueError, match="base weight"):
        LoraAdapter(IN, OUT, R, SCALE, use_dora=True)
