"""A non-finite loss in one adapter stops that adapter only, through the real ``mlora.py``.

No test hook: the learning rate of 1e30 makes the adapter's weights overflow for real after its
first optimizer step, so its second step's loss is NaN. The other adapter must carry on and end
exactly as it would have trained alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlora.cli.train import main
from tests.conftest import make_model, make_tokenizer
from tests.helpers import addition_rows, reverse_rows, run_in_memory, write_json, write_template
from tests.reliability_support import mlora_args, run_mlora


def write_config(folder: Path, names: tuple[str, ...]) -> Path:
    template = write_template(folder)
    adapters = {
        "boom": {"name": "boom", "data": write_json(folder / "boom.json", reverse_rows(8)),
                 "prompt": template, "r": 2, "batch_size": 2, "num_epochs": 2, "lr": 1e30},
        "steady": {"name": "steady", "data": write_json(folder / "steady.json", addition_rows(8)),
                   "prompt": template, "r": 4, "batch_size": 2, "num_epochs": 1,
                   "lora_dropout": 0.0, "lr": 1e-2},
    }  # fmt: skip
    config = {"cutoff_len": 40, "save_step": 1, "lora": [adapters[n] for n in names]}
    path = folder / f"config-{'-'.join(names)}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_non_finite_loss_stops_one_adapter_and_the_others_carry_on(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "out"
    result = run_mlora(mlora_args(tiny_model_dir, write_config(tmp_path, ("boom", "steady")), out))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    match = re.fullmatch(
        r"error: adapter boom: non-finite loss at adapter step (\d+) \(global step (\d+)\); "
        r"stopped it, the others carry on; last good checkpoint: (.+)",
        errors[0],
    )
    assert match, errors[0]
    step, checkpoint = int(match.group(1)), Path(match.group(3))
    assert checkpoint == out / "boom" / f"checkpoint-{step - 1}"
    good = load_file(checkpoint / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())  # the bad step was never applied
    assert not (out / "boom" / "adapter_model.safetensors").exists()  # no final adapter
    # "steady" trained on to its last step (4 steps) after boom stopped ...
    assert re.search(r"step \d+ \| steady \| epoch 1 \| adapter step 4/4", result.stderr)
    assert int(match.group(2)) < 4
    # ... and ended exactly as it does alone.
    alone = tmp_path / "alone"
    assert main(mlora_args(tiny_model_dir, write_config(tmp_path, ("steady",)), alone)) == 0
    got = load_file(out / "steady" / "adapter_model.safetensors")
    want = load_file(alone / "steady" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)


def test_a_fault_read_when_another_adapter_finishes_stops_it_where_its_loss_failed(
    tmp_path: Path,
) -> None:
    """boom's loss is NaN at its step 2 (global step 2); nothing reads the fault flags until
    steady finishes at global step 3, a step boom shares (and in which it comes second). The
    read must stop boom as of its step 1 for good: no later update, step count or schedule."""
    template = write_template(tmp_path)
    config = {
        "cutoff_len": 40,
        "log_step": 100,  # the flags are first read when steady finishes
        "lora": [
            {"name": "steady", "data": write_json(tmp_path / "s.json", addition_rows(6)),
             "prompt": template, "r": 4, "batch_size": 2, "num_epochs": 1, "lr": 1e-2},
            {"name": "boom", "data": write_json(tmp_path / "b.json", reverse_rows(8)),
             "prompt": template, "r": 2, "batch_size": 2, "num_epochs": 2, "lr": 1e30},
        ],
    }  # fmt: skip
    trainer = run_in_memory(lambda: make_model(seed=3), make_tokenizer(), config, tmp_path / "out")
    steady, boom = trainer.runs
    assert (steady.status, steady.steps_done) == ("finished", 3)
    assert boom.failed is not None
    match = re.search(r"non-finite loss at adapter step (\d+) \(global step (\d+)\)", boom.failed)
    assert match, boom.failed
    assert (int(match.group(1)), int(match.group(2))) == (2, 2)
    assert boom.status == "failed"
    assert boom.steps_done == 1  # the steps from 2 on were skipped on the device
    # Its schedule saw steps 1 to 3 (the flag was raised at 2, read after 3), never a 4th.
    assert boom.scheduler.last_epoch == 3
    assert trainer.global_step == 3
    assert not (tmp_path / "out" / "boom" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "steady" / "adapter_model.safetensors").exists()
