"""Gradient checkpointing: recompute and offload give the same loss and gradients as no
checkpointing, with LoRA dropout active, on a tiny LLaMA with PEFT LoRA adapters."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mlora.adapters.spec import LoraSpec
from mlora.batching.aux_losses import AuxLossCollector
from mlora.batching.collate import collate
from mlora.batching.layout import NO_PASS
from mlora.core.errors import MloraError
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.hardware.backends import CpuBackend, RngState, get_backend
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.recompute import (
    apply_gradient_checkpointing,
    checkpoint_mode,
    find_decoder_layers,
)
from tests.conftest import make_model

VOCAB = 128


def lora_llama(device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A frozen tiny LLaMA with trainable LoRA adapters (dropout 0.1, B != 0), in train mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.1,
    )
    lora = LoraConfig(
        r=4,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B, so every adapter weight gets a gradient
    )
    return get_peft_model(LlamaForCausalLM(config), lora).to(device).train()


def loss_and_grads(
    mode: str,
    backend=None,
    autocast_dtype: torch.dtype | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    backend = backend or get_backend("cpu")
    model = lora_llama(backend.device)
    apply_gradient_checkpointing(model, mode, backend)
    backend.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 24), device=backend.device)
    context = backend.autocast(autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        loss = model(input_ids=ids, labels=ids, **forward_kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(
    a: tuple[torch.Tensor, dict[str, torch.Tensor]],
    b: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_checkpointing_matches_plain_with_dropout(mode: str) -> None:
    # The embeddings are frozen, so the first layer's input does not require grad: recompute
    # must still return gradients for the adapter weights inside it.
    assert_same(loss_and_grads("none"), loss_and_grads(mode))


def test_recompute_matches_under_bf16_autocast() -> None:
    assert_same(
        loss_and_grads("none", autocast_dtype=torch.bfloat16),
        loss_and_grads("recompute", autocast_dtype=torch.bfloat16),
    )


def test_recompute_drops_kv_cache_in_training() -> None:
    assert_same(loss_and_grads("none"), loss_and_grads("recompute", use_cache=True))


class _NoRngRestore(CpuBackend):
    """Forgets to restore RNG state: the recomputation draws fresh dropout masks."""

    def set_rng_state(self, state: RngState) -> None:
        return None


def test_recompute_reruns_each_layer_and_needs_rng_restore() -> None:
    model = lora_llama()
    layers = apply_gradient_checkpointing(model, "recompute", get_backend("cpu"))
    calls: list[int] = []
    for layer in layers:
        layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2 * len(layers)
    # Proof that the equality tests can fail: without the RNG restore the gradients differ.
    _, reference = loss_and_grads("none")
    _, broken = loss_and_grads("recompute", backend=_NoRngRestore())
    assert any(not torch.allclose(broken[n], g, atol=1e-4) for n, g in reference.items())


def test_eval_and_no_grad_run_layers_once() -> None:
    model = lora_llama()
    layers = apply_gradient_checkpointing(model, "recompute", get_backend("cpu"))
    calls: list[int] = []
    layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2


def test_find_layers_apply_and_undo() -> None:
    model = lora_llama()
    layers = find_decoder_layers(model)
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2
    keys = list(model.state_dict())
    assert checkpoint_mode(model) == "none"
    apply_gradient_checkpointing(model, "recompute")
    assert checkpoint_mode(model) == "recompute"
    apply_gradient_checkpointing(model, "offload")
    assert checkpoint_mode(model) == "offload"
    assert apply_gradient_checkpointing(model, "none") == []
    assert checkpoint_mode(model) == "none"
    assert all("forward" not in layer.__dict__ for layer in layers)
    apply_gradient_checkpointing(model, "recompute")
    assert list(model.state_dict()) == keys  # layers patched in place: PEFT key names unchanged


def test_bad_mode_and_model_errors() -> None:
    with pytest.raises(MloraError, match="gradient_checkpoint 'full'"):
        apply_gradient_checkpointing(lora_llama(), "full")
    with pytest.raises(MloraError, match="no decoder layers in Linear"):
        apply_gradient_checkpointing(nn.Linear(2, 2), "recompute")


class ToyBlock(nn.Module):
    """A layer with an HF-like call signature: keyword hidden states, a tuple of position
    tensors, an integer tensor, a non-tensor flag, and a tuple output with a non-tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.adapter = nn.Linear(8, 8, bias=False)
        self.dropout = nn.Dropout(0.3)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, str, torch.Tensor]:
        cos, sin = position_embeddings
        h = self.frozen(hidden_states) * cos + sin + position_ids.unsqueeze(-1)
        h = h + scale * self.adapter(self.dropout(hidden_states))
        return h, "aux", position_ids


class ToyStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.rand(x.shape[-1]), torch.rand(x.shape[-1])
        ids = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        for block in self.blocks:
            x, tag, ids_out = block(
                hidden_states=x, position_embeddings=(cos, sin), position_ids=ids, scale=0.5
            )
            assert tag == "aux" and torch.equal(ids_out, ids)
        return x


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_generic_signature_without_no_split_modules(input_requires_grad: bool) -> None:
    results = []
    for mode in ("none", "recompute"):
        torch.manual_seed(0)
        model = ToyStack().train()
        apply_gradient_checkpointing(model, mode, get_backend("cpu"))
        torch.manual_seed(1)
        x = torch.randn(2, 5, 8, requires_grad=input_requires_grad)
        model(x).square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if input_requires_grad:
            grads["input"] = x.grad
        results.append(grads)
    assert results[0].keys() == results[1].keys()
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


class RoutedBlock(nn.Module):
    """Records a router-style loss and token counts on a collector instead of returning them,
    as MoE adapters do; dropout sits before the router so the recomputation must replay it."""

    def __init__(self, collector: AuxLossCollector) -> None:
        super().__init__()
        self.collector = collector
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.router = nn.Linear(8, 3, bias=False)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(self.dropout(x)).softmax(-1)  # (B, T, 3)
        self.collector.add("a", probs.mean((0, 1)).square().sum())
        self.collector.add_load("a", probs.argmax(-1).flatten().bincount(minlength=3))
        return self.frozen(x) + probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_side_losses_keep_their_gradient_and_loads_count_once(mode: str) -> None:
    results = []
    for m in ("none", mode):
        torch.manual_seed(0)
        collector = AuxLossCollector()
        blocks = nn.ModuleList(RoutedBlock(collector) for _ in range(3)).train()
        apply_gradient_checkpointing(blocks, m, get_backend("cpu"), collector)
        torch.manual_seed(1)
        out = torch.randn(2, 5, 8)
        for block in blocks:
            out = block(out)
        aux = collector.loss("a")
        assert aux is not None and aux.requires_grad
        (out.square().mean() + aux).backward()
        grads = [block.router.weight.grad.clone() for block in blocks]
        results.append((aux.detach(), grads, collector.take_loads("a")))
    (aux_ref, grads_ref, loads_ref), (aux, grads, loads) = results
    torch.testing.assert_close(aux, aux_ref)
    torch.testing.assert_close(loads, loads_ref)  # the backward re-run is not counted again
    for grad, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-7, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["recompute", "offload"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_checkpointing_matches_plain_on_cuda(mode: str, dtype: torch.dtype | None) -> None:
    backend = get_backend("cuda")
    reference = loss_and_grads("none", backend, dtype)
    candidate = loss_and_grads(mode, backend, dtype)
    assert_same(reference, candidate)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_checkpointing_lowers_peak_memory_on_cuda(mode: str) -> None:
    backend = get_backend("cuda")
    peaks = {}
    for m in ("none", mode):
        model = lora_llama(backend.device)
        apply_gradient_checkpointing(model, m, backend)
        ids = torch.randint(0, VOCAB, (8, 512), device=backend.device)
        backend.empty_cache()
        backend.reset_peak_memory_stats()
        model(input_ids=ids, labels=ids).loss.backward()
        backend.synchronize()
        peaks[m] = backend.memory_stats()["peak"]
        del model
    assert peaks[mode] < peaks["none"]


def adapters_loss_and_grads(mode: str) -> dict[str, torch.Tensor]:
    """Two LoRA adapters (dropout on) in one padded pass through ``MultiLoraModel``; backward
    runs while another pass (the same rows, adapters swapped) is installed on the context."""
    model = MultiLoraModel(make_model(vocab_size=96))
    for name in ("a", "b"):
        model.add_adapter(name, LoraSpec(4, 2.0, 0.1, ("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():
        for _, param in model.model.named_parameters():
            if param.requires_grad:  # B != 0: every adapter weight gets a gradient
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(param.numel()))
    model.train()
    context = model.context
    apply_gradient_checkpointing(
        model.model, mode, get_backend("cpu"), context.aux_losses, context.generators, context
    )
    rows = [
        TokenizedRow(list(range(4, 4 + n)), [IGNORE_INDEX, *range(5, 4 + n)]) for n in (9, 4, 6)
    ]
    batch = collate([("a", rows[:2]), ("b", rows[2:])], pad_token_id=0)
    swapped = collate([("b", rows[:2]), ("a", rows[2:])], pad_token_id=0)
    assert batch.token_mask is not None  # padding: the pass state carries per-token data
    loss = model.segment_losses(batch).sum()
    with context.install(swapped.pass_state()):
        loss.backward()
    assert context.state is NO_PASS  # every install was undone
    return {n: p.grad for n, p in model.model.named_parameters() if p.requires_grad}


def test_recompute_installs_the_pass_of_its_forward_again() -> None:
    """A recomputed layer reads the pass its forward ran in, not the one installed when its
    backward runs: gradients equal those of the unchecked run, dropout on."""
    reference = adapters_loss_and_grads("none")
    recomputed = adapters_loss_and_grads("recompute")
    assert reference.keys() == recomputed.keys() and len(reference) == 2 * 3 * 2 * 2
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, atol=1e-7, rtol=1e-6, msg=name)
