"""Saved adapters are PEFT format: PEFT loads them and computes what mlora computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from mlora.adapters.spec import LoraSpec
from mlora.batching.layout import BatchLayout
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import (
    load_adapter_weights,
    peft_config,
    read_adapter,
    save_adapter,
    spec_from_peft_config,
)
from tests.conftest import make_model

SPECS = {  # the scaling PEFT will derive from lora_alpha and use_rslora (8/4; 8/sqrt(2))
    "lora": LoraSpec(
        r=4, scaling=2.0, target_modules=("q_proj", "v_proj", "down_proj"), lora_alpha=8.0
    ),
    "dora": LoraSpec(
        r=2,
        scaling=8 / 2**0.5,
        target_modules=("k_proj", "o_proj"),
        use_dora=True,
        lora_alpha=8.0,
        use_rslora=True,
    ),
}


def model_with_random_adapters() -> tuple[MultiLoraModel, torch.nn.Module]:
    base = make_model(vocab_size=64)
    model = MultiLoraModel(copy.deepcopy(base))
    torch.manual_seed(1)
    for name, spec in SPECS.items():
        model.add_adapter(name, spec)
        with torch.no_grad():
            for param in model.adapter_parameters(name):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval(), base


def test_peft_loads_our_adapters_and_gives_the_same_logits(tmp_path: Path) -> None:
    model, base = model_with_random_adapters()
    for name, spec in SPECS.items():
        save_adapter(model, name, tmp_path / name, peft_config(spec, "tiny"))

    ids = torch.randint(4, 64, (5, 9))
    mask = torch.ones_like(ids)
    rows = ["lora", "lora", "dora", None, "dora"]
    with torch.no_grad():
        mixed = model(ids, mask, BatchLayout.from_row_adapters(rows)).logits
    for name in SPECS:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        with torch.no_grad():
            expected = peft_model(input_ids=ids, attention_mask=mask).logits
        for i, row_adapter in enumerate(rows):
            if row_adapter == name:
                torch.testing.assert_close(mixed[i], expected[i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            mixed[3], base(input_ids=ids[3:4]).logits[0], rtol=1e-5, atol=1e-5
        )


def test_saved_files_use_peft_key_names_and_config(tmp_path: Path) -> None:
    model, _ = model_with_random_adapters()
    spec = SPECS["dora"]
    save_adapter(model, "dora", tmp_path, peft_config(spec, "tiny"))
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["use_rslora"]
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_round_trip_through_read_adapter(tmp_path: Path) -> None:
    model, base = model_with_random_adapters()
    spec = SPECS["lora"]
    save_adapter(model, "lora", tmp_path, peft_config(spec, "tiny"))
    config, tensors = read_adapter(tmp_path)
    loaded_spec = spec_from_peft_config(config, str(tmp_path))
    assert (loaded_spec.lora_alpha, loaded_spec.use_rslora, loaded_spec.scaling) == (
        8.0,
        False,
        2.0,
    )
    fresh = MultiLoraModel(copy.deepcopy(base))
    fresh.add_adapter("copy", loaded_spec)
    load_adapter_weights(fresh, "copy", tensors, str(tmp_path))
    for (_, a), (_, b) in zip(
        model.adapter_modules("lora"), fresh.adapter_modules("copy"), strict=True
    ):
        torch.testing.assert_close(a.lora_A.weight, b.lora_A.weight)
        torch.testing.assert_close(a.lora_B.weight, b.lora_B.weight)
    assert loaded_spec.scaling == spec.scaling
