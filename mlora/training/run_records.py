"""Where a training run keeps its resume records, so runs sharing a ``--dir`` never touch each
other's: ``DIR/.mlora-run/RUN_ID/step-G/``.

A run's id is a hash of what makes it the same computation: the config (without the keys that
may change on resume), the seed and the base model. ``--resume`` with the same command line
finds the same id, whatever else was trained into the folder since; a fresh run clears only
its own id's records. Records written before ids existed (``DIR/.mlora-run/step-G/``) are the
*legacy* layout: ``--resume`` adopts them when their config matches (see ``checkpoints.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.config.schema import TrainConfig, config_to_dict

RUN_DIR = ".mlora-run"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
# Run-wide keys that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = {"save_step", "save_total_limit", "log_step", "evaluate_result", "report_to"}
# Per-adapter keys that may change on resume (checkpoint schedule only).
ADAPTER_RESUME_FREE_KEYS = {"save_step"}


def base_model_identity(base_model: str | None) -> str | None:
    """A local base model by its absolute path (a resume from another folder is the same run),
    a hub id as written."""
    if base_model is None:
        return None
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def resume_relevant(config: dict[str, Any]) -> dict[str, Any]:
    """The JSON config without the keys a resume may change (run-wide and per adapter)."""
    top = {k: v for k, v in config.items() if k not in RESUME_FREE_KEYS}
    if isinstance(config.get("lora"), list):
        top["lora"] = [
            {k: v for k, v in adapter.items() if k not in ADAPTER_RESUME_FREE_KEYS}
            for adapter in config["lora"]
        ]
    return top


@dataclass(frozen=True)
class RunIdentity:
    """What a run is: its config, seed and base model (a resume must repeat all three)."""

    config: TrainConfig
    seed: int
    base_model: str | None

    @property
    def config_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(config_to_dict(self.config)))

    @property
    def run_id(self) -> str:
        identity = {
            "config": resume_relevant(self.config_json),
            "seed": self.seed,
            "base_model": base_model_identity(self.base_model),
        }
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    @property
    def names(self) -> list[str]:
        return [adapter.name for adapter in self.config.lora]

    def records(self, output_dir: Path) -> Path:
        """``DIR/.mlora-run/RUN_ID``: this run's cuts."""
        return output_dir / RUN_DIR / self.run_id


def run_folders(output_dir: Path) -> list[Path]:
    """The record folders of every run in ``output_dir`` (legacy records not included)."""
    root = output_dir / RUN_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and RUN_ID_PATTERN.match(p.name))
