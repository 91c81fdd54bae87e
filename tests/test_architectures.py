"""Every architecture with standard projection names works: table-driven over tiny configs.

For each model family (one row of ``FAMILIES``): a mixed batch (two adapters + a base row)
equals PEFT with each adapter in its logits, and the LoRA gradients equal PEFT's; two adapters
trained together (dropout on) get the gradients each gets alone; greedy generation with mixed
adapters equals PEFT's ``generate``; the labels-only ``segment_losses`` equals the model's own
``loss`` from full logits; and packed rows give the same per-token losses and gradients as
padded rows. Families whose code does not keep packed rows apart (OPT, BLOOM) are caught by the
packing probe, and "auto" pads them. README "Supported models" lists what each row shows.
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from mlora.adapters.lora.format import named_parameters as peft_named_parameters
from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.batching.layout import BatchLayout
from mlora.batching.packing import packing_problem, resolve_packing, use_stream
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.inference.generation import SamplingParams, generate
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import load_adapter_weights
from tests.conftest import make_tokenizer
from tests.helpers import in_row_order, peft_greedy

COMMON = {  # the vocabulary of tests.conftest.make_tokenizer, for generation
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
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
    # GLM (ChatGLM's line, transformers' own classes): partial rotary, fused gate_up_proj
    "glm": ("GlmConfig", "GlmForCausalLM", ATTENTION, ["q_proj", "o_proj", "gate_up_proj"]),
    "glm4": (
        "Glm4Config",
        "Glm4ForCausalLM",
        ATTENTION,
        ["k_proj", "v_proj", "gate_up_proj", "down_proj"],
    ),
    # per-head q/k RMSNorm after the projections
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", ATTENTION, ["q_proj", "k_proj", "up_proj"]),
    # text-only Gemma 3: a sliding-window layer (window 4, shorter than the rows) and a full one
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **ATTENTION,
            "head_dim": 16,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        ["q_proj", "v_proj", "gate_proj", "down_proj"],
    ),
    # q/k RMSNorm over the whole projection, norms after attention and MLP
    "olmo2": (
        "Olmo2Config",
        "Olmo2ForCausalLM",
        ATTENTION,
        ["q_proj", "k_proj", "o_proj", "up_proj"],
    ),
    # mixture-of-experts bases, LoRA on attention (experts and router: tests/test_moe_bases.py)
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**ATTENTION, "num_local_experts": 4, "num_experts_per_tok": 2},
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**ATTENTION, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48},
        ["q_proj", "v_proj", "o_proj"],
    ),
}


def build(family: str) -> tuple[torch.nn.Module, list[str]]:
    config_name, model_name, extra, targets = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **extra, pad_token_id=0)
    config.initializer_range = 0.2  # larger weights so differences would show in the logits
    return getattr(transformers, model_name)(config).eval(), targets


def randomise(model: torch.nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=std)


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


def with_peft_adapters(
    base: torch.nn.Module, family: str, targets: dict[str, list[str]], std: float = 0.1
) -> tuple[torch.nn.Module, MultiLoraModel]:
    """PEFT's model with a random LoRA per name (B != 0), and ours holding the same weights."""
    first, *others = targets
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets[first]), first
    )
    for name in others:
        peft_model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=targets[name]))
    randomise(peft_model, std)
    ours = MultiLoraModel(copy.deepcopy(base)).eval()
    for name, modules in targets.items():
        ours.add_adapter(name, LoraSpec(r=4, scaling=2.0, target_modules=tuple(modules)))
        state = get_peft_model_state_dict(peft_model, adapter_name=name)
        load_adapter_weights(ours, name, state, family)
    return peft_model.eval(), ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_gradients_equal_peft(family: str) -> None:
    """One backward of the model's own loss (rows of unequal length, padded): every LoRA
    gradient equals PEFT's, key by key (fp32)."""
    base, targets = build(family)
    peft_model, ours = with_peft_adapters(base, family, {"x": targets})
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row is 6 tokens long
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # a prompt
    peft_loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    peft_loss.backward()
    rows = [TokenizedRow(ids[b, :n].tolist(), labels[b, :n].tolist()) for b, n in [(0, 9), (1, 6)]]
    loss = ours.segment_losses(collate([("x", rows)], pad_token_id=0, packed=False))[0]
    loss.backward()
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-6)
    theirs = {
        re.sub(r"\.(lora_[AB])\.x\.", r".\1.", name): p.grad
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }
    mine = {key: p.grad for key, p in peft_named_parameters(ours, "x").items()}
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 2 * len(targets)
    assert all(g.abs().max() > 0 for g in theirs.values())  # every gradient reached PEFT's LoRA
    for key, grad in theirs.items():
        torch.testing.assert_close(mine[key], grad, rtol=1e-5, atol=1e-5, msg=key)


