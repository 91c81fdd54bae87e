"""Packing never changes an adapter's random draws: packed == stream == padded, every draw on.

First-fit-decreasing packing reorders an adapter's rows inside its segment and puts them in
bins whose width the other adapters set. Dropout masks, MixLoRA router jitter and expert
dropout, and MoLA / LoRAMoE expert dropout are drawn per adapter in each token's canonical
order (rows end to end, as given), so a packed batch must give the same per-token losses and
gradients as the padded batch (one row per row, rows in order) from the same generator states.
The reference is the padded batch: no packing, no reordering.
"""

from __future__ import annotations

import pytest
import torch

from mlora.batching.collate import collate
from mlora.batching.packing import use_stream
from mlora.config.schema import parse_config
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.trainer import spec_from_config
from tests.conftest import make_model
from tests.helpers import in_row_order

ATTENTION_AND_FFN = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "lora": {"target_modules": [*ATTENTION_AND_FFN, "lm_head"]},
    "mixlora": {"routing_strategy": "mixlora", "num_experts": 3, "top_k": 2,
                "jitter_noise": 0.1, "target_modules": ATTENTION_AND_FFN},
    "switch": {"routing_strategy": "mixlora-switch", "num_experts": 3, "expert_capacity": 4,
               "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]},
    "mola": {"routing_strategy": "mola", "num_experts": 3, "top_k": 2,
             "target_modules": ["q_proj", "down_proj"]},
    "loramoe": {"routing_strategy": "loramoe", "num_experts": 2,
                "target_modules": ["v_proj", "up_proj"]},
}  # fmt: skip


def build(kind: str) -> MultiLoraModel:
    entries = [
        {"name": kind, "data": "x.json", "r": 4, "lora_dropout": 0.3, **KINDS[kind]},
        {"name": "wide", "data": "x.json", "r": 2, "lora_dropout": 0.3,
         "target_modules": ["q_proj"]},
    ]  # fmt: skip
    config = parse_config({"lora": entries})
    model = MultiLoraModel(make_model(vocab_size=96))
    for adapter in config.lora:
        model.add_adapter(adapter.name, spec_from_config(adapter))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would hide every LoRA path
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "router" in name or "gate" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def row(start: int, length: int, prompt: int) -> TokenizedRow:
    ids = [(start + i) % 90 + 4 for i in range(length)]
    return TokenizedRow(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def losses_and_grads(
    model: MultiLoraModel, groups: list, packed: bool, stream: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses in (row, position in row) order and every gradient, from fresh streams."""
    for name in model.specs:
        model.context.generators.seed(name, 5)
    model.zero_grad(set_to_none=True)
    model.context.aux_losses.clear()
    batch = collate(groups, pad_token_id=0, packed=packed, stream=stream)
    token_losses = model.token_losses(batch)
    aux = [model.context.aux_losses.loss(name) for name in model.specs]  # router losses
    (token_losses.sum() + sum(a for a in aux if a is not None)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return in_row_order(batch, token_losses.detach()), grads


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_equals_padded_with_dropout_jitter_and_routing(kind: str) -> None:
    model = build(kind)
    # kind: lengths 5, 11, 6, 4 -> first fit decreasing packs [11], [6, 5], [4] at width 12
    # (row 2 goes before row 0); wide: one row of 12 sets the width
    ours = [row(0, 5, 2), row(10, 11, 3), row(30, 6, 1), row(50, 4, 1)]
    groups = [(kind, ours), ("wide", [row(60, 12, 4)])]
    packed_batch = collate(groups, 0, packed=True)
    assert packed_batch.input_ids.shape[0] < 5  # rows really share bins
    assert packed_batch.token_real_index is not None  # and are reordered / padded
    padded_losses, padded_grads = losses_and_grads(model, groups, packed=False)
    packed_losses, packed_grads = losses_and_grads(model, groups, packed=True)
    torch.testing.assert_close(packed_losses, padded_losses, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 4
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # one stream (all rows end to end, per-row attention): no padding, same losses and grads
    with model.context.use(None):  # the probe runs the bare base model
        assert use_stream(model.model)
    stream_batch = collate(groups, 0, stream=True)
    assert stream_batch.input_ids.shape[0] == 1 and stream_batch.padded_tokens == 0
    stream_losses, stream_grads = losses_and_grads(model, groups, packed=True, stream=True)
    torch.testing.assert_close(stream_losses, padded_losses, rtol=1e-5, atol=1e-5)
    assert stream_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(stream_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # the draws are live: other streams give other losses (dropout is really on)
    for name in model.specs:
        model.context.generators.seed(name, 6)
    other = model.token_losses(collate(groups, 0, packed=False)).detach()
    assert (other.sort().values - padded_losses.sort().values).abs().max() > 1e-4
