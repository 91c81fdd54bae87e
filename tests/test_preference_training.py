"""Preference adapters, gradient clipping and max_steps in the real training loop.

- A DPO adapter trained beside two SFT adapters (dropout on, packing on) equals it alone.
- An adapter with ``max_grad_norm`` trained beside another equals PEFT + a plain PyTorch loop
  that clips with ``torch.nn.utils.clip_grad_norm_`` (SGD: equal math differs by ~1e-6).
- ``max_steps`` stops one adapter (its schedule spans those steps) while the others go on.
- Pairs stay together: every micro-batch of a preference adapter holds whole pairs.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from mlora.config.schema import parse_config
from mlora.data.preference import PAIR_ROWS
from mlora.data.rows import IGNORE_INDEX
from mlora.persistence.adapter_files import adapter_state_dict
from mlora.training.trainer import prepare_data
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
from tests.test_peft_reference import peft_initial_adapter


def preference_rows(count: int) -> list[dict]:
    """Sums: the chosen answer is right, the rejected one off by one."""
    return [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in ((i % 7, (3 * i) % 5) for i in range(count))
    ]


def factory():
    return make_model(vocab_size=len(make_tokenizer()))


def test_dpo_beside_two_sft_adapters_equals_it_alone(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    pairs = write_json(tmp_path / "pairs.json", preference_rows(12))
    add = write_json(tmp_path / "add.json", addition_rows(16))
    rev = write_json(tmp_path / "rev.json", reverse_rows(12))
    dpo = {
        "name": "dpo", "data": pairs, "objective": "dpo", "beta": 0.5, "r": 4,
        "lora_dropout": 0.1, "batch_size": 4, "micro_batch_size": 2, "num_epochs": 2,
        "lr": 5e-2, "optim": "sgd", "target_modules": ["q_proj", "v_proj", "lm_head"],
    }  # fmt: skip
    sft = [
        {"name": "add", "data": add, "prompt": template, "r": 4, "lora_dropout": 0.1,
         "batch_size": 8, "num_epochs": 2},
        {"name": "rev", "data": rev, "prompt": template, "r": 2, "lora_dropout": 0.1,
         "batch_size": 4, "num_epochs": 1},
    ]  # fmt: skip
    together = run_in_memory(factory, tokenizer, {"cutoff_len": 32, "lora": [dpo, *sft]},
                             tmp_path / "together")  # fmt: skip
    assert together.model.packing
    alone = run_in_memory(factory, tokenizer, {"cutoff_len": 32, "lora": [dpo]}, tmp_path / "a")
    ours, reference = adapter_tensors(together, "dpo"), adapter_tensors(alone, "dpo")
    assert max_relative_difference(ours, reference) <= 1e-5
    b_weights = [t for k, t in ours.items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b_weights) > 1e-3  # it trained (B started at 0)
    run = together.runs[0]
    assert run.steps_done == 6 and len(run.history) > 0
    for epoch in range(2):  # pairs kept whole: chosen and rejected share the prompt
        for mb in run.queue._build_epoch(epoch):
            assert len(mb.rows) % PAIR_ROWS == 0
            for chosen, rejected in zip(mb.rows[0::2], mb.rows[1::2], strict=True):
                start = chosen.completion_start
                assert start == rejected.completion_start
                assert chosen.input_ids[:start] == rejected.input_ids[:start]


def clipped_reference(model: torch.nn.Module, rows, pad_id: int, lr: float, norm: float) -> list:
    """PEFT + a plain loop: full batches of 4 rows in file order, SGD, clip_grad_norm_."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    model.train()
    norms = []
    for start in range(0, len(rows), 4):
        batch = rows[start : start + 4]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        for b, row in enumerate(batch):
            ids[b, : len(row)] = torch.tensor(row.input_ids)
            mask[b, : len(row)] = 1
            labels[b, : len(row)] = torch.tensor(row.labels)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="mean"
        )
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, norm)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def test_clipped_adapter_beside_another_equals_clip_grad_norm(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer))
    template = write_template(tmp_path)
    data = write_json(tmp_path / "add.json", addition_rows(16))
    other = write_json(tmp_path / "rev.json", reverse_rows(12))
    reference = peft_initial_adapter(base, "lora", tmp_path / "out" / "target")
    lr, norm = 0.5, 0.05
    raw = {
        "cutoff_len": 64,
        "lora": [
            {"name": "target", "data": data, "prompt": template, "r": 4, "lora_alpha": 8,
             "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"],
             "batch_size": 4, "micro_batch_size": 2, "num_epochs": 1, "shuffle": False,
             "optim": "sgd", "lr": lr, "max_grad_norm": norm},
            {"name": "other", "data": other, "prompt": template, "r": 2, "batch_size": 3,
             "num_epochs": 1, "max_grad_norm": 1e-3},
        ],
    }  # fmt: skip
    trainer = run_in_memory(
        lambda: copy.deepcopy(base), tokenizer, raw, tmp_path / "out",
        init_from={"target": tmp_path / "out" / "target"},
    )  # fmt: skip
    rows = prepare_data(parse_config(raw), tokenizer)["target"]
    norms = clipped_reference(reference, rows, tokenizer.pad_token_id, lr, norm)
    assert min(norms) > 2 * norm  # every step was clipped: the test covers the clipping
    ours = adapter_state_dict(trainer.model, "target")
    theirs = {k: v.detach() for k, v in get_peft_model_state_dict(reference).items()}
    assert max_relative_difference(ours, theirs) <= 1e-5


