"""Config validation: one line naming the key; shipped configs validate; README is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora.config.schema import (
    AdapterConfig,
    TrainConfig,
    config_to_dict,
    describe_keys,
    load_config,
    parse_config,
)
from mlora.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def one(**adapter) -> dict:
    return {"lora": [{"name": "a", "data": "d.json", **adapter}]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (one(learning_rate=1e-3), "adapter 'a': unknown key 'learning_rate' (did you mean 'lr'?)"),
        (one(r=0), "adapter 'a': key 'r' must be an integer >= 1, got 0"),
        (one(r="8"), "key 'r' must be an integer >= 1, got \"8\""),
        (one(lr=0), "key 'lr' must be a number > 0, got 0"),
        (one(lora_dropout=1.0), "key 'lora_dropout' must be a number in [0, 1)"),
        (
            one(batch_size=6, micro_batch_size=4),
            "'micro_batch_size' (4) must divide 'batch_size' (6)",
        ),
        (one(optim="adam"), "key 'optim' must be one of 'adamw', 'sgd'"),
        (one(scheduler_type="nope"), "key 'scheduler_type' must be one of"),
        (one(target_modules=[]), "key 'target_modules' must be a non-empty list"),
        (one(target_modules={"q_proj": False}), "at least one module set to true"),
        (one(use_dora="yes"), "key 'use_dora' must be true or false"),
        (one(name="a/b"), "key 'name' must be a name usable as a folder name and a module key"),
        (one(name="math-v1.5"), "module key on every platform: without '.', got \"math-v1.5\""),
        (one(name="a:b?"), "without ':', '?'"),
        (one(name="con"), "not a name Windows reserves for a device (CON)"),
        (one(name="chat "), "without leading or trailing spaces"),
        (one(name="x" * 65), "at most 64 characters long (it is 65)"),
        (one(name="forward"), "not 'forward', which torch modules use for an attribute"),
        (one(name="tab\there"), "without '\\t'"),
        (one(name=""), "a non-empty string"),
        ({"lora": [{"name": "a"}]}, "adapter 'a': missing required key 'data'"),
        (
            {"lora": [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]},
            "duplicate adapter name 'a'",
        ),
        ({"lora": []}, "key 'lora' must be a non-empty list"),
        ({**one(), "cutof_len": 3}, "unknown key 'cutof_len' (did you mean 'cutoff_len'?)"),
        ({**one(), "loss_chunk_mb": -1}, "key 'loss_chunk_mb' must be a number >= 0, got -1"),
        (
            {**one(), "train_strategy": "fast"},
            "key 'train_strategy' must be one of 'optim', 'none'",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(raw, "c.json")
    text = str(error.value)
    assert message in text and text.startswith("c.json") and "\n" not in text


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{\n  "lora": [\n    {"name": "a",}\n  ]\n}')
    with pytest.raises(ConfigError, match=r"c.json: invalid JSON at line 3"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.json")


def test_defaults_and_derived_values() -> None:
    config = parse_config(
        one(target_modules={"q_proj": True, "v_proj": False}, use_rslora=True, r=4)
    )
    adapter = config.lora[0]
    assert adapter.micro_batch_size == adapter.batch_size and adapter.accumulation_steps == 1
    assert adapter.target_module_names == ["q_proj"]
    assert adapter.scaling == adapter.lora_alpha / 2
    assert parse_config(config_to_dict(config)) == config


def shipped_configs() -> list[Path]:
    return sorted((ROOT / "config").glob("*.json")) + sorted(
        (ROOT / "mlora" / "adapters").glob("*/templates/*.json")
    )


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path: Path) -> None:
    raw = json.loads(path.read_text())
    for adapter in raw.get("lora", []):
        adapter.setdefault("name", "x")
        adapter.setdefault("data", "x.json")
    config = parse_config(raw, str(path))
    assert [a.name for a in config.lora] == [a["name"] for a in raw.get("lora", [])]


def test_readme_documents_every_key() -> None:
    readme = (ROOT / "README.md").read_text()
    for cls in (TrainConfig, AdapterConfig):
        for key, _, _ in describe_keys(cls):
            assert f"| `{key}` |" in readme, f"README's config reference lacks {key}"


def test_cutoff_len_past_the_base_models_positions_warns(tiny_model_dir, caplog):
    import logging

    from mlora.training.preflight import check_cutoff_len

    def config(cutoff_len: int):
        return parse_config({"cutoff_len": cutoff_len, "lora": [{"name": "a", "data": "x"}]}, "c")

    with caplog.at_level(logging.WARNING, logger="mlora"):
        check_cutoff_len(config(512), str(tiny_model_dir))  # the tiny model's 512 positions
        assert not caplog.records
        check_cutoff_len(config(513), str(tiny_model_dir))
    assert "key 'cutoff_len' (513) exceeds the base model's max_position_embeddings (512)" in (
        caplog.records[0].getMessage()
    )
