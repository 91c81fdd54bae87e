"""Resumable checkpoints: ``DIR/NAME/checkpoint-STEP/``, complete or absent.

A checkpoint holds the adapter (PEFT format), its optimizer and scheduler state, its data
position and the step counters. It is written into a temporary folder and renamed into place,
and only the newest ``save_total_limit`` are kept.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlora.atomic import atomic_directory
from mlora.persistence import save_adapter

if TYPE_CHECKING:
    from mlora.trainer import AdapterRun, Trainer

logger = logging.getLogger("mlora")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"


def list_checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of one adapter, oldest first."""
    if not adapter_dir.is_dir():
        return []
    found = []
    for child in adapter_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(trainer: Trainer, run: AdapterRun) -> Path:
    """Write ``run``'s checkpoint for its current step and prune old ones."""
    adapter_dir = trainer.output_dir / run.name
    target = adapter_dir / f"checkpoint-{run.steps_done}"
    with atomic_directory(target) as tmp:
        save_adapter(trainer.model, run.name, tmp, trainer.adapter_config_json(run))
        (tmp / "optimizer.pt").write_bytes(_torch_bytes(run.optimizer.state_dict()))
        (tmp / "scheduler.pt").write_bytes(_torch_bytes(run.scheduler.state_dict()))
        state = {
            "adapter": run.name,
            "steps_done": run.steps_done,
            "global_step": trainer.global_step,
            "queue": run.queue.state_dict(),
            "seed": trainer.seed,
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    for _, old in list_checkpoints(adapter_dir)[: -trainer.config.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("adapter %s: checkpoint %s", run.name, target)
    return target
