"""Training an adapter alongside others gives the same weights as training it alone (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def adapters(tmp_path: Path) -> list[dict]:
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(16))
    rev = write_json(tmp_path / "rev.json", reverse_rows(12))
    common = {"prompt": template, "lora_dropout": 0.0, "lr": 5e-3}
    return [
        {"name": "plain", "data": add, "r": 4, "batch_size": 8, "micro_batch_size": 4,
         "num_epochs": 2, "shuffle": True, **common},
        {"name": "dora", "data": rev, "r": 2, "batch_size": 4, "num_epochs": 1, "use_dora": True,
         "target_modules": ["q_proj", "v_proj", "down_proj"], "group_by_length": True, **common},
        {"name": "rslora", "data": rev, "r": 8, "batch_size": 6, "micro_batch_size": 3,
         "num_epochs": 1, "use_rslora": True, "optim": "sgd", "momentum": 0.9,
         "loraplus_lr_ratio": 4.0, "scheduler_type": "linear", "warmup_steps": 2, **common},
    ]  # fmt: skip


@pytest.mark.parametrize("simultaneous", [None, 2])
def test_concurrent_equals_isolated(tmp_path: Path, simultaneous: int | None) -> None:
    tokenizer = make_tokenizer()

    def factory():
        return make_model(vocab_size=len(tokenizer))

    specs = adapters(tmp_path)
    together = run_in_memory(
        factory,
        tokenizer,
        {"cutoff_len": 64, "train_lora_simultaneously_num": simultaneous, "lora": specs},
        tmp_path / "together",
    )
    for spec in specs:
        alone = run_in_memory(
            factory, tokenizer, {"cutoff_len": 64, "lora": [spec]}, tmp_path / "alone"
        )
        name = spec["name"]
        difference = max_relative_difference(
            adapter_tensors(together, name), adapter_tensors(alone, name)
        )
        assert difference <= 1e-4, f"{name}: {difference}"
        # and training did move the adapter away from its (B = 0) start
        assert any(
            t.abs().sum() > 0 for k, t in adapter_tensors(alone, name).items() if "lora_B" in k
        )
