"""A sweep's trials in the trainer: each enters a free place at a step boundary and leaves when
it completes, early-stops, fails or is pruned.

``SweepPlaces`` is a step hook of the trainer (``mlora.training.step_hooks``), run after the
validation hook: at every step boundary it lets the trials whose last step it was leave (saved),
retires every trial that left (pruned or early-stopped by the validation hook, failed, or
finished: Optuna is told, the adapter is removed from the model) and then asks Optuna for new
trials until ``concurrent`` places are taken or ``trials`` were asked. A new trial is an ordinary
adapter added with ``Trainer.enter``: its own seeded init, optimizer, schedule, data order and
noise, all derived from its name and the seed, so it trains exactly as the same configuration
trained alone would, whenever it enters. The base never reloads.

Its ``state_dict`` (every trial's record and which trials hold a place, in entry order) goes
into each run-level cut; ``load_state_dict`` puts the same trials back in their places before
the trainer's own state is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from mlora.batching.dispatcher import AdapterQueue
from mlora.config.schema import AdapterConfig, TrainConfig, build_adapter
from mlora.config.sweep import SweepConfig
from mlora.core.errors import ConfigError
from mlora.data.rows import TokenizedRow
from mlora.sweep.outputs import TrialRecord
from mlora.sweep.study import SweepStudy
from mlora.training.adapter_run import AdapterRun
from mlora.training.step_hooks import StepBoundary
from mlora.training.trainer import Trainer, prepare_data
from mlora.training.validation import PRUNED, validation_rows_of

logger = logging.getLogger("mlora")


def trained_tokens(queue: AdapterQueue) -> int:
    """Tokens of the rows an adapter's queue has handed out (``micro_steps_done`` micro-batches;
    still right after ``stop``, which keeps that count)."""
    rows = queue.rows
    sizes = []  # rows of each micro-batch of an epoch, in order
    for start in range(0, len(rows), queue.batch_size):
        batch = min(queue.batch_size, len(rows) - start)
        sizes += [min(queue.micro_batch_size, batch - i)
                  for i in range(0, batch, queue.micro_batch_size)]  # fmt: skip
    epochs, rest = divmod(queue.micro_steps_done, len(sizes))
    total = epochs * sum(len(row) for row in rows)
    if rest:
        order = queue.epoch_order(epochs)
        total += sum(len(rows[i]) for i in order[: sum(sizes[:rest])])
    return total


class TrialData:
    """Each trial's tokenized training and validation rows, prepared before the model loads
    (one set per ``data`` value the search space allows: the only searched key that changes
    rows)."""

    def __init__(self, config: TrainConfig, sweep: SweepConfig, tokenizer: Any, seed: int) -> None:
        self.config, self.seed = config, seed
        sources = list(sweep.space["data"].choices) if "data" in sweep.space else []
        self.rows: dict[str, tuple[list[TokenizedRow], list[TokenizedRow]]] = {}
        for source in sources or [sweep.base["data"]]:
            probe = build_adapter({**sweep.base, "data": source, "name": "trial-000"}, "sweep")
            self.rows[source] = self._prepare(probe, tokenizer)

    def _prepare(
        self, adapter: AdapterConfig, tokenizer: Any
    ) -> tuple[list[TokenizedRow], list[TokenizedRow]]:
        single = dataclasses.replace(self.config, lora=[adapter], sweep=None)
        train = prepare_data(single, tokenizer, self.seed)[adapter.name]
        validation = validation_rows_of(
            adapter, tokenizer, self.config.cutoff_len, self.seed, self.config
        )
        return train, validation

    def of(self, adapter: AdapterConfig) -> tuple[list[TokenizedRow], list[TokenizedRow]]:
        return self.rows[adapter.data]


class SweepPlaces:
    """Fills the trainer's free places with Optuna's trials (see the module docstring).

    Args:
        sweep: the sweep block.
        study: its Optuna study.
        data: the trials' rows.
        source: the config file (names the trial in a config error).
    """

    def __init__(self, sweep: SweepConfig, study: SweepStudy, data: TrialData, source: str) -> None:
        self.sweep, self.study, self.data, self.source = sweep, study, data, source
        self.records: dict[int, TrialRecord] = {}
        self.active: dict[str, int] = {}  # trial name -> number, in entry order
        self.started: dict[str, float] = {}  # wall clock at entry (or resume)
        self.next_number = 0

    # --- the trainer's hooks -------------------------------------------------------------------

    def __call__(self, boundary: StepBoundary, control: Trainer) -> None:  # type: ignore[override]
        """The step hook: trials whose last step this was leave (saved), then ``fill``."""
        for run in boundary.stepped:
            if run.finished and not run.left and run.name in self.active:
                control.leave(run, "finished")
        self.fill(control)

    def fill(self, trainer: Trainer) -> None:
        """Retire the trials that left the run, then fill the free places (also before the
        first step)."""
        for run in [r for r in trainer.runs if r.name in self.active and r.left]:
            self._leave(trainer, run)
        while len(self.active) < self.sweep.concurrent and self.next_number < self.sweep.trials:
            self._enter(trainer, self.next_number)
            self.next_number += 1

    def judge(self, name: str, step: int, loss: float, last: bool) -> bool:
        """Report a trial's validation loss to Optuna; whether its pruner stops it now."""
        number = self.active[name]
        if last:  # its final value is told when it leaves; no prune at the last step
            return False
        pruned = self.study.should_prune(number, step, loss)
        if pruned:
            logger.info("trial %s: pruned at step %d (val_loss %.4f)", name, step, loss)
        return pruned

    # --- entering and leaving ------------------------------------------------------------------

    def _adapter(self, number: int) -> tuple[AdapterConfig, dict[str, Any]]:
        values = self.study.trial(number)
        name = self.sweep.trial_name(number)
        where = f"{self.source}: sweep trial {name} {values}"
        return build_adapter({**self.sweep.base, **values, "name": name}, where), values

    def _enter(self, trainer: Trainer, number: int) -> None:
        name = self.sweep.trial_name(number)
        try:
            config, values = self._adapter(number)
        except ConfigError as exc:  # a combination of values no adapter accepts
            logger.warning("trial %s: %s; counted as failed", name, exc)
            self.records[number] = TrialRecord(
                number, name, self.study.trial(number), state="failed",
                entered_at=trainer.global_step, left_at=trainer.global_step,
            )  # fmt: skip
            self.study.finish(number, None)
            return
        self._place(trainer, number, config)
        self.records[number] = TrialRecord(number, name, values, entered_at=trainer.global_step)
        logger.info("trial %s enters at step %d: %s", name, trainer.global_step, values)

    def _place(self, trainer: Trainer, number: int, config: AdapterConfig) -> None:
        rows, validation = self.data.of(config)
        trainer.validation.add(config.name, validation)
        trainer.enter(config, rows)
        self.active[config.name] = number
        self.started[config.name] = time.perf_counter()

    def _leave(self, trainer: Trainer, run: AdapterRun) -> None:
        number = self.active.pop(run.name)
        record = self.records[number]
        state = trainer.validation.states.get(run.name)
        record.curve = [] if state is None else [list(p) for p in state.curve]
        record.best_step = None if state is None else state.best_step
        record.steps, record.tokens = run.steps_done, trained_tokens(run.queue)
        record.left_at = trainer.global_step
        record.wall_time_s += time.perf_counter() - self.started.pop(run.name)
        if run.failed is not None or state is None or not state.curve:
            record.state, record.value = "failed", None
            self.study.finish(number, None)
        elif state.stopped == PRUNED:
            record.state, record.value = "pruned", state.curve[-1][1]
        else:
            record.state = "complete"
            # the objective: the validation loss of the weights its folder holds
            record.value = state.best_loss if run.config.save_best else state.curve[-1][1]
            self.study.finish(number, record.value)
        logger.info(
            "trial %s: %s after %d steps (val_loss %s)",
            run.name, record.state, run.steps_done,
            "-" if record.value is None else f"{record.value:.4f}",
        )  # fmt: skip
        trainer.retire(run)

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        now = time.perf_counter()
        records = []
        for number in sorted(self.records):
            record = dataclasses.replace(self.records[number])
            if record.name in self.started:  # still running: its time so far
                record.wall_time_s += now - self.started[record.name]
            records.append(record.to_json())
        return {"next_number": self.next_number, "active": list(self.active), "trials": records}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        """The trials of a cut back in their places (fresh adapters, in entry order), before
        ``trainer.load_state_dict`` restores their weights and positions."""
        self.next_number = state["next_number"]
        self.records = {r["number"]: TrialRecord(**r) for r in state["trials"]}
        by_name = {r.name: r for r in self.records.values()}
        for name in state["active"]:
            config, _ = self._adapter(by_name[name].number)
            self._place(trainer, by_name[name].number, config)

    def ordered_records(self) -> list[TrialRecord]:
        return [self.records[n] for n in sorted(self.records)]
