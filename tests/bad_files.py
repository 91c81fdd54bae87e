"""Scratch folders of every kind of file mlora reads, for tests that damage one and run the real
``mlora.py`` on it as forks of one interpreter (tests/forked_cli.py).

A scratch folder holds a symlink to the tiny base model, a valid config, data in each format
mlora accepts, a prompt template, a PEFT LoRA folder (for ``--load_adapter`` and for MeteoRA to
embed) and earlier work in ``out/`` that no failed run may touch. ``outcome`` checks what every
bad file must give: a non-zero exit code, one line on stderr (no traceback), and every file that
was there before byte for byte unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save

from tests.helpers import SHORT_TEMPLATE, addition_rows
from tests.reliability_support import FORKED_CLI, env_with

ROWS = addition_rows(6)
DATA_FORMATS = ("json", "jsonl", "csv", "parquet")
LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def lora_weights() -> bytes:
    """The weights of a rank-2 q_proj LoRA on the tiny model (hidden 64, 2 layers)."""
    tensors = {}
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.full((2, 64), 0.01)
        tensors[f"{key}.lora_B.weight"] = torch.full((64, 2), 0.01)
    return save(tensors)


def write_data(path: Path, rows: list[dict]) -> None:
    """``rows`` in the format ``path``'s suffix names."""
    fmt = path.suffix[1:]
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        lines = ["instruction,input,output", *(f"{r['instruction']},{r['input']},{r['output']}"
                                               for r in rows)]  # fmt: skip
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@dataclass
class Scratch:
    """One folder per bad input; ``out/`` holds earlier work that must survive."""

    folder: Path

    @classmethod
    def make(cls, folder: Path, model_dir: Path) -> Scratch:
        folder.mkdir(parents=True)
        (folder / "model").symlink_to(model_dir, target_is_directory=True)
        for fmt in DATA_FORMATS:
            write_data(folder / f"data.{fmt}", ROWS)
        (folder / "template.json").write_text(json.dumps(SHORT_TEMPLATE), encoding="utf-8")
        lora = folder / "lora"
        lora.mkdir()
        (lora / "adapter_config.json").write_text(json.dumps(LORA_CONFIG), encoding="utf-8")
        (lora / "adapter_model.safetensors").write_bytes(lora_weights())
        earlier = folder / "out" / "earlier"  # another config's finished adapter
        earlier.mkdir(parents=True)
        (earlier / "adapter_config.json").write_text(json.dumps(LORA_CONFIG), encoding="utf-8")
        (earlier / "adapter_model.safetensors").write_bytes(lora_weights())
        scratch = cls(folder)
        scratch.write_config(scratch.config())
        return scratch

    @staticmethod
    def config(**adapter: object) -> dict:
        """The valid one-adapter config, with ``adapter``'s keys (None: removed)."""
        lora = {"name": "chat", "data": "data.json", "prompt": "template.json", "r": 2,
                "batch_size": 2, **adapter}  # fmt: skip
        return {"cutoff_len": 32, "lora": [{k: v for k, v in lora.items() if v is not None}]}

    def meteora_config(self) -> dict:
        """A MeteoRA adapter over the folder ``lora`` (its rank comes from there)."""
        return self.config(routing_strategy="meteora", adapters=["lora"], r=None)

    def write_config(self, config: dict | str | bytes) -> None:
        path = self.folder / "config.json"
        if isinstance(config, bytes):
            path.write_bytes(config)
        else:
            path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the folder but the inputs a case damages on purpose."""
        return {
            str(p.relative_to(self.folder)): p.read_bytes()
            for p in (self.folder / "out").rglob("*")
            if p.is_file() and p.name != ".mlora-lock"
        }

    def job(self, *extra: str) -> dict:
        argv = ["--base_model", "model", "--config", "config.json", "--dir", "out",
                "--device", "cpu", "--seed", "1", *extra]  # fmt: skip
        return {"cwd": str(self.folder), "argv": argv, "stdout": str(self.folder / "stdout"),
                "stderr": str(self.folder / "stderr")}  # fmt: skip


def run_forked(jobs: list[dict]) -> list[int]:
    """Each job as ``python mlora.py ...`` forked from one interpreter; their exit codes."""
    result = subprocess.run(
        [sys.executable, FORKED_CLI], input=json.dumps(jobs), capture_output=True, text=True,
        timeout=900, env=env_with(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def failure_line(
    code: int, stderr: str, allowed_warnings: tuple[str, ...] = (), mid_run: bool = False
) -> str:
    """The one ``error:`` line of a failed command; checks there is nothing else but warnings
    containing one of ``allowed_warnings`` (e.g. a damaged checkpoint being skipped), or, for
    a failure ``mid_run``, the run's log lines (else the model must not have loaded)."""
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith("error: ")]
    assert len(errors) == 1, stderr
    if mid_run:
        return errors[0]
    for line in others:
        assert " WARNING " in line and any(w in line for w in allowed_warnings), stderr
    assert "Loading weights" not in stderr, "the model loaded before the error: " + stderr
    return errors[0]
