"""LoRAMoE and MoLA layers equal a straightforward dense computation, outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mlora.adapters import MultiLoraLinear
from mlora.adapters.lora_moe import LoraMoeAdapter, MolaAdapter, load_balancing_loss
from mlora.layout import BatchLayout, LayoutContext
from mlora.ops.routed_lora import routed_lora

IN, OUT, E, R = 16, 12, 4, 3


def make_module(kind: str, use_dora: bool, top_k: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    kwargs = dict(r=R, scaling=2.0, use_dora=use_dora, base_weight=weight)
    if kind == "loramoe":
        module = LoraMoeAdapter(IN, OUT, E, **kwargs)
    else:
        module = MolaAdapter(IN, OUT, E, top_k=top_k, **kwargs)
    with torch.no_grad():
        for expert in module.experts:  # B = 0 at init would hide the experts' differences
            expert.lora_B.weight.normal_()
            if expert.magnitude is not None:
                expert.magnitude.weight.add_(0.1 * torch.randn(OUT))
    return module, weight


def dense_reference(module, x, base_result, weight, bias) -> torch.Tensor:
    """Every expert on every token, weighted by the router's kept (renormalised) probabilities."""
    probs = torch.softmax(x @ module.moe_gate.weight.T, dim=-1)  # (N, E)
    if isinstance(module, MolaAdapter):
        threshold = probs.topk(module.top_k, dim=-1).values[:, -1:]
        kept = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
        probs = kept / kept.sum(dim=-1, keepdim=True)
    out = x.new_zeros(x.shape[0], OUT, dtype=torch.float32)
    for e, expert in enumerate(module.experts):
        out = out + probs[:, e : e + 1] * expert(x, base_result, weight, bias)
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind,top_k", [("loramoe", 0), ("mola", 2), ("mola", 1), ("mola", 4)])
def test_routed_equals_dense_reference(kind: str, top_k: int, use_dora: bool) -> None:
    module, weight = make_module(kind, use_dora, top_k)
    reference = copy.deepcopy(module)
    bias = torch.randn(OUT)
    x = torch.randn(40, IN)
    base_result = x @ weight.T + bias
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    ours = module(x_ours, base_result, weight, bias)
    ref = dense_reference(reference, x_ref, base_result, weight, bias)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(ref)
    ours.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p_ours), (_, p_ref) in zip(
        module.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert p_ours.grad is not None, name
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_loramoe_equals_weights_by_hand() -> None:
    """LoRAMoE from the raw matrices: sum_e p_e * scale * B_e A_e x."""
    module, weight = make_module("loramoe", use_dora=False)
    x = torch.randn(10, IN)
    probs = torch.softmax(x @ module.moe_gate.weight.T, dim=-1)
    by_hand = sum(
        probs[:, e : e + 1] * 2.0 * (x @ ex.lora_A.weight.T @ ex.lora_B.weight.T)
        for e, ex in enumerate(module.experts)
    )
    torch.testing.assert_close(module(x, x @ weight.T), by_hand, rtol=1e-5, atol=1e-5)


def test_mola_runs_each_expert_on_its_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """k (token, expert) rows per token go through the experts' LoRAs, not E."""
    import mlora.adapters.lora_moe as lora_moe

    seen: list[int] = []

    def spy(pairs, experts, *args, **kwargs):
        seen.append(pairs.shape[0])
        return routed_lora(pairs, experts, *args, **kwargs)

    monkeypatch.setattr(lora_moe, "routed_lora", spy)
    module, weight = make_module("mola", use_dora=False, top_k=2)
    x = torch.randn(50, IN)
    module(x, x @ weight.T)
    assert seen == [50 * 2]  # k rows per token in all, not E


def test_load_balancing_loss_equals_transformers() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2 * 7, E)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    probs = torch.softmax(logits, dim=-1)
    selected = probs.topk(2, dim=-1).indices
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func((logits,), E, 2, attention_mask)
        flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
        torch.testing.assert_close(load_balancing_loss(probs, selected, E, flat), expected)


def test_mola_reports_balancing_loss_over_real_tokens_in_training() -> None:
    """Through MultiLoraLinear and the context: coef * Mixtral's loss of the segment's real
    tokens, joined to that adapter only; nothing in eval or with router_loss off."""
    torch.manual_seed(0)
    context = LayoutContext()
    layer = MultiLoraLinear(torch.nn.Linear(IN, OUT).requires_grad_(False), context)
    layer.add_adapter("plain", 4, 2.0)
    moe = MolaAdapter(
        IN, OUT, E, r=R, scaling=2.0, top_k=2, router_loss=True, aux_loss_coef=0.5,
        context=context, adapter_name="m",
    )  # fmt: skip
    layer.adapters["m"] = moe
    x = torch.randn(3, 5, IN)
    attention = torch.ones(3, 5, dtype=torch.long)
    attention[2, 3:] = 0  # padding in the MoLA segment
    layout = BatchLayout.from_row_adapters(["plain", "m", "m"])
    with context.use(layout, attention.reshape(-1).bool()):
        layer.train()
        layer(x)
        logits = x[1:].reshape(-1, IN) @ moe.moe_gate.weight.T
        expected = 0.5 * load_balancing_loss_func((logits,), E, 2, attention[1:])
        torch.testing.assert_close(context.aux_losses.loss("m"), expected)
        assert context.aux_losses.loss("plain") is None
        assert context.aux_losses.take_loads("m").sum().item() == pytest.approx(1.0)
        context.aux_losses.clear()
        layer.eval()
        layer(x)
        assert context.aux_losses.loss("m") is None
        layer.train()
        moe.router_loss = False
        layer(x)
        assert context.aux_losses.loss("m") is None


def test_plugs_into_multi_lora_linear_next_to_lora() -> None:
    """In a mixed batch the MoE adapter's rows equal running it alone; LoRA rows are untouched."""
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT).requires_grad_(False)
    context = LayoutContext()
    layer = MultiLoraLinear(base, context)
    layer.add_adapter("plain", 4, 2.0)
    for kind in ("loramoe", "mola"):
        module, _ = make_module(kind, use_dora=True)
        layer.adapters[kind] = module
    x = torch.randn(6, 5, IN)
    rows_of = ["plain", "plain", "loramoe", "mola", "mola", None]
    with context.use(BatchLayout.from_row_adapters(rows_of)):
        mixed = layer(x)
    for rows, name in ((slice(0, 2), "plain"), (slice(2, 3), "loramoe"), (slice(3, 5), "mola")):
        n = rows.stop - rows.start
        with context.use(BatchLayout.from_row_adapters([name] * n)):
            alone = layer(x[rows])
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[5], base(x[5]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,top_k", [("loramoe", 0), ("mola", 2)])
def test_routed_equals_dense_reference_on_cuda_with_bf16_inputs(kind: str, top_k: int) -> None:
    module, weight = make_module(kind, use_dora=True, top_k=top_k)
    module = module.cuda()
    weight = weight.cuda()
    x = torch.randn(64, IN, device="cuda").bfloat16()
    base_result = (x.float() @ weight.T).bfloat16()
    ours = module(x, base_result, weight, None)
    with torch.no_grad():
        ref = dense_reference(module, x.float(), base_result.float(), weight, None)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
