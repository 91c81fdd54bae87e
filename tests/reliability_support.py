"""Shared pieces of the reliability tests: a small three-adapter run driven through the real CLI.

The run mixes what makes an exact resume hard: grad accumulation with dropout (RNG and partial
gradients in flight), different batch sizes, shuffling, AdamW and SGD with momentum, a warm-up
schedule, and one adapter that finishes long before the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from mlora.config.schema import load_config, parse_config
from mlora.training.run_records import RunIdentity, run_folders
from tests.helpers import addition_rows, reverse_rows, write_json, write_template

ROOT = Path(__file__).resolve().parents[1]
MLORA = str(ROOT / "mlora.py")
HARNESS = str(ROOT / "tests" / "reliability_harness.py")
FORKED_CLI = str(ROOT / "tests" / "forked_cli.py")
NAMES = ("acc", "short", "sgd")
TIMEOUT = 120


def write_run_config(folder: Path, **top: object) -> Path:
    """The three-adapter config; ``top`` overrides run-wide keys."""
    folder.mkdir(parents=True, exist_ok=True)
    template = write_template(folder)
    config = {
        "cutoff_len": 40,
        "save_step": 2,
        "save_total_limit": 2,
        "log_step": 1,
        "lora": [
            {"name": "acc", "data": write_json(folder / "acc.json", addition_rows(12)),
             "prompt": template, "r": 4, "batch_size": 4, "micro_batch_size": 2,
             "num_epochs": 2, "lora_dropout": 0.1, "lr": 1e-2},
            {"name": "short", "data": write_json(folder / "short.json", reverse_rows(4)),
             "prompt": template, "r": 2, "batch_size": 2, "num_epochs": 1, "use_dora": True,
             "lr": 1e-2},
            {"name": "sgd", "data": write_json(folder / "sgd.json", addition_rows(9, offset=2)),
             "prompt": template, "r": 4, "batch_size": 3, "micro_batch_size": 1,
             "num_epochs": 1, "shuffle": False, "optim": "sgd", "momentum": 0.9, "lr": 5e-2,
             "scheduler_type": "linear", "warmup_steps": 1},
        ],
        **top,
    }  # fmt: skip
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def mlora_args(model_dir: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--base_model", str(model_dir), "--config", str(config), "--dir", str(out),
        "--seed", "5", "--device", "cpu", *extra,
    ]  # fmt: skip


def env_with(**faults: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLORA_TEST_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **faults}


def run_mlora(args: list[str], script: str = MLORA, **faults: str) -> subprocess.CompletedProcess:
    """``python mlora.py ARGS`` (or the fault harness) in a real subprocess."""
    return subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env_with(**faults),
    )


def start_mlora(args: list[str], script: str = MLORA, **faults: str) -> subprocess.Popen:
    """Start ``python mlora.py ARGS`` (or the fault harness); read its log from ``.stderr``
    line by line."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env_with(**faults),
    )


def read_until(proc: subprocess.Popen, text: str) -> list[str]:
    """Lines of ``proc``'s stderr up to and including the first one containing ``text``."""
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared:\n{''.join(seen)}")


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(out / name / "adapter_model.safetensors") for name in NAMES}


def max_relative_difference(
    got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]
) -> float:
    """Max over adapters and tensors of ||got - want||_inf / ||want||_inf."""
    worst = 0.0
    for name, tensors in want.items():
        assert got[name].keys() == tensors.keys(), name
        for key, ref in tensors.items():
            diff = (got[name][key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            worst = max(worst, diff.item())
    return worst


def one_error_line(stderr: str) -> str:
    """The ``error:`` line of a failed run, checking there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def run_identity(config: Path, model_dir: Path, seed: int = 5) -> RunIdentity:
    """The identity ``mlora_args(model_dir, config, ...)`` gives its run (names its records)."""
    return RunIdentity(load_config(config), seed, str(model_dir))


def only_records(out: Path) -> Path:
    """The records folder of the one run trained into ``out``."""
    (records,) = run_folders(out)
    return records


def small_identity(*names: str, seed: int = 1) -> RunIdentity:
    """A run of adapters ``names`` for tests that write records by hand."""
    config = parse_config({"lora": [{"name": n, "data": f"{n}.json"} for n in names]}, "c.json")
    return RunIdentity(config, seed, None)


def fake_checkpoint(out: Path, name: str, folder_name: str) -> Path:
    """A checkpoint folder whose files are whole (valid headers and archives, tiny tensors)."""
    folder = out / name / folder_name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.safetensors").write_bytes(save({"w": torch.zeros(2, 2)}))
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": 0}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"queue": {"epoch": 0}}))
    return folder


def fake_cut(
    records: Path, identity: RunIdentity, step: int, checkpoints: dict[str, str | None],
    folder_name: str | None = None, status: str = "running",
) -> Path:  # fmt: skip
    """A cut whose manifest has the full shape, pointing at ``checkpoints`` (adapter: folder)."""
    cut = records / (folder_name or f"step-{step}")
    cut.mkdir(parents=True)
    entry = {"status": status, "steps_done": step, "queue": {}, "loss_count": 0, "tokens": 0,
             "history": [], "message": None}  # fmt: skip
    manifest = {
        "format": 1, "global_step": step, "seed": identity.seed, "base_model": None,
        "config_file": identity.config.source, "config": identity.config_json,
        "adapters": {name: {**entry, "checkpoint": folder} for name, folder in checkpoints.items()},
    }  # fmt: skip
    (cut / "manifest.json").write_text(json.dumps(manifest))
    (cut / "state.safetensors").write_bytes(save({"rng/cpu": torch.zeros(4, dtype=torch.uint8)}))
    return cut
