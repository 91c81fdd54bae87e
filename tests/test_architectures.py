"""Every architecture with standard projection names works: table-driven over tiny configs.

For each model family: a mixed batch (two adapters + a base row) equals PEFT with each adapter,
and the labels-only ``segment_losses`` equals the model's own ``loss`` from full logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from mlora.batch import collate
from mlora.data import IGNORE_INDEX, TokenizedRow
from mlora.layout import BatchLayout
from mlora.model import LoraSpec, MultiLoraModel

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

        from mlora.persistence import load_adapter_weights

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
    batch = collate([("a", rows)], pad_token_id=0)
    ours = model.segment_losses(batch)[0]
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for b, row in enumerate(rows):
        labels[b, : len(row)] = torch.tensor(row.labels)
    with model.context.use(batch.layout):
        reference = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
