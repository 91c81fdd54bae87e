"""LoRAMoE / MoLA adapters in a model: concurrent equals alone, save -> load round trip, errors,
and a short run through ``mlora.py`` next to a plain LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlora.adapters.lora_moe.layer import LoraMoeAdapter, MolaAdapter
from mlora.batching.layout import BatchLayout
from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError, MloraError
from mlora.inference.generation import SamplingParams, generate
from mlora.inference.trained import attach_adapter
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.trainer import Trainer, prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    write_json,
    write_template,
)

ROOT = Path(__file__).resolve().parents[1]


def moe_adapters(tmp_path: Path) -> list[dict]:
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(12))
    rev = write_json(tmp_path / "rev.json", reverse_rows(8))
    common = {"prompt": template, "lora_dropout": 0.1, "lr": 1e-2, "num_epochs": 1}
    return [
        {"name": "plain", "data": add, "r": 4, "batch_size": 4, **common},
        {"name": "loramoe", "data": rev, "r": 2, "batch_size": 4, "micro_batch_size": 2,
         "routing_strategy": "loramoe", "num_experts": 3,
         "target_modules": ["q_proj", "gate_proj", "down_proj"], **common,
         "optim": "sgd", "momentum": 0.9, "lr": 0.05},
        {"name": "mola", "data": add, "r": 2, "batch_size": 4, "routing_strategy": "mola",
         "num_experts": 4, "top_k": 2, "router_loss": True, "router_aux_loss_coef": 0.01,
         "use_dora": True, "target_modules": ["v_proj", "up_proj"], **common,
         "optim": "sgd", "momentum": 0.9, "lr": 0.05},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def together(tmp_path_factory: pytest.TempPathFactory):
    """(folder, trainer): a LoRA, a LoRAMoE and a MoLA adapter trained side by side and saved."""
    tmp_path = tmp_path_factory.mktemp("linear-moe")
    tokenizer = make_tokenizer()
    specs = moe_adapters(tmp_path)
    trainer = run_in_memory(
        lambda: make_model(vocab_size=len(tokenizer)),
        tokenizer,
        {"cutoff_len": 48, "lora": specs},
        tmp_path / "out",
    )
    return tmp_path, trainer


def test_concurrent_equals_isolated(together) -> None:
    # SGD for the MoE adapters: Adam turns last-bit noise in near-zero gradients (experts the
    # router barely uses) into full-size steps, which would test Adam, not our gradients.
    tmp_path, trainer = together
    tokenizer = make_tokenizer()
    for spec in moe_adapters(tmp_path)[1:]:
        alone = run_in_memory(
            lambda: make_model(vocab_size=len(tokenizer)),
            tokenizer,
            {"cutoff_len": 48, "lora": [spec]},
            tmp_path / "alone",
        )
        name = spec["name"]
        ours, reference = adapter_tensors(trainer, name), adapter_tensors(alone, name)
        assert max_relative_difference(ours, reference) <= 1e-4, name
        moved = [k for k, t in reference.items() if "experts." in k and "lora_B" in k and t.any()]
        assert moved, f"{name}: no expert was trained"
        assert any("moe_gate" in k for k in reference)
    layers = dict(trainer.model.adapter_modules("loramoe"))
    assert isinstance(layers["model.layers.0.mlp.gate_proj"], LoraMoeAdapter)
    assert not isinstance(layers["model.layers.0.self_attn.q_proj"], LoraMoeAdapter)  # plain LoRA
    mola = dict(trainer.model.adapter_modules("mola")).values()
    assert all(isinstance(m, MolaAdapter) for m in mola)


def test_save_load_round_trip_gives_equal_logits(together) -> None:
    tmp_path, trainer = together
    tokenizer = make_tokenizer()
    config = json.loads((tmp_path / "out" / "mola" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOLA" and config["num_experts"] == 4 and config["top_k"] == 2
    saved = json.loads((tmp_path / "out" / "loramoe" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAMOE" and saved["routing_strategy"] == "loramoe"
    assert (tmp_path / "out" / "mola" / "adapter_model.bin").is_file()  # upstream's loader

    loaded = MultiLoraModel(make_model(vocab_size=len(tokenizer))).eval()
    names = ["plain", "loramoe", "mola"]
    for name in names:
        attach_adapter(loaded, name, tmp_path / "out" / name)
    trainer.model.eval()
    ids = torch.randint(4, len(tokenizer), (6, 10))
    mask = torch.ones_like(ids)
    layout = BatchLayout.from_row_adapters([n for n in names for _ in range(2)])
    with torch.no_grad():
        expected = trainer.model(ids, mask, layout).logits
        got = loaded(ids, mask, layout).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base = loaded(ids, mask, BatchLayout.from_row_adapters([None] * 6)).logits
    assert (got[2:] - base[2:]).abs().max() > 1e-4  # the MoE adapters do change the output
    assert not any(m.training for n in names[1:] for _, m in loaded.adapter_modules(n))

    # --load_adapter: a new run continues from the saved weights
    config = parse_config({"cutoff_len": 48, "lora": moe_adapters(tmp_path)[1:]})
    continued = Trainer(
        MultiLoraModel(make_model(vocab_size=len(tokenizer))),
        tokenizer,
        config,
        prepare_data(config, tokenizer),
        tmp_path / "continued",
        init_from={n: tmp_path / "out" / n for n in names[1:]},
    )
    for name in names[1:]:
        assert (
            max_relative_difference(
                adapter_tensors(continued, name), adapter_tensors(trainer, name)
            )
            == 0
        )

    # generation (KV cache, one token per step) equals greedy decoding by full forwards
    prompts = [("rev cat=", "mola"), ("rev owl=", "loramoe")]
    outputs = generate(loaded, tokenizer, prompts, SamplingParams(max_new_tokens=6))
    for (prompt, adapter), output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        for _ in range(len(output.token_ids)):
            layout = BatchLayout.from_row_adapters([adapter])
            with torch.no_grad():
                logits = loaded(ids, torch.ones_like(ids), layout).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, -len(output.token_ids) :].tolist() == output.token_ids


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"routing_strategy": "mola", "num_experts": 2, "top_k": 3}, "'top_k'"),
        ({"routing_strategy": "loramoe", "num_experts": 2, "router_loss": True}, "'router_loss'"),
        ({"routing_strategy": "loramoe"}, "'num_experts'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"lora": [{"name": "m", "data": "x.json", **extra}]})


def test_loramoe_needs_an_ffn_target() -> None:
    from mlora.adapters.lora_moe.spec import linear_moe_spec

    config = parse_config(
        {"lora": [{"name": "m", "data": "x.json", "routing_strategy": "loramoe",
                   "num_experts": 2, "target_modules": ["q_proj", "v_proj"]}]}
    ).lora[0]  # fmt: skip
    model = MultiLoraModel(make_model())
    with pytest.raises(MloraError, match="'target_modules'"):
        model.add_adapter("m", linear_moe_spec(config))
    assert not list(model.adapter_modules("m")) and "m" not in model.specs


def test_mlora_py_trains_loramoe_and_mola_next_to_lora(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    specs = moe_adapters(tmp_path)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"cutoff_len": 48, "log_step": 1, "lora": specs}))
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "mlora.py"), "--base_model", str(tiny_model_dir)]
    command += ["--config", str(config), "--dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| mola | expert load" in result.stderr and "| loramoe | expert load" in result.stderr
    for name in ("plain", "loramoe", "mola"):
        assert (out / name / "adapter_model.safetensors").is_file()


def test_recompute_checkpointing_keeps_mola_router_loss(tmp_path: Path) -> None:
    """Per-layer recomputation gives the same MoLA training (aux loss included) as none."""
    tokenizer = make_tokenizer()
    spec = moe_adapters(tmp_path)[2]
    runs = [
        run_in_memory(
            lambda: make_model(vocab_size=len(tokenizer)),
            tokenizer,
            {"cutoff_len": 48, "gradient_checkpoint": mode, "lora": [spec]},
            tmp_path / mode,
        )
        for mode in ("none", "recompute")
    ]
    tensors = [adapter_tensors(run, "mola") for run in runs]
    assert max_relative_difference(*tensors) <= 1e-6
