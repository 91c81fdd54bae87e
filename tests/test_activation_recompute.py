"""Activation outputs are rebuilt in backward, not kept: same gradients bit for bit, less kept.

Reference: the same forward and backward under plain autograd (no saved-tensor hooks). A
forward hook on each activation module records weak references to its outputs; after the
forward, with the graph still alive, the outputs are gone under ``recompute_activations`` and
alive without it (so the check can see a kept output at all).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM

from mlora.ops.activation_recompute import is_activation, recompute_activations
from tests.conftest import make_model


def gemma2() -> nn.Module:
    """GELU-tanh gated MLP (transformers' PytorchGELUTanh / GELUTanh)."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def trainable_copy(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with only its MLP projections trainable (as adapters would be)."""
    model = factory()
    for name, param in model.named_parameters():
        param.requires_grad_("mlp" in name)
    return model


def run(model: nn.Module, recompute: bool) -> tuple[dict[str, torch.Tensor], list, torch.Tensor]:
    """Forward and backward of one batch; (gradients, weak refs to activation outputs, the
    input embeddings' gradient)."""
    outputs: list[weakref.ref] = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
        for m in model.modules()
        if is_activation(m)
    ]
    torch.manual_seed(1)
    ids = torch.randint(4, 128, (2, 12))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with recompute_activations(model) if recompute else nullcontext():
        logits = model(inputs_embeds=embeds).logits
    for hook in hooks:
        hook.remove()
    alive = [ref for ref in outputs if ref() is not None]
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, alive, embeds.grad


@pytest.mark.parametrize("factory", [make_model, gemma2], ids=["llama-silu", "gemma2-gelu-tanh"])
def test_gated_mlp_gradients_equal_without_kept_activation_outputs(factory) -> None:
    plain_grads, plain_alive, plain_input = run(trainable_copy(factory), recompute=False)
    grads, alive, input_grad = run(trainable_copy(factory), recompute=True)
    assert plain_alive, "plain autograd keeps every activation output until backward"
    assert not alive, "recompute_activations keeps none"
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    assert torch.equal(input_grad, plain_input)


def test_an_activation_that_keeps_its_output_is_left_alone() -> None:
    """ReLU's backward keeps its output, not its input: a note would keep the input alive too,
    so the output stays saved as it is (and the gradients are unchanged)."""

    def relu_mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    results = []
    for recompute in (False, True):
        model = relu_mlp()
        outputs: list[weakref.ref] = []
        model[1].register_forward_hook(
            lambda _m, _a, out, kept=outputs: kept.append(weakref.ref(out))
        )
        x = torch.randn(4, 8)
        with recompute_activations(model) if recompute else nullcontext():
            y = model(x)
        assert outputs[0]() is not None  # kept by ReLU's backward either way
        y.sum().backward()
        results.append([p.grad for p in model.parameters()])
    for plain, rebuilt in zip(*results, strict=True):
        assert torch.equal(plain, rebuilt)


def test_double_backward_through_a_rebuilt_activation() -> None:
    """Under create_graph the rebuilt output carries its graph: second derivatives match."""
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        gate, up = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
        act = nn.SiLU()
        with recompute_activations(act) if recompute else nullcontext():
            y = (act(gate) * up).sum()
        (first,) = torch.autograd.grad(y, up, create_graph=True)
        (second,) = torch.autograd.grad(first.pow(2).sum(), gate)
        grads.append(second)
    assert torch.equal(grads[0], grads[1])


def test_hooks_are_removed_after_the_block() -> None:
    act = nn.GELU()
    with recompute_activations(act):
        assert act._forward_hooks and act._forward_pre_hooks
    assert not act._forward_hooks and not act._forward_pre_hooks
