"""Writing a run's results: a finished adapter's PEFT files and the run-level checkpoint cuts,
both queued on the checkpoint writer (``checkpoints.py``) as one ordered stream of writes.

``SavingTrainer`` is a part of ``Trainer`` (trainer.py), kept beside it so the loop stays on one
screen; it reads the trainer's state and keeps none of its own.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlora.hardware.backends import Backend
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import adapter_state_dict, peft_config
from mlora.training.adapter_run import AdapterRun, own_copy
from mlora.training.checkpoint_policy import CheckpointPolicy
from mlora.training.checkpoints import RunCheckpoints
from mlora.training.distributed import Distributed
from mlora.training.validation import Validation


class SavingTrainer:
    """The trainer's final saves and checkpoint cuts (a part of ``Trainer``)."""

    model: MultiLoraModel
    runs: list[AdapterRun]
    dist: Distributed
    backend: Backend
    output_dir: Path
    base_model_name: str | None
    global_step: int
    last_cut_step: int | None
    validation: Validation
    checkpoints: RunCheckpoints
    checkpoint_policy: CheckpointPolicy
    _saved: list[str]

    if TYPE_CHECKING:

        def check_faults(self) -> None: ...

        def consolidate_partial_steps(self) -> None: ...

        def emit_rows(self, run_row: bool) -> None: ...

        def state_dict(self, full: Collection[str] | None = None) -> dict[str, Any]: ...

    def adapter_config_json(self, run: AdapterRun) -> dict:
        spec = self.model.specs[run.name]
        return peft_config(spec, self.base_model_name)

    def weights_copy(self, run: AdapterRun) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys, as CPU copies the writer thread owns."""
        return {key: own_copy(t) for key, t in adapter_state_dict(self.model, run.name).items()}

    def save_final(self, run: AdapterRun) -> Path:
        """Queue the finished adapter's PEFT files on the checkpoint writer: one ordered stream
        of writes (a later cut that records it as finished is written after its files)."""
        folder = self.output_dir / run.name
        tensors = self.weights_copy(run)
        config = self.adapter_config_json(run)  # with save_best: its best weights instead
        self.checkpoints.writer.submit(self.validation.final_write(run.name, tensors, config))
        self._saved.append(f"adapter {run.name}: finished, saved to {folder}")
        return folder

    def save_cut(self, every_adapter: bool = False) -> Path:
        """Take a run-level cut at this global step (see checkpoints.py); returns its path.

        Args:
            every_adapter: save every running adapter at this step, gradients in progress
                included (Ctrl-C / SIGTERM: the resume then replays nothing); otherwise only
                the adapters whose own checkpoint is due get a folder.
        """
        self.check_faults()  # a stopped adapter is saved as failed, never with a skipped step
        self.last_cut_step = self.global_step
        due = self.checkpoint_policy.take()
        if every_adapter:
            due = None
            self.consolidate_partial_steps()
        rng = self.dist.gather(self.backend.get_rng_state())  # every rank's, for --resume
        path = self.checkpoints.cut_path(self.global_step)
        self.emit_rows(run_row=False)  # rows 1..G on disk before the cut at G is queued
        self.row_sinks.sync()
        if self.dist.is_main:
            path = self.checkpoints.save(self.state_dict(due), rng)
        for run in self.runs:
            if run.status == "running" and (due is None or run.name in due) and run.steps_done:
                run.checkpoint_step = run.steps_done  # its folder now (or already) holds this step
        return path
