"""Training an adapter alongside others gives the same weights as training it alone (fp32).

The property holds with everything that draws randomness or crosses segments switched ON:
dropout (each adapter draws from its own stream), ``lm_head`` among the targets (its pass has its
own layout over the supervised positions), MixLoRA router jitter and expert dropout, gradient
checkpointing recomputation, packing, and an interrupted run resumed from its checkpoint.
Token-weighted accumulation makes ``micro_batch_size`` change memory, not the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlora.persistence.adapter_files import read_adapter
from tests.conftest import make_model, make_tokenizer
from tests.helpers import (
    adapter_tensors,
    addition_rows,
    max_relative_difference,
    reverse_rows,
    run_in_memory,
    train_killed_then_resumed,
    write_json,
    write_template,
)


def adapters(tmp_path: Path) -> list[dict]:
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(16))
    rev = write_json(tmp_path / "rev.json", reverse_rows(12))
    common = {"prompt": template, "lora_dropout": 0.1, "lr": 5e-3}
    return [
        {"name": "plain", "data": add, "r": 4, "batch_size": 8, "micro_batch_size": 4,
         "num_epochs": 2, "shuffle": True,
         "target_modules": ["q_proj", "v_proj", "lm_head"], **common},
        {"name": "dora", "data": rev, "r": 2, "batch_size": 4, "num_epochs": 1, "use_dora": True,
         "target_modules": ["q_proj", "v_proj", "down_proj"], "group_by_length": True, **common},
        {"name": "rslora", "data": rev, "r": 8, "batch_size": 6, "micro_batch_size": 3,
         "num_epochs": 1, "use_rslora": True, "optim": "sgd", "momentum": 0.9,
         "loraplus_lr_ratio": 4.0, "scheduler_type": "linear", "warmup_steps": 2, **common},
        {"name": "mix", "data": add, "r": 4, "batch_size": 4, "num_epochs": 1,
         "routing_strategy": "mixlora", "num_experts": 3, "top_k": 2, "jitter_noise": 0.1,
         "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], **common,
         "optim": "sgd", "lr": 0.05},
    ]  # fmt: skip


def factory():
    return make_model(vocab_size=len(make_tokenizer()))


@pytest.mark.parametrize(
    ("simultaneous", "checkpoint"), [(None, "none"), (2, "none"), (None, "recompute")]
)
def test_concurrent_equals_isolated(
    tmp_path: Path, simultaneous: int | None, checkpoint: str
) -> None:
    tokenizer = make_tokenizer()
    specs = adapters(tmp_path)
    shared = {"cutoff_len": 64, "gradient_checkpoint": checkpoint}
    together = run_in_memory(
        factory,
        tokenizer,
        {**shared, "train_lora_simultaneously_num": simultaneous, "lora": specs},
        tmp_path / "together",
    )
    assert together.model.packing  # the tiny LLaMA packs exactly: "auto" turned packing on
    assert_each_trains_as_alone(together, specs, factory, tokenizer, shared, tmp_path / "alone")


def assert_each_trains_as_alone(
    together, specs: list[dict], factory, tokenizer, shared: dict, folder: Path
) -> None:
    """Each adapter of ``together`` equals the same adapter trained alone (fp32 AdamW: 1e-4),
    and training moved it away from its (B = 0) start."""
    for spec in specs:
        alone = run_in_memory(factory, tokenizer, {**shared, "lora": [spec]}, folder)
        name = spec["name"]
        difference = max_relative_difference(
            adapter_tensors(together, name), adapter_tensors(alone, name)
        )
        assert difference <= 1e-4, f"{name}: {difference}"
        assert any(
            t.abs().sum() > 0 for k, t in adapter_tensors(alone, name).items() if "lora_B" in k
        )


def test_dropout_really_draws_per_adapter(tmp_path: Path) -> None:
    """The streams are live: another seed gives other masks (so equality above is not luck of
    a disabled dropout), while the global RNG state plays no part."""
    tokenizer = make_tokenizer()
    spec = adapters(tmp_path)[0]
    config = {"cutoff_len": 64, "lora": [spec]}
    first = adapter_tensors(run_in_memory(factory, tokenizer, config, tmp_path / "a"), "plain")
    torch.manual_seed(12345)  # a different global RNG state: no effect
    again = adapter_tensors(run_in_memory(factory, tokenizer, config, tmp_path / "b"), "plain")
    assert max_relative_difference(again, first) == 0
    reseeded = run_in_memory(factory, tokenizer, config, tmp_path / "c", seed=8)
    assert max_relative_difference(adapter_tensors(reseeded, "plain"), first) > 1e-3


def test_micro_batch_size_changes_memory_not_the_result(tmp_path: Path) -> None:
    """Rows of unequal length, dropout off (masks differ with the micro-batch shapes): micro
    batches of 1, 2 and the whole batch give the same weights after several steps. (SGD: Adam
    would turn last-bit noise in tiny gradient entries into full steps; test_peft_reference
    checks an AdamW trajectory with micro-batches against PEFT.)"""
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    rows = [  # lengths differ a lot, so per-micro-batch means would weigh tokens unequally
        {"instruction": "Echo.", "input": "x" * (1 + 7 * (i % 4)), "output": "y" * (1 + 5 * i)}
        for i in range(8)
    ]
    data = write_json(tmp_path / "uneven.json", rows)
    results = {}
    for micro in (1, 2, 4):
        spec = {"name": "a", "data": data, "prompt": template, "r": 4, "batch_size": 4,
                "micro_batch_size": micro, "num_epochs": 2, "shuffle": False,
                "lora_dropout": 0.0, "optim": "sgd", "momentum": 0.9, "lr": 0.5}  # fmt: skip
        trainer = run_in_memory(
            factory, tokenizer, {"cutoff_len": 96, "lora": [spec]}, tmp_path / f"m{micro}"
        )
        results[micro] = adapter_tensors(trainer, "a")
    assert max_relative_difference(results[1], results[4]) <= 1e-5
    assert max_relative_difference(results[2], results[4]) <= 1e-5


def test_resume_with_dropout_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Killed mid-run, then ``--resume``: every adapter (dropout, jitter, lm_head) equals the
    uninterrupted run: the adapters' random streams are part of the checkpoint."""
    specs = adapters(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cutoff_len": 64, "save_step": 1, "lora": specs}))
    clean_dir, cut_dir = train_killed_then_resumed(path, tiny_model_dir, tmp_path)
    for spec in specs:
        clean = read_adapter(clean_dir / spec["name"])[1]
        resumed = read_adapter(cut_dir / spec["name"])[1]
        assert max_relative_difference(resumed, clean) <= 1e-6, spec["name"]