def test_max_steps_stops_one_adapter(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    template = write_template(tmp_path)
    add = write_json(tmp_path / "add.json", addition_rows(16))
    raw = {
        "cutoff_len": 64,
        "lora": [
            {"name": "short", "data": add, "prompt": template, "batch_size": 4,
             "micro_batch_size": 2, "num_epochs": 3, "max_steps": 5,
             "scheduler_type": "linear"},
            {"name": "long", "data": add, "prompt": template, "batch_size": 4, "num_epochs": 2},
        ],
    }  # fmt: skip
    trainer = run_in_memory(factory, tokenizer, raw, tmp_path / "out")
    short, long = trainer.runs
    assert (short.steps_done, long.steps_done) == (5, 8)
    assert short.queue.total_steps == 5 and short.queue.micro_steps_done == 10
    assert short.optimizer.param_groups[0]["lr"] == 0.0  # the linear schedule ended at step 5
    assert (tmp_path / "out" / "short" / "adapter_model.safetensors").is_file()


def test_evaluation_of_a_dpo_adapter_equals_its_rewards_under_peft(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Reward accuracy, margin and log-probs of a trained DPO adapter, against the PEFT model
    of its saved folder scored with TRL's ``get_batch_logps`` (reference: adapter disabled)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer

    from mlora.inference.evaluation import evaluate
    from mlora.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = preference_rows(12)
    data = write_json(tmp_path / "pairs.json", pairs[:8])
    test = write_json(tmp_path / "test.json", pairs[8:])
    beta = 0.5
    raw = {"cutoff_len": 32, "lora": [
        {"name": "dpo", "data": data, "test_data": test, "objective": "dpo", "beta": beta,
         "batch_size": 4, "num_epochs": 2, "lr": 5e-2, "optim": "sgd", "lora_dropout": 0.0},
    ]}  # fmt: skip

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    run_in_memory(load, tokenizer, raw, tmp_path / "out")
    result = evaluate(parse_config(raw), str(tiny_model_dir), tmp_path / "out", show=False)
    figures = result["dpo"].to_json()

    peft = PeftModel.from_pretrained(load(), tmp_path / "out" / "dpo").eval()
    rows = prepare_data(parse_config({**raw, "lora": [{**raw["lora"][0], "data": test}]}),
                        tokenizer)["dpo"]  # fmt: skip

    def logps(batch_rows: list) -> torch.Tensor:
        width = max(len(r) for r in batch_rows)
        ids = torch.full((len(batch_rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
        labels = torch.full((len(batch_rows), width), IGNORE_INDEX)
        for b, row in enumerate(batch_rows):
            ids[b, : len(row)] = torch.tensor(row.input_ids)
            mask[b, : len(row)] = 1
            labels[b, : len(row)] = torch.tensor(row.labels)
        logits = peft(ids, attention_mask=mask).logits
        return CPOTrainer.get_batch_logps(logits, labels)

    with torch.no_grad():
        chosen, rejected = logps(rows[0::2]), logps(rows[1::2])
        with peft.disable_adapter():
            ref_chosen, ref_rejected = logps(rows[0::2]), logps(rows[1::2])
    chosen_rewards, rejected_rewards = (
        beta * (chosen - ref_chosen),
        beta * (rejected - ref_rejected),
    )
    expected = {
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
        "chosen_logps": float(chosen.mean()),
        "rejected_logps": float(rejected.mean()),
    }
    for key, value in expected.items():
        assert abs(figures[key] - value) <= 1e-4, key
    assert figures["rows"] == 4 and figures["task"] == "dpo"


@pytest.mark.slow
def test_launch_gen_dpo_run_and_evaluate_offline(tmp_path: Path) -> None:
    """``launch.py gen --template dpo`` with the bundled pairs, ``run`` on the demo model, then
    ``evaluate``: the result file has the preference figures."""
    from tests.test_launch import REPO, launch_cli

    (tmp_path / "data").mkdir()
    for name in ("dummy_preference.json", "dummy_preference_test.json"):
        shutil.copy(REPO / "data" / name, tmp_path / "data" / name)
    home = tmp_path / "home"
    made = launch_cli(
        tmp_path, "gen", "--template", "dpo", "--tasks", "./data/dummy_preference.json",
        "--test_data", "./data/dummy_preference_test.json", "--learning_rate", "1e-3",
        home=home,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    ran = launch_cli(tmp_path, "run", home=home)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "dpo_0" / "adapter_model.safetensors").is_file()
    evaluated = launch_cli(tmp_path, "evaluate", home=home)
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads((tmp_path / "evaluate_result.json").read_text())["dpo_0"]
    assert figures["task"] == "dpo" and figures["rows"] == 6
    assert {"reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"} <= set(figures)
