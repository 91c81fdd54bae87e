"""What a run reports: each step's metrics row (kept on the device until the log interval, then
handed to the row sinks), each log interval's per-adapter results (to the trainer's ``sinks``),
validation losses and the "finished, saved" lines.

``ReportingTrainer`` is a part of ``Trainer`` (trainer.py), kept beside it so the loop stays on
one screen; it reads the trainer's state and keeps none of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlora.batching.dispatcher import MicroBatch
from mlora.config.schema import TrainConfig, config_to_dict
from mlora.hardware.backends import Backend
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.adapter_run import AdapterRun
from mlora.training.distributed import Distributed
from mlora.training.metrics.collector import PendingStep, StepCollector, gradient_norm, now
from mlora.training.metrics.log_lines import AdapterMetrics, MetricsSink
from mlora.training.metrics.rows import ValidationRow
from mlora.training.metrics.sinks import RowSinks, RunStart
from mlora.training.metrics.throughput import RunMeter
from mlora.training.validation import Validation

logger = logging.getLogger("mlora")


class ReportingTrainer:
    """The trainer's metrics rows, log-interval reports and log lines (a part of ``Trainer``)."""

    model: MultiLoraModel
    config: TrainConfig
    runs: list[AdapterRun]
    dist: Distributed
    backend: Backend
    output_dir: Path
    run_id: str
    global_step: int
    resumed_at: int | None
    validation: Validation
    sinks: list[MetricsSink]
    row_sinks: RowSinks
    collector: StepCollector
    meter: RunMeter
    step_counts: dict[str, tuple[int, int]]
    _saved: list[str]

    if TYPE_CHECKING:

        def check_faults(self) -> None: ...

    def _count_micro_batch(self, run: AdapterRun, mb: MicroBatch, tokens: int) -> None:
        """A micro-batch's rows and tokens: into its step's row, and the interval's run row."""
        rows, counted = self.step_counts.get(run.name, (0, 0))
        self.step_counts[run.name] = (rows + len(mb.rows), counted + tokens)
        self.meter.count(run.name, tokens, sum(row.num_supervised for row in mb.rows))

    def _collect_step(self, run: AdapterRun, mb: MicroBatch) -> None:
        """Keep the ending optimizer step's row (device scalars until the log interval)."""
        rows, tokens = self.step_counts.pop(run.name, (0, 0))
        if not self.dist.is_main:
            return
        assert run.step_loss is not None
        steps = run.steps_done + 1
        self.collector.add(
            PendingStep(
                adapter=run.name, step=steps, global_step=self.global_step + 1,
                epoch=steps / run.queue.steps_per_epoch, rows=rows, tokens=tokens,
                supervised_tokens=mb.step_tokens, lr=run.optimizer.param_groups[0]["lr"],
                loss=run.step_loss.detach(), grad_norm=gradient_norm(run.params), time=now(),
            )
        )  # fmt: skip

    def _run_start(self) -> RunStart:
        adapters = {a["name"]: a for a in config_to_dict(self.config)["lora"]}
        return RunStart(
            output_dir=self.output_dir,
            run=self.run_id,
            adapters=adapters,
            resume_step=self.resumed_at,
            positions={run.name: run.steps_done for run in self.runs},
        )

    def emit_rows(self, run_row: bool) -> None:
        """Hand the finished steps' rows to the row sinks (one host read), with the interval's
        run row when ``run_row``."""
        if not self.dist.is_main:
            self.collector.clear()
            return
        self.row_sinks.log_steps(self.collector.take(self.run_id))
        if run_row:
            peak = self.backend.memory_stats()["peak"]
            self.row_sinks.log_run(self.meter.row(self.run_id, self.global_step, peak))

    def _report(self, elapsed: float) -> None:
        """Each adapter's results since the last report, to every sink (one host read for
        every adapter's mean loss, every ``log_step`` steps), and every step's row."""
        self.emit_rows(run_row=True)
        self.check_faults()
        logged = [run for run in self.runs if run.loss_count]
        if not logged:
            return
        means = torch.stack([run.loss_sum / run.loss_count for run in logged]).tolist()
        metrics = [
            self._metrics(run, loss, elapsed) for run, loss in zip(logged, means, strict=True)
        ]
        for sink in self.sinks:
            sink.report(metrics)

    def _metrics(self, run: AdapterRun, loss: float, elapsed: float) -> AdapterMetrics:
        """``run``'s results over the interval ending now; its history grows and its interval
        restarts."""
        run.history.append(loss)
        loads = self.model.context.aux_losses.take_loads(run.name)
        shares = None if loads is None else tuple(loads.tolist())  # MoE: per expert, all layers
        names = None
        if shares is not None:
            run.expert_load.append(list(shares))
            names = getattr(self.model.specs[run.name], "expert_names", None)  # MeteoRA
        metrics = AdapterMetrics(
            global_step=self.global_step,
            adapter=run.name,
            epoch=min(run.queue.epoch + 1, run.config.num_epochs),
            num_epochs=run.config.num_epochs,
            adapter_step=run.steps_done,
            total_steps=run.queue.total_steps,
            loss=loss,
            lr=run.optimizer.param_groups[0]["lr"],
            tokens=run.tokens,
            seconds=elapsed,
            expert_load=shares,
            expert_names=None if not names else tuple(names),
        )
        run.take_logged_loss()
        return metrics

    def _log_validation(self, validated: Sequence[AdapterRun]) -> None:
        """Each validated adapter's loss: into its step's row (still pending), else a row of its
        own (``kind: validation``)."""
        alone = []
        for run in validated:
            step, loss = self.validation.states[run.name].curve[-1]
            if not self.collector.add_validation(run.name, int(step), loss):
                alone.append(ValidationRow(
                    run=self.run_id, adapter=run.name, step=int(step),
                    global_step=self.global_step, val_loss=loss, time=now(),
                ))  # fmt: skip
        self.row_sinks.log_validation(alone)

    def _log_saved(self) -> None:
        """The adapters saved this step, said after the step's loss line (not before it)."""
        for line in self._saved:
            logger.info("%s", line)
        self._saved.clear()
