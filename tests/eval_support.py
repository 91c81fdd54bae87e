"""Trained adapters on disk for the generation / evaluation / inference tests (trained once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora.api import train
from mlora.config.schema import parse_config

TEMPLATE = {"prompt_input": "{instruction} {input}=", "prompt_no_input": "{instruction}="}
WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "owl", "ant", "bee", "yak"]


def task_rows(task: str) -> list[dict]:
    if task == "add":
        return [
            {"instruction": "add", "input": f"{a} {b}", "output": str(a + b)}
            for a, b in ((i % 7, (3 * i) % 5) for i in range(16))
        ]
    if task == "rev":
        return [{"instruction": "rev", "input": w, "output": w[::-1]} for w in WORDS]
    if task == "up":
        return [{"instruction": "up", "input": w, "output": w.upper()} for w in WORDS]
    return [{"instruction": "dup", "input": w, "output": w + w} for w in WORDS]


ADAPTERS = ("add", "rev", "up", "dup")
_CACHE: dict[str, tuple[Path, dict]] = {}


def trained_run(model_dir: Path, root: Path) -> tuple[Path, dict]:
    """Train four small adapters with ``mlora.train``; returns (output dir, raw config)."""
    key = str(model_dir)
    if key in _CACHE:
        return _CACHE[key]
    root.mkdir(parents=True, exist_ok=True)
    template = root / "template.json"
    template.write_text(json.dumps(TEMPLATE), encoding="utf-8")
    adapters = []
    for i, name in enumerate(ADAPTERS):
        data = root / f"{name}.json"
        data.write_text(json.dumps(task_rows(name)), encoding="utf-8")
        adapters.append(
            {
                "name": name,
                "data": str(data),
                "test_data": str(data),
                "prompt": str(template),
                "r": 4 + 2 * i,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"][: 2 + i % 3],
                "use_dora": name == "dup",
                "batch_size": 8,
                "num_epochs": 1,
                "lr": 2e-3,
                "evaluate_batch_size": 4,
            }
        )
    raw = {"cutoff_len": 32, "log_step": 100, "lora": adapters}
    out = root / "out"
    train(parse_config(raw, "test-config"), base_model=str(model_dir), output_dir=out, seed=3)
    _CACHE[key] = (out, raw)
    return out, raw


@pytest.fixture(scope="session")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return trained_run(tiny_model_dir, tmp_path_factory.getbasetemp() / "trained-adapters")