def _segment_losses_and_grads(
    model: MultiLoraModel, groups: list, seed: int = 5
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each adapter's loss and every gradient of one packed pass, from freshly seeded streams."""
    for name in model.specs:
        model.context.generators.seed(name, seed)
    model.zero_grad(set_to_none=True)
    batch = collate(groups, pad_token_id=0, packed=True)
    losses = model.segment_losses(batch)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {name: loss.detach() for (name, _), loss in zip(groups, losses, strict=True)}, grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_adapters_together_equal_each_alone(family: str) -> None:
    """Dropout on (0.3, each adapter its own stream), packed rows, lm_head among a's targets:
    a and b in one pass get the losses and gradients each gets in a model holding only it."""
    base, targets = build(family)
    both = MultiLoraModel(base)
    specs = {
        "x": LoraSpec(r=2, scaling=1.0, dropout=0.3, target_modules=(*targets, "lm_head")),
        "y": LoraSpec(r=3, scaling=0.5, dropout=0.3, target_modules=tuple(targets[:2])),
    }
    for name, spec in specs.items():
        both.add_adapter(name, spec)
    randomise(both)
    both.train()
    rows = {  # a: lengths 12, 5, 6; b: 9, 4
        "x": [
            TokenizedRow(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
            TokenizedRow(list(range(20, 25)), [IGNORE_INDEX] * 2 + list(range(22, 25))),
            TokenizedRow(list(range(40, 46)), [IGNORE_INDEX] * 1 + list(range(41, 46))),
        ],
        "y": [
            TokenizedRow(list(range(30, 39)), [IGNORE_INDEX] * 3 + list(range(33, 39))),
            TokenizedRow(list(range(50, 54)), [IGNORE_INDEX] * 1 + list(range(51, 54))),
        ],
    }
    alone_models = {}
    for name in specs:
        alone_models[name] = copy.deepcopy(both)
        alone_models[name].remove_adapter("y" if name == "x" else "x")
    together_losses, together_grads = _segment_losses_and_grads(both, list(rows.items()))
    for name, model in alone_models.items():
        losses, grads = _segment_losses_and_grads(model, [(name, rows[name])])
        torch.testing.assert_close(together_losses[name], losses[name], rtol=1e-5, atol=1e-6)
        assert grads and all(f".adapters.{name}." in key for key in grads)
        for key, grad in grads.items():
            torch.testing.assert_close(together_grads[key], grad, rtol=1e-5, atol=1e-5, msg=key)
    # the draws are live: other streams give another loss (dropout is really on)
    other, _ = _segment_losses_and_grads(both, list(rows.items()), seed=6)
    assert (other["x"] - together_losses["x"]).abs() > 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_greedy_generation_equals_peft(family: str) -> None:
    """Rows of two adapters and the base model in one left-padded batch, KV cache on: each
    row's greedy tokens equal PEFT's ``generate`` with that adapter alone, unpadded."""
    base, targets = build(family)
    tokenizer = make_tokenizer()
    peft_model, ours = with_peft_adapters(
        base, family, {"x": [*targets, "lm_head"], "y": targets[:1]}, 0.5
    )
    prompts = ["add 3 4=", "rev owl=", "hello, how are you?"]
    requests = [(prompt, name) for prompt in prompts for name in ("x", None, "y")]
    outputs = generate(ours, tokenizer, requests, SamplingParams(max_new_tokens=8))
    eos = tokenizer.eos_token_id
    for out in outputs:
        expected = peft_greedy(peft_model, tokenizer, out.request.prompt, out.request.adapter, 8)
        assert out.token_ids == expected[: len(out.token_ids)], out.request
        assert len(out.token_ids) == len(expected) or expected[len(out.token_ids) - 1] == eos
    # the adapters really change the answers (otherwise the comparison above proves little)
    assert len({tuple(o.token_ids) for o in outputs if o.request.prompt == prompts[2]}) > 1


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


def build_unpackable(family: str) -> torch.nn.Module:
    """A tiny random ``UNPACKABLE`` model in eval mode (seeded: the same weights every call)."""
    config_name, model_name, extra = UNPACKABLE[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra
    )
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", list(UNPACKABLE))
def test_auto_packing_falls_back_where_rows_would_mix(family: str, caplog) -> None:
    """Why "auto" pads some models: packed rows really would attend to each other there, so
    the probe refuses and says why in one log line; the padded batch is then exact."""
    model_name = UNPACKABLE[family][1]
    hf_model = build_unpackable(family)
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
