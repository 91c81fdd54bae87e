"""LoRAMoE without dropout runs as one LoRA of rank E*r (router probabilities scaling the rank
blocks). References are the LoRAMoE formula written here with plain matmuls:
``delta = sum_e softmax(x Wg^T)_e * s * (x A_e^T) B_e^T``.
"""

from __future__ import annotations

import torch

from mlora.adapters.lora_moe.layer import LoraMoeAdapter
from mlora.adapters.spec import AdapterInput
from mlora.ops.routed_lora import weighted_lora

IN, OUT, E, R, SCALE = 16, 12, 4, 3, 0.75


def make_loramoe(dropout: float = 0.0, use_dora: bool = False) -> LoraMoeAdapter:
    torch.manual_seed(0)
    base = torch.randn(OUT, IN)
    module = LoraMoeAdapter(
        IN, OUT, E, R, SCALE, dropout=dropout, use_dora=use_dora, base_weight=base
    )
    with torch.no_grad():  # B != 0 so every expert contributes
        for expert in module.experts:
            expert.lora_B.weight.normal_(0, 0.5)
    return module


def formula(x, gate, lora_a, lora_b) -> torch.Tensor:
    """The LoRAMoE delta from the weights alone."""
    probs = torch.softmax(x @ gate.T, dim=-1)  # (N, E)
    return sum(
        probs[:, e : e + 1] * SCALE * (x @ a.T @ b.T)
        for e, (a, b) in enumerate(zip(lora_a, lora_b, strict=True))
    )


def test_rank_stacked_forward_and_gradients_equal_the_formula() -> None:
    module = make_loramoe().train()
    assert module.rank_stacked()
    x = torch.randn(9, IN)
    delta = module(AdapterInput(x, torch.zeros(9, OUT)))
    upstream = torch.randn_like(delta)
    (delta * upstream).sum().backward()

    gate = module.moe_gate.weight.detach().clone().requires_grad_(True)
    lora_a = [e.lora_A.weight.detach().clone().requires_grad_(True) for e in module.experts]
    lora_b = [e.lora_B.weight.detach().clone().requires_grad_(True) for e in module.experts]
    expected = formula(x, gate, lora_a, lora_b)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.moe_gate.weight.grad, gate.grad, atol=1e-5, rtol=1e-5)
    for expert, a, b in zip(module.experts, lora_a, lora_b, strict=True):
        torch.testing.assert_close(expert.lora_A.weight.grad, a.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(expert.lora_B.weight.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_dropout_in_training_runs_each_expert_on_its_own_mask() -> None:
    """Dropout > 0 in training: per expert (masks differ); in eval the stacked path again."""
    module = make_loramoe(dropout=0.5).train()
    assert not module.rank_stacked()
    x = torch.randn(64, IN)
    gate = module.moe_gate.weight.detach()
    lora_a = [e.lora_A.weight.detach() for e in module.experts]
    lora_b = [e.lora_B.weight.detach() for e in module.experts]
    torch.manual_seed(3)
    trained = module(AdapterInput(x, torch.zeros(64, OUT))).detach()
    assert not torch.allclose(trained, formula(x, gate, lora_a, lora_b), atol=1e-3)
    module.eval()
    assert module.rank_stacked()
    evaluated = module(AdapterInput(x, torch.zeros(64, OUT))).detach()
    torch.testing.assert_close(evaluated, formula(x, gate, lora_a, lora_b), atol=1e-5, rtol=1e-5)


def test_dora_experts_run_one_by_one() -> None:
    assert not make_loramoe(use_dora=True).eval().rank_stacked()


def test_weighted_lora_equals_the_weighted_sum_of_each_lora() -> None:
    torch.manual_seed(1)
    ranks, scales = [2, 5, 3], [0.5, 1.0, 2.0]
    lora_a = [torch.randn(r, IN) for r in ranks]
    lora_b = [torch.randn(OUT, r) for r in ranks]
    x, weights = torch.randn(7, IN), torch.rand(7, 3)
    expected = sum(
        weights[:, e : e + 1] * scales[e] * (x @ lora_a[e].T @ lora_b[e].T) for e in range(3)
    )
    got = weighted_lora(x, weights, lora_a, lora_b, scales)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
