"""Mixture-of-experts bases: LoRA on their fused expert tensors and routers, against PEFT.

Mixtral and Qwen3-MoE keep each layer's experts as two tensors, ``gate_up_proj`` (E, 2I, H)
and ``down_proj`` (E, H, I), and route with a ``gate`` that holds a (E, H) weight; none is an
``nn.Linear``. ``target_parameters`` adapts them as PEFT's ``LoraConfig(target_parameters=...)``
does (a per-expert ``W_e + s B_e A_e``): logits and LoRA gradients equal PEFT's (fp32), mixed
greedy generation equals PEFT's ``generate``, two adapters together equal each alone, and a
trained adapter is saved in a form PEFT loads. Attention LoRA on these bases runs through the
family table of tests/test_architectures.py. Layouts that cannot be adapted are refused in one
line, before anything changes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from mlora.adapters.lora.format import named_parameters as peft_named_parameters
from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.batching.layout import BatchLayout
from mlora.cli.train import main
from mlora.config.schema import ConfigError, parse_config
from mlora.core.errors import MloraError
from mlora.data.rows import IGNORE_INDEX, TokenizedRow
from mlora.inference.generation import SamplingParams, generate
from mlora.inference.trained import load_trained
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import (
    load_adapter_weights,
    read_adapter,
    spec_from_peft_config,
)
from tests.conftest import make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    peft_greedy,
    reverse_rows,
    run_in_memory,
    train_killed_then_resumed,
    write_json,
    write_template,
)
from tests.test_architectures import build, randomise

EVERY_TENSOR = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
TARGETS = {  # target_parameters of an adapter, with q_proj and o_proj as its target_modules
    "experts+router": EVERY_TENSOR,
    "down_proj": ("experts.down_proj",),
    "gate_up_proj+router": ("mlp.experts.gate_up_proj", "mlp.gate.weight"),
}
CASES = [(f, t) for f in ("mixtral", "qwen3_moe") for t in TARGETS]


def peft_with(base: torch.nn.Module, parameters: tuple[str, ...], name: str, std: float = 0.1):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], target_parameters=list(parameters)
    )
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
    randomise(model, std)
    return model.eval()


def spec(parameters: tuple[str, ...]) -> LoraSpec:
    return LoraSpec(
        r=4, scaling=2.0, target_modules=("q_proj", "o_proj"), target_parameters=parameters
    )


def ours_like(base: torch.nn.Module, references: dict[str, torch.nn.Module], family: str):
    model = MultiLoraModel(copy.deepcopy(base)).eval()
    for name, reference in references.items():
        parameters = tuple(sorted(reference.peft_config[name].target_parameters))
        model.add_adapter(name, spec(parameters))
        state = get_peft_model_state_dict(reference, adapter_name=name)
        assert sorted(peft_named_parameters(model, name)) == sorted(state)  # PEFT's key names
        load_adapter_weights(model, name, state, family)
    return model


@pytest.mark.parametrize(("family", "targets"), CASES)
def test_logits_and_gradients_equal_peft_target_parameters(family: str, targets: str) -> None:
    base, _ = build(family)
    parameters = TARGETS[targets]
    references = {"x": peft_with(base, parameters, "x"), "y": peft_with(base, EVERY_TENSOR, "y")}
    ours = ours_like(base, references, family)
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    rows = ["x", "y", None, "x"]
    with torch.no_grad():
        mixed = ours(ids, mask, BatchLayout.from_row_adapters(rows)).logits
        expected = {n: m(input_ids=ids, attention_mask=mask).logits for n, m in references.items()}
        expected[None] = base(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-5)
    assert (expected["x"] - expected[None]).abs().max() > 1e-2  # the adapters change the logits

    # gradients of the model's own loss, adapter x alone on two rows (one padded)
    labels = ids[:2].clone()
    labels[1, 5:] = IGNORE_INDEX
    labels[:, :2] = IGNORE_INDEX
    mask = torch.ones_like(labels)
    mask[1, 5:] = 0
    reference = references["x"]
    reference_loss = reference(input_ids=ids[:2], attention_mask=mask, labels=labels).loss
    reference_loss.backward()
    batch_rows = [
        TokenizedRow(ids[b, :n].tolist(), labels[b, :n].tolist()) for b, n in [(0, 7), (1, 5)]
    ]
    loss = ours.segment_losses(collate([("x", batch_rows)], pad_token_id=0, packed=False))[0]
    loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    theirs = {
        re.sub(r"\.(lora_[AB])\.x\.", r".\1.", n): p.grad
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    mine = {key: p.grad for key, p in peft_named_parameters(ours, "x").items()}
    assert mine.keys() == theirs.keys()
    assert any("experts" in key for key in mine)
    for key, grad in theirs.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(mine[key], grad, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mixed_greedy_generation_equals_peft(family: str) -> None:
    base, _ = build(family)
    tokenizer = make_tokenizer()
    references = {"x": peft_with(base, EVERY_TENSOR, "x", std=0.5)}
    ours = ours_like(base, references, family)
    prompts = ["add 3 4=", "hello, how are you?"]
    requests = [(prompt, name) for prompt in prompts for name in ("x", None)]
    outputs = generate(ours, tokenizer, requests, SamplingParams(max_new_tokens=8))
    for out in outputs:
        with torch.no_grad():
            expected = peft_greedy(
                references["x"], tokenizer, out.request.prompt, out.request.adapter, 8
            )
        assert out.token_ids == expected[: len(out.token_ids)], out.request
        assert len(out.token_ids) == len(expected) or expected[len(out.token_ids) - 1] == 2
    assert len({tuple(o.token_ids) for o in outputs if o.request.prompt == prompts[1]}) > 1


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_adapter_with_another_equals_each_alone(family: str) -> None:
    """x adapts attention, experts and router; y attention only, with dropout (its own stream):
    together in one packed pass, each gets the loss and gradients it gets alone."""
    base, _ = build(family)
    both = MultiLoraModel(base)
    both.add_adapter("x", spec(EVERY_TENSOR))
    both.add_adapter(
        "y", LoraSpec(r=2, scaling=1.0, dropout=0.3, target_modules=("q_proj", "v_proj"))
    )
    randomise(both)
    both.train()
    rows = {
        "x": [
            TokenizedRow(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17))),
            TokenizedRow(list(range(20, 25)), [IGNORE_INDEX] * 2 + list(range(22, 25))),
        ],
        "y": [TokenizedRow(list(range(30, 39)), [IGNORE_INDEX] * 3 + list(range(33, 39)))],
    }

    def losses_and_grads(model: MultiLoraModel, groups: list) -> tuple[list, dict]:
        for name in model.specs:
            model.context.generators.seed(name, 5)
        model.zero_grad(set_to_none=True)
        losses = model.segment_losses(collate(groups, pad_token_id=0, packed=True))
        losses.sum().backward()
        return losses.detach(), {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }

    alone = {name: copy.deepcopy(both) for name in rows}
    alone["x"].remove_adapter("y")
    alone["y"].remove_adapter("x")
    together_losses, together_grads = losses_and_grads(both, list(rows.items()))
    for index, (name, model) in enumerate(alone.items()):
        losses, grads = losses_and_grads(model, [(name, rows[name])])
        torch.testing.assert_close(together_losses[index], losses[0], rtol=1e-5, atol=1e-6)
        assert grads and (name == "y" or any("experts" in key for key in grads))
        for key, grad in grads.items():
            torch.testing.assert_close(together_grads[key], grad, rtol=1e-5, atol=1e-5, msg=key)


def test_trained_experts_adapter_is_saved_in_a_form_peft_loads(tmp_path: Path) -> None:
    """A Mixtral base: one adapter on attention + experts + router, another on attention with
    dropout, trained together; PEFT loads the first from its folder and computes what mlora
    computes."""
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    raw = {
        "cutoff_len": 64,
        "lora": [
            {"name": "moe", "data": write_json(tmp_path / "add.json", addition_rows(8)),
             "prompt": template, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "v_proj"], "target_parameters": list(EVERY_TENSOR),
             "batch_size": 4, "num_epochs": 1, "optim": "sgd", "lr": 0.5},
            {"name": "attn", "data": write_json(tmp_path / "rev.json", reverse_rows(8)),
             "prompt": template, "r": 2, "lora_dropout": 0.1, "batch_size": 4, "num_epochs": 1},
        ],
    }  # fmt: skip
    trainer = run_in_memory(lambda: build("mixtral")[0], tokenizer, raw, tmp_path / "out")
    config, tensors = read_adapter(tmp_path / "out" / "moe")
    assert sorted(config["target_parameters"]) == sorted(EVERY_TENSOR)
    assert any("experts.base_layer.lora_B" in key for key in tensors)
    trained = adapter_tensors(trainer, "moe")
    assert all(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)  # B moved from 0
    peft_model = PeftModel.from_pretrained(build("mixtral")[0], tmp_path / "out" / "moe").eval()
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    model = trainer.model.eval()
    with torch.no_grad():
        ours = model(ids, mask, BatchLayout.from_row_adapters(["moe", "moe"])).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    saved_spec = spec_from_peft_config(config, "moe")
    trained_spec = trainer.model.specs["moe"]  # what --load_adapter and load_trained read:
    assert sorted(saved_spec.target_parameters) == sorted(trained_spec.target_parameters)
    assert (saved_spec.r, saved_spec.scaling) == (trained_spec.r, trained_spec.scaling)
    reloaded = MultiLoraModel(build("mixtral")[0])
    reloaded.add_adapter("moe", saved_spec)
    load_adapter_weights(reloaded, "moe", tensors, "moe")
    assert max_relative_difference(adapter_tensors_of(reloaded, "moe"), trained) == 0
    # continuing it (--load_adapter) without its tensors would drop their LoRA: refused
    del raw["lora"][0]["target_parameters"]
    with pytest.raises(MloraError, match=r"target_parameters is \[\] in the config but"):
        run_in_memory(
            lambda: build("mixtral")[0], tokenizer, raw, tmp_path / "again",
            init_from={"moe": tmp_path / "out" / "moe"},
        )  # fmt: skip


def adapter_tensors_of(model: MultiLoraModel, name: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{pname}": p.detach()
        for path, module in model.adapter_modules(name)
        for pname, p in module.named_parameters()
    }


def tiny_gpt_oss() -> torch.nn.Module:
    config = transformers.GptOssConfig(
        vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["full_attention"] * 2,
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


REFUSALS = [  # (model, spec, what the one line must say)
    ("mixtral", LoraSpec(r=2, scaling=1.0, target_modules=("q_proj", "experts")),
     r"cannot adapt model\.layers\.0\.mlp\.experts \(MixtralExperts\).*target_parameters "
     r"\(experts\.gate_up_proj, experts\.down_proj\)"),
    ("mixtral", LoraSpec(r=2, scaling=1.0, target_modules=("gate",)),
     r"cannot adapt model\.layers\.0\.mlp\.gate \(MixtralTopKRouter\).*gate\.weight"),
    ("gpt_oss", spec(("experts.gate_up_proj",)),
     r"cannot adapt model\.layers\.0\.mlp\.experts\.gate_up_proj: GptOssExperts is not a fused "
     r"experts layout"),
    ("mixtral", spec(("experts.up_proj",)),
     r"'experts\.up_proj' matches no parameter of MixtralForCausalLM \(its expert and router "
     r"parameters: .*experts\.down_proj"),
    ("mixtral", spec(("q_proj.weight",)),
     r"q_proj\.weight is the weight of a linear layer.*name 'q_proj' in target_modules"),
    ("mixtral", LoraSpec(r=2, scaling=1.0, dropout=0.1, target_parameters=("gate.weight",)),
     r"lora_dropout does not apply with target_parameters"),
]  # fmt: skip


@pytest.mark.parametrize(("family", "bad", "message"), REFUSALS)
def test_unsupported_layouts_are_refused_in_one_line_before_anything_changes(
    family: str, bad: LoraSpec, message: str
) -> None:
    base = tiny_gpt_oss() if family == "gpt_oss" else build(family)[0]
    model = MultiLoraModel(base)
    model.add_adapter(
        "ok", spec(("experts.down_proj",)) if family != "gpt_oss" else LoraSpec(2, 1.0)
    )
    before = {n: p.clone() for n, p in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(MloraError, match=message) as caught:
        model.add_adapter("bad", bad)
    assert "\n" not in str(caught.value)
    assert "bad" not in model.specs and [type(m) for m in model.modules()] == modules
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"lora_dropout": 0.05}, r"key 'lora_dropout' must be 0 with 'target_parameters'"),
        ({"lora_dropout": 0, "use_dora": True}, r"key 'use_dora' must be false"),
        ({"lora_dropout": 0, "routing_strategy": "mola", "num_experts": 2},
         r"'target_parameters' applies to plain LoRA, not routing_strategy 'mola'"),
        ({"target_parameters": []}, r"key 'target_parameters' must be a non-empty list"),
    ],
)  # fmt: skip
def test_config_refuses_what_peft_cannot_load(keys: dict, message: str) -> None:
    entry = {"name": "a", "data": "x.json", "target_parameters": ["experts.down_proj"], **keys}
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config({"lora": [entry]})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("family", "parameters", "message"),
    [
        ("mixtral", ["experts.up_proj"], "'experts.up_proj' matches no parameter"),
        ("gpt_oss", ["experts.down_proj"], "GptOssExperts is not a fused experts layout"),
    ],
)
def test_mlora_py_refuses_a_layout_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch, family: str, parameters: list[str], message: str
) -> None:
    """Through ``mlora.py``: one line naming the config, adapter and tensor, exit code 2,
    checked on the model built from its config alone (no weights read, nothing written)."""
    model_dir = tmp_path / family
    (tiny_gpt_oss() if family == "gpt_oss" else build(family)[0]).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)

    def read_weights(*args, **kwargs):
        pytest.fail("the base model's weights were read before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", read_weights)
    entry = {"name": "moe", "data": write_json(tmp_path / "add.json", addition_rows(4)),
             "lora_dropout": 0, "target_parameters": parameters}  # fmt: skip
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lora": [entry]}))
    out = tmp_path / "out"
    args = ["--base_model", str(model_dir), "--config", str(config), "--dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {config}: adapter 'moe': target_parameters: ")
    assert message in err[-1] and not any("Traceback" in line for line in err)
    assert not (out / "moe").exists()


def test_mlora_py_trains_an_experts_adapter(tmp_path: Path) -> None:
    """The whole command on a saved Mixtral: the preflight check passes, the folder loads."""
    model_dir = tmp_path / "mixtral"
    build("mixtral")[0].save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    entry = {"name": "moe", "data": write_json(tmp_path / "add.json", addition_rows(4)),
             "prompt": write_template(tmp_path), "batch_size": 2, "num_epochs": 1,
             "lora_dropout": 0, "target_parameters": list(EVERY_TENSOR)}  # fmt: skip
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"cutoff_len": 32, "lora": [entry]}))
    out = tmp_path / "out"
    assert main(["--base_model", str(model_dir), "--config", str(config), "--dir", str(out)]) == 0
    peft_model = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir), out / "moe"
    )
    assert sorted(peft_model.peft_config["default"].target_parameters) == sorted(EVERY_TENSOR)
    assert any("experts" in n and "lora_B" in n for n, _ in peft_model.named_parameters())
    # and generate.py's loader reads it back: greedy answers equal PEFT's
    model, tokenizer = load_trained(str(model_dir), {"moe": out / "moe"})
    outputs = generate(model, tokenizer, [("add 1 2=", "moe")], SamplingParams(max_new_tokens=6))
    with torch.no_grad():
        expected = peft_greedy(peft_model.eval(), tokenizer, "add 1 2=", "default", 6)
    assert outputs[0].token_ids == expected[: len(outputs[0].token_ids)]


def test_experts_adapter_resumes_exactly(tmp_path: Path) -> None:
    """Killed mid-run and ``--resume``d: the experts + router adapter (and an attention adapter
    with dropout beside it) equal the uninterrupted run."""
    model_dir = tmp_path / "mixtral"
    build("mixtral")[0].save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    template = write_template(tmp_path)
    entries = [
        {"name": "moe", "data": write_json(tmp_path / "add.json", addition_rows(8)),
         "prompt": template, "batch_size": 2, "num_epochs": 1, "lora_dropout": 0,
         "target_parameters": list(EVERY_TENSOR)},
        {"name": "attn", "data": write_json(tmp_path / "rev.json", reverse_rows(8)),
         "prompt": template, "batch_size": 2, "num_epochs": 1, "lora_dropout": 0.1},
    ]  # fmt: skip
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"cutoff_len": 32, "save_step": 1, "lora": entries}))
    clean, cut = train_killed_then_resumed(config, model_dir, tmp_path)
    for name in ("moe", "attn"):
        resumed, uninterrupted = read_adapter(cut / name)[1], read_adapter(clean / name)[1]
        assert max_relative_difference(resumed, uninterrupted) <= 1e-6, name
