"""Every architecture with standard projection names works: table-driven over tiny configs.

For each model family: a mixed batch (two adapters + a base row) equals PEFT with each adapter,
the labels-only ``segment_losses`` equals the model's own ``loss`` from full logits, and packed
rows give the same per-token losses and gradients as padded rows. Families whose code does not
keep packed rows apart (OPT, BLOOM) are caught by the packing probe, and "auto" pads them.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.batching.layout import BatchLayout
from mlora.batching.packing import packing_problem, resolve_packing, use_stream
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.model.multi_lora import MultiLoraModel
from tests.helpers import in_row_order

COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        ATTENTION,
        ["q_proj", "v_proj", "gate_proj", "down_proj"],
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", ATTENTION, ["k_proj", "o_proj", "up_proj"]),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        ATTENTION,
        ["q_proj", "k_proj", "v_proj", "down_proj"],
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {**ATTENTION, "head_dim": 16},
        ["q_proj", "gate_proj"],
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**ATTENTION, "head_dim": 16, "final_logit_softcapping": 5.0},
        ["v_proj", "up_proj"],
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {"num_attention_heads": 4},
        ["q_proj", "dense", "fc1", "fc2"],
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        ATTENTION,
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
}


def build(family: str) -> tuple[torch.nn.Module, list[str]]:
    config_name, model_name, extra, targets = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **extra, pad_token_id=0)
    config.initializer_range = 0.2  # larger weights so differences would show in the logits
    return getattr(transformers, model_name)(config).eval(), targets


def randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_equals_peft_per_adapter(family: str) -> None:
    base, targets = build(family)
    ours = MultiLoraModel(copy.deepcopy(base)).eval()
    references = {}
    for name, subset, dora in [("a", targets, False), ("b", targets[:2], True)]:
        peft_model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=subset, use_dora=dora)
        )
        randomise(peft_model)
        references[name] = peft_model.eval()
        ours.add_adapter(
            name, LoraSpec(r=4, scaling=2.0, target_modules=tuple(subset), use_dora=dora)
        )
        from peft.utils import get_peft_model_state_dict

        from mlora.persistence.adapter_files import load_adapter_weights

        load_adapter_weights(ours, name, get_peft_model_state_dict(peft_model), family)

    ids = torch.randint(1, 96, (4, 7))
    mask = torch.ones_like(ids)
    rows = ["a", "b", None, "a"]
    with torch.no_grad():
        mixed = ours(ids, mask, BatchLayout.from_row_adapters(rows)).logits
        expected = {n: m(input_ids=ids, attention_mask=mask).logits for n, m in references.items()}
        expected[None] = base(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_only_loss_equals_the_models_own_loss(family: str) -> None:
    base, targets = build(family)
    model = MultiLoraModel(base)
    model.add_adapter("a", LoraSpec(r=2, scaling=1.0, target_modules=tuple(targets)))
    randomise(model)
    rows = [
        TokenizedRow(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
        TokenizedRow(list(range(20, 29)), [IGNORE_INDEX] * 3 + list(range(23, 29))),
    ]
    batch = collate([("a", rows)], pad_token_id=0, packed=False)
    ours = model.segment_losses(batch)[0]
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for b, row in enumerate(rows):
        labels[b, : len(row)] = torch.tensor(row.labels)
    with model.context.use(batch.layout):
        reference = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def _losses_and_grads(
    model: MultiLoraModel, groups: list, packed: bool, stream: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses in (row, position in row) order, and every gradient."""
    model.zero_grad(set_to_none=True)
    batch = collate(groups, pad_token_id=0, packed=packed, stream=stream)
    token_losses = model.token_losses(batch)
    token_losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return in_row_order(batch, token_losses.detach()), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_equal_padded_rows(family: str) -> None:
    """Per-token losses and every adapter gradient: packed == padded (fp32), two adapters with
    rows of unequal length, lm_head among the targets."""
    base, targets = build(family)
    assert packing_problem(base) is None  # every family here packs exactly
    model = MultiLoraModel(base)
    model.add_adapter("a", LoraSpec(r=2, scaling=1.0, target_modules=(*targets, "lm_head")))
    model.add_adapter("b", LoraSpec(r=3, scaling=0.5, target_modules=tuple(targets)))
    randomise(model)
    model.train()
    rows = [  # a: lengths 12, 5, 6 (the last two share a packed row); b: 9, 4, 3
        TokenizedRow(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
        TokenizedRow(list(range(20, 25)), [IGNORE_INDEX] * 2 + list(range(22, 25))),
        TokenizedRow(list(range(40, 46)), [IGNORE_INDEX] * 1 + list(range(41, 46))),
        TokenizedRow(list(range(30, 39)), [IGNORE_INDEX] * 3 + list(range(33, 39))),
        TokenizedRow(list(range(50, 54)), [IGNORE_INDEX] * 1 + list(range(51, 54))),
        TokenizedRow(list(range(60, 63)), [IGNORE_INDEX] * 1 + list(range(61, 63))),
    ]
    groups = [("a", rows[:3]), ("b", rows[3:])]
    assert collate(groups, 0, packed=True).input_ids.shape[0] < len(rows)  # rows really share
    padded_losses, padded_grads = _losses_and_grads(model, groups, packed=False)
    packed_losses, packed_grads = _losses_and_grads(model, groups, packed=True)
    torch.testing.assert_close(packed_losses, padded_losses, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    assert any("lm_head" in name for name in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # one stream with per-row attention: every sdpa family (Gemma 2 runs eager: it softcaps)
    with model.context.use(None):  # the probe runs the bare base model
        streamed = use_stream(base)
    # Gemma 2 softcaps its attention: transformers 5.24 runs it eager (bins stay), 5.0 sdpa
    assert streamed or family == "gemma2"
    if streamed:
        stream_losses, stream_grads = _losses_and_grads(model, groups, packed=True, stream=True)
        torch.testing.assert_close(stream_losses, padded_losses, rtol=1e-5, atol=1e-5)
        for name, grad in padded_grads.items():
            torch.testing.assert_close(stream_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


UNPACKABLE = {
    # learned absolute positions indexed from the attention mask, not from position_ids
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 96, "word_embed_proj_dim": 64}),
    # ALiBi biases built from the attention mask
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_layer": 2, "n_head": 4}),
}


@pytest.mark.parametrize("family", list(UNPACKABLE))
def test_auto_packing_falls_back_where_rows_would_mix(family: str, caplog) -> None:
    """Why "auto" pads some models: packed rows really would attend to each other there, so
    the probe refuses and says why in one log line; the padded batch is then exact."""
    config_name, model_name, extra = UNPACKABLE[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra
    )
    hf_model = getattr(transformers, model_name)(config).eval()
    model = MultiLoraModel(hf_model)
    rows = [  # lengths 12, 5, 6: the last two share a packed batch row
        TokenizedRow(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
        TokenizedRow(list(range(20, 25)), [IGNORE_INDEX] * 2 + list(range(22, 25))),
        TokenizedRow(list(range(30, 36)), [IGNORE_INDEX] * 3 + list(range(33, 36))),
    ]
    with torch.no_grad():
        packed = model.token_losses(collate([(None, rows)], 0, packed=True))
        padded = model.token_losses(collate([(None, rows)], 0, packed=False))
        alone = torch.cat([model.token_losses(collate([(None, [r])], 0)) for r in rows])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert (packed - alone).abs().max() > 1e-3  # packing would train on mixed rows
    with caplog.at_level(logging.INFO, logger="mlora"):
        assert resolve_packing(hf_model, "auto") is False
    assert "packing: off" in caplog.text and model_name in caplog.text
    assert resolve_packing(hf_model, True) is True  # asked for explicitly: the user's choice
