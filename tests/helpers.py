"""Building blocks shared by the core tests: short prompts, synthetic tasks, in-memory runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mlora.config.schema import parse_config
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.trainer import Trainer, prepare_data

SHORT_TEMPLATE = {"prompt_input": "{instruction} {input}=", "prompt_no_input": "{instruction}="}


def write_template(folder: Path) -> str:
    path = folder / "short_template.json"
    path.write_text(json.dumps(SHORT_TEMPLATE), encoding="utf-8")
    return str(path)


def addition_rows(count: int = 32, offset: int = 0) -> list[dict]:
    return [
        {"instruction": "add", "input": f"{a} {b}", "output": str(a + b)}
        for a, b in ((i % 7 + offset, (3 * i) % 5) for i in range(count))
    ]


def reverse_rows(count: int = 24) -> list[dict]:
    words = [
        "cat",
        "dog",
        "bird",
        "fish",
        "lion",
        "bear",
        "wolf",
        "frog",
        "owl",
        "ant",
        "bee",
        "yak",
    ]
    return [{"instruction": "rev", "input": w, "output": w[::-1]} for w in (words * 4)[:count]]


def write_json(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def run_in_memory(
    model_factory,
    tokenizer,
    raw_config: dict,
    output_dir: Path,
    seed: int = 7,
    init_from=None,
    dtype: torch.dtype | None = None,
) -> Trainer:
    """Train a config on a fresh model from ``model_factory`` without touching the CLI.

    ``dtype`` converts the whole model, adapters included, before the first step (fp64: the
    math without fp32 rounding, which AdamW's sign-like steps would amplify).
    """
    config = parse_config(raw_config, "test-config")
    data = prepare_data(config, tokenizer, seed)
    trainer = Trainer(
        MultiLoraModel(model_factory()),
        tokenizer,
        config,
        data,
        output_dir,
        seed,
        "tiny",
        init_from,
    )
    if dtype is not None:
        trainer.model.to(dtype)  # same Parameter objects: the optimizers keep them
    trainer.train()
    return trainer


def adapter_tensors(trainer: Trainer, name: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{pname}": p.detach().clone()
        for path, module in trainer.model.adapter_modules(name)
        for pname, p in module.named_parameters()
    }


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b||_inf / ||b||_inf (robust to entries near zero)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def train_killed_then_resumed(
    config_path: Path, model_dir: Path, folder: Path, kill_at: int = 3
) -> tuple[Path, Path]:
    """Train ``config_path`` once uninterrupted into ``folder/clean``, and once into
    ``folder/cut`` killed by a real SIGKILL before global step ``kill_at + 1`` (in a
    subprocess: no ``finally``, no flush, the output lock left behind, as in a crash; the
    checkpoint writes queued before the kill are done first, so the moment is the same on any
    machine), then ``--resume``d in this process. Returns both folders."""
    import signal
    import subprocess
    import sys

    from mlora import api

    api.train(config_path, str(model_dir), folder / "clean")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = ["--base_model", str(model_dir), "--config", str(config_path),
            "--dir", str(folder / "cut"), "--seed", "42"]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, str(root / "tests" / "reliability_harness.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**env, "MLORA_TEST_KILL": f"step:{kill_at}"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # not an early end, nor an error
    api.train(config_path, str(model_dir), folder / "cut", resume=True)
    return folder / "clean", folder / "cut"


def in_row_order(batch, per_position: torch.Tensor) -> torch.Tensor:
    """Per-supervised-position values of a collated batch in (row, position in row) order, so
    a packed batch (rows reordered into bins) compares with a padded one."""
    if batch.position_ids is not None:  # packed
        in_row = batch.position_ids.reshape(-1)[batch.positions]
    else:
        in_row = batch.positions % batch.input_ids.shape[1]
    return per_position[torch.argsort(batch.position_rows * 10_000 + in_row)]


def peft_greedy(
    peft_model, tokenizer, prompt: str, adapter: str | None, max_new_tokens: int = 12, **kw
) -> list[int]:
    """PEFT's greedy ``generate`` of one unpadded prompt with ``adapter`` (None: the base)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if "stop_strings" in kw:
        kw["tokenizer"] = tokenizer
    common = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw
    )
    if adapter is None:
        with peft_model.disable_adapter():
            seq = peft_model.generate(input_ids=ids, **common)
    else:
        peft_model.set_adapter(adapter)
        seq = peft_model.generate(input_ids=ids, **common)
    return seq[0, ids.shape[1] :].tolist()


def read_terminal(leader: int) -> bytes:
    """Everything a pseudo-terminal's other end wrote, read from ``leader`` until it closes
    (Linux answers EIO once the follower is closed and everything was read)."""
    shown = b""
    while True:
        try:
            piece = os.read(leader, 65536)
        except OSError:
            return shown
        if not piece:
            return shown
        shown += piece
