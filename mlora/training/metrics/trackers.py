"""``report_to``: the trackers people already run, each through its own library's API.

Every adapter is its own run (or series) under one group named after the run's id
(``mlora-RUN_ID``), so the trackers' own views compare adapters side by side:

- ``tensorboard``: one event folder per adapter, ``D/tensorboard/mlora-RUN_ID/NAME`` (plus
  ``.../run`` for throughput); a resume purges the events past the resumed step.
- ``mlflow``: a parent run ``mlora-RUN_ID`` with one nested run per adapter, in the tracking
  store ``MLFLOW_TRACKING_URI`` names (experiment ``MLFLOW_EXPERIMENT_NAME``, default
  ``mlora``); a resume continues the same runs.
- ``trackio``: one run per adapter in project ``TRACKIO_PROJECT`` (default ``mlora``),
  group ``mlora-RUN_ID``, in Trackio's local store.
- ``wandb``: one run per adapter, group ``mlora-RUN_ID``, project ``WANDB_PROJECT`` (default
  ``mlora``), id fixed by run and adapter so a resume continues it (W&B's own settings:
  ``WANDB_MODE=offline`` and so on).

Each is an optional extra; ``check_trackers`` says which one to install before anything loads.
Adapter metrics are logged at the adapter's own optimizer step; run metrics at the global step.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlora.core.errors import MloraError, first_line
from mlora.training.metrics.rows import RunRow, StepRow, ValidationRow
from mlora.training.metrics.sinks import RowSink, RunStart

# report_to name -> (the module it needs, the pip extra that installs it)
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}
TENSORBOARD_DIR = "tensorboard"


def group_name(run: str) -> str:
    return f"mlora-{run}"


def step_metrics(row: StepRow) -> dict[str, float]:
    """An adapter step row as tracker scalars (a loss that was not finite is left out)."""
    values = {
        "train/loss": row.loss,
        "train/learning_rate": row.lr,
        "train/grad_norm": row.grad_norm,
        "train/epoch": row.epoch,
        "train/tokens": float(row.tokens),
        "eval/loss": row.val_loss,
    }
    return {key: value for key, value in values.items() if value is not None}


def run_metrics(row: RunRow) -> dict[str, float]:
    values = {
        "run/tokens_per_s": row.tokens_per_s,
        "run/peak_memory_mib": row.peak_memory_mib,
        "run/mfu": row.mfu,
    }
    return {key: value for key, value in values.items() if value is not None}


def check_trackers(names: Sequence[str]) -> None:
    """Fail before the model loads when a tracker's package is missing.

    Raises:
        MloraError: naming the tracker and the extra to install.
    """
    for name in names:
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise MloraError(
                f"report_to {name!r} needs the {module} package: pip install 'mlora[{extra}]'"
            )


class TensorBoardTracker:
    """One ``SummaryWriter`` per adapter (TensorBoard lists them as runs of one folder)."""

    def __init__(self) -> None:
        self.writers: dict[str, Any] = {}
        self.folder: Path | None = None
        self.start_steps: dict[str, int] = {}
        self.resume_step: int | None = None

    def start(self, run: RunStart) -> None:
        self.folder = run.output_dir / TENSORBOARD_DIR / group_name(run.run)
        self.start_steps = dict(run.positions)
        self.resume_step = run.resume_step

    def _writer(self, key: str, purge_after: int | None) -> Any:
        """The writer of ``key`` (an adapter, or ``run``), opened on first use; on a resume it
        purges the events past ``purge_after`` (they are logged again)."""
        writer = self.writers.get(key)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self.folder is not None
            purge = None if self.resume_step is None or purge_after is None else purge_after + 1
            writer = SummaryWriter(log_dir=str(self.folder / key), purge_step=purge)
            self.writers[key] = writer
        return writer

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            writer = self._writer(row.adapter, self.start_steps.get(row.adapter, 0))
            for key, value in step_metrics(row).items():
                writer.add_scalar(key, value, row.step, walltime=row.time)

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        for row in rows:
            if row.val_loss is not None:
                writer = self._writer(row.adapter, self.start_steps.get(row.adapter, 0))
                writer.add_scalar("eval/loss", row.val_loss, row.step, walltime=row.time)

    def log_run(self, row: RunRow) -> None:
        writer = self._writer("run", self.resume_step)
        for key, value in run_metrics(row).items():
            writer.add_scalar(key, value, row.global_step, walltime=row.time)
        self.sync()  # once per log interval, as the metrics file: a crash loses no interval

    def sync(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self, finished: bool) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _params(config: dict[str, Any]) -> dict[str, str]:
    """An adapter's config keys as MLflow parameters (strings of at most 6000 characters)."""
    return {
        k: json.dumps(v)[:6000] if not isinstance(v, str) else v[:6000] for k, v in config.items()
    }


class MlflowTracker:
    """A parent MLflow run for the group and a nested run per adapter (``MlflowClient``)."""

    TAG_RUN, TAG_ADAPTER = "mlora.run", "mlora.adapter"

    def __init__(self) -> None:
        self.client: Any = None
        self.parent: str | None = None
        self.runs: dict[str, str] = {}

    def start(self, run: RunStart) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlora")
        try:  # a store MLflow refuses (URI, permissions) is the user's setting: one line
            self.client = MlflowClient()
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(name)
            )
        except MlflowException as exc:
            raise MloraError(f"report_to 'mlflow': {first_line(exc)}") from None
        found = {}
        if run.resume_step is not None:  # continue the runs of the interrupted process
            query = f"tags.`{self.TAG_RUN}` = '{run.run}'"
            for existing in self.client.search_runs(
                [experiment_id], query, order_by=["start_time ASC"]
            ):
                found[existing.data.tags.get(self.TAG_ADAPTER, "")] = existing.info.run_id
        group = group_name(run.run)
        self.parent = (
            found.get("")
            or self.client.create_run(
                experiment_id, run_name=group, tags={self.TAG_RUN: run.run, self.TAG_ADAPTER: ""}
            ).info.run_id
        )
        for adapter, config in run.adapters.items():
            if adapter in found:
                self.runs[adapter] = found[adapter]
                self.client.update_run(found[adapter], status="RUNNING")
                continue
            tags = {
                "mlflow.parentRunId": self.parent,
                self.TAG_RUN: run.run,
                self.TAG_ADAPTER: adapter,
            }
            run_id = self.client.create_run(experiment_id, run_name=adapter, tags=tags).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _params(config).items()]
            self.client.log_batch(run_id, params=params)
            self.runs[adapter] = run_id

    def _log(self, run_id: str, values: dict[str, float], step: int, time_s: float) -> None:
        from mlflow.entities import Metric

        stamp = int(time_s * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        self.client.log_batch(run_id, metrics=metrics)

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            self._log(self.runs[row.adapter], step_metrics(row), row.step, row.time)

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        for row in rows:
            if row.val_loss is not None:
                self._log(self.runs[row.adapter], {"eval/loss": row.val_loss}, row.step, row.time)

    def log_run(self, row: RunRow) -> None:
        assert self.parent is not None
        self._log(self.parent, run_metrics(row), row.global_step, row.time)

    def sync(self) -> None:
        return None  # every log_batch is written when it returns

    def close(self, finished: bool) -> None:
        status = "FINISHED" if finished else "KILLED"
        for run_id in [*self.runs.values(), self.parent]:
            if run_id is not None:
                self.client.set_terminated(run_id, status)


class TrackioTracker:
    """One Trackio run per adapter and one for the group's throughput (``trackio.Run``: a
    ``trackio.init`` would finish the run before it, and the adapters train at once)."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}

    def start(self, run: RunStart) -> None:
        import trackio

        project = os.environ.get("TRACKIO_PROJECT", "mlora")
        group = group_name(run.run)
        names = {adapter: f"{group}-{adapter}" for adapter in run.adapters}
        for adapter, config in run.adapters.items():
            self.runs[adapter] = trackio.Run(
                url=None, project=project, client=None, name=names[adapter], group=group,
                config=config,
            )  # fmt: skip
        self.runs["run"] = trackio.Run(
            url=None, project=project, client=None, name=f"{group}-run", group=group
        )

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            self.runs[row.adapter].log(step_metrics(row), step=row.step)

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        for row in rows:
            if row.val_loss is not None:
                self.runs[row.adapter].log({"eval/loss": row.val_loss}, step=row.step)

    def log_run(self, row: RunRow) -> None:
        self.runs["run"].log(run_metrics(row), step=row.global_step)

    def sync(self) -> None:
        return None  # Trackio writes from its own thread; finish() waits for it

    def close(self, finished: bool) -> None:
        for run in self.runs.values():
            run.finish()
        self.runs.clear()


class WandbTracker:
    """One W&B run per adapter (``reinit="create_new"``: several at once) in one group."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}

    def start(self, run: RunStart) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT", "mlora")
        group = group_name(run.run)
        for key, config in [*run.adapters.items(), ("run", {})]:
            self.runs[key] = wandb.init(
                project=project, group=group, name=f"{group}-{key}", id=f"{group}-{key}",
                config=config, resume="allow", reinit="create_new",
                dir=str(run.output_dir),
            )  # fmt: skip

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            self.runs[row.adapter].log(step_metrics(row), step=row.step)

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        for row in rows:
            if row.val_loss is not None:
                self.runs[row.adapter].log({"eval/loss": row.val_loss}, step=row.step)

    def log_run(self, row: RunRow) -> None:
        self.runs["run"].log(run_metrics(row), step=row.global_step)

    def sync(self) -> None:
        return None

    def close(self, finished: bool) -> None:
        for run in self.runs.values():
            run.finish(exit_code=0 if finished else 1)
        self.runs.clear()


TRACKERS: dict[str, type[RowSink]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
    "wandb": WandbTracker,
}


def open_trackers(names: Sequence[str]) -> list[RowSink]:
    """The sinks of ``report_to`` (``none`` and an empty list: none)."""
    check_trackers([n for n in names if n != "none"])
    return [TRACKERS[name]() for name in names if name != "none"]
