"""A run's state as plain values (``state_dict``) and a fresh trainer put back in it
(``load_state_dict``): snapshots of adapters' weights and optimizers, the gradients of a step in
progress (``pending``), and the replay that brings an adapter from its newest snapshot to its
saved position. ``checkpoints.py`` writes and reads these dicts; it never imports the trainer.

``ResumableTrainer`` is a part of ``Trainer`` (trainer.py), kept beside it so the loop stays on
one screen; it reads and sets the trainer's state and keeps none of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch

from mlora.batching.dispatcher import MicroBatch
from mlora.core.errors import MloraError
from mlora.hardware.backends import Backend
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import load_adapter_weights
from mlora.training.adapter_run import AdapterRun, cpu_copy
from mlora.training.distributed import Distributed
from mlora.training.metrics.collector import StepCollector
from mlora.training.validation import Validation

logger = logging.getLogger("mlora")


class ResumableTrainer:
    """The trainer's ``state_dict`` / ``load_state_dict`` (a part of ``Trainer``)."""

    model: MultiLoraModel
    runs: list[AdapterRun]
    dist: Distributed
    backend: Backend
    global_step: int
    last_cut_step: int | None
    resumed_at: int | None
    places: Any
    validation: Validation
    collector: StepCollector
    step_counts: dict[str, tuple[int, int]]
    tokens_seen: int
    padded_tokens: int

    if TYPE_CHECKING:

        def train_step(self, step: list[tuple[AdapterRun, MicroBatch]]) -> None: ...

        def weights_copy(self, run: AdapterRun) -> dict[str, torch.Tensor]: ...

        def adapter_config_json(self, run: AdapterRun) -> dict: ...

    def state_dict(self, full: Collection[str] | None = None) -> dict[str, Any]:
        """The training state as plain values and CPU tensor copies (torch's convention).

        Every adapter's progress (status, step counters, data position, loss bookkeeping, and
        ``checkpoint_step``: the step of its newest checkpoint folder), the global step and
        each adapter's noise stream. The running adapters in ``full`` (None: all) also carry
        a ``snapshot`` (weights under PEFT names, ``adapter_config``, optimizer and scheduler
        state, ``steps_done`` and the data position at the start of the step in progress) and
        that step's ``pending`` gradients and loss, if any.
        """
        adapters = {}
        for run in self.runs:
            entry = run.progress_state()
            validation = self.validation.state_dict(run.name)
            if validation is not None:
                entry["validation"] = validation
            if run.status == "running" and (full is None or run.name in full):
                entry["snapshot"] = self._snapshot(run)
                pending = run.pending_state()
                if pending is not None:
                    entry["pending"] = pending
            adapters[run.name] = entry
        state = {
            "global_step": self.global_step,
            "adapter_rng": self.model.context.generators.state_dict(),
            "adapters": adapters,
        }
        if self.places is not None:
            state["sweep"] = self.places.state_dict()
        return state

    def _snapshot(self, run: AdapterRun) -> dict[str, Any]:
        queue = run.queue.step_start_state()
        return {
            "steps_done": run.steps_done,
            "queue": queue,
            "epoch_order": run.queue.epoch_order(queue["epoch"]),
            "weights": self.weights_copy(run),
            "adapter_config": self.adapter_config_json(run),
            "optimizer": cpu_copy(run.optimizer.state_dict()),
            "scheduler": cpu_copy(run.scheduler.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put a freshly built trainer in the state ``state`` describes (``state_dict``'s
        form; ``checkpoint.read_run_state`` reads one from disk, with ``rng``: this rank's
        global RNG state).

        A running adapter without ``pending`` is restored from its ``snapshot`` (or its
        initial state when it has none) and replayed, alone, up to its position in ``state``:
        its results depend on its own data, noise and state only, so the replay recomputes
        exactly the state it had.

        Raises:
            MloraError: a snapshot of other training data, or a position it cannot reach.
        """
        replays = []
        for run in self.runs:
            entry = state["adapters"][run.name]
            self.validation.load_state(run.name, entry.get("validation"), run.config.save_best)
            run.checkpoint_step = entry["checkpoint_step"]
            snapshot = entry.get("snapshot")
            if entry["status"] != "running":
                run.queue.load_state_dict(entry["queue"])
                run.steps_done, run.failed = entry["steps_done"], entry["message"]
                run.left = True
                if snapshot is not None:  # finished: its final weights
                    load_adapter_weights(
                        self.model, run.name, snapshot["weights"], snapshot["source"]
                    )
                continue
            if snapshot is not None:
                self._load_snapshot(run, snapshot)
            elif run.steps_done or run.queue.micro_steps_done:
                raise MloraError(f"adapter {run.name!r}: load_state_dict needs a fresh trainer")
            if "pending" in entry:
                run.queue.load_state_dict(entry["queue"])
                run.steps_done = entry["steps_done"]
                self._load_pending(run, entry["pending"])
            else:
                replays.append((run, entry))
        self._replay(replays)
        for run in self.runs:
            entry = state["adapters"][run.name]
            run.loss_count, run.tokens = entry["loss_count"], entry["tokens"]
            run.history = list(entry["history"])
            loss_sum = entry["loss_sum"]
            run.loss_sum = None if loss_sum is None else loss_sum.to(self.model.device).reshape(())
        self.global_step = self.last_cut_step = self.resumed_at = state["global_step"]
        self.model.context.generators.load_state_dict(state["adapter_rng"])
        if state.get("rng") is not None:
            self.backend.set_rng_state(state["rng"])

    def _load_snapshot(self, run: AdapterRun, snapshot: dict[str, Any]) -> None:
        source = snapshot.get("source", f"the state of adapter {run.name!r}")
        run.queue.check_same_order(snapshot["queue"]["epoch"], snapshot.get("epoch_order"), source)
        load_adapter_weights(self.model, run.name, snapshot["weights"], str(source))
        run.optimizer.load_state_dict(snapshot["optimizer"])
        run.scheduler.load_state_dict(snapshot["scheduler"])
        run.steps_done = snapshot["steps_done"]
        run.queue.load_state_dict(snapshot["queue"])

    def _load_pending(self, run: AdapterRun, pending: dict[str, Any]) -> None:
        """The step in progress: rank 0 takes the saved partial sums (the whole run's), the
        other ranks start the step from zero."""
        main = self.dist.is_main
        popped = run.queue.popped_in_step()  # its metrics row counts the whole step
        self.step_counts[run.name] = (
            sum(len(mb.rows) for mb in popped),
            sum(len(row) for mb in popped for row in mb.rows),
        )
        for i, param in enumerate(run.params):
            grad = pending["grads"].get(str(i)) if main else None
            param.grad = None if grad is None else grad.to(device=param.device, dtype=param.dtype)
        step_loss = pending["step_loss"]
        if step_loss is not None and not main:
            step_loss = torch.zeros_like(step_loss)
        run.step_loss = None if step_loss is None else step_loss.to(self.model.device).reshape(())

    def _replay(self, replays: list[tuple[AdapterRun, dict[str, Any]]]) -> None:
        """Re-run the micro-batches of ``replays``' adapters from their restored position to
        their position in the state (several adapters share each pass, as in training)."""
        targets = []
        for run, entry in replays:
            target = entry["queue"]["micro_steps_done"]
            if run.queue.micro_steps_done > target:
                raise MloraError(
                    f"adapter {run.name!r}: its checkpoint is past the position it resumes to "
                    f"({run.queue.micro_steps_done} > {target} micro-batches)"
                )
            if run.queue.micro_steps_done < target:
                logger.info(
                    "adapter %s: replaying %d micro-batch(es) from %s",
                    run.name,
                    target - run.queue.micro_steps_done,
                    f"checkpoint-{run.steps_done}" if run.steps_done else "the start",
                )
                targets.append((run, entry, target))
        if not targets:
            return
        seen, padded, training = self.tokens_seen, self.padded_tokens, self.model.training
        self.model.train()
        try:
            while behind := [r for r, _, t in targets if r.queue.micro_steps_done < t]:
                self.train_step([(run, run.queue.pop()) for run in behind])
        finally:
            self.model.train(training)
        self.tokens_seen, self.padded_tokens = seen, padded
        self.collector.clear()  # steps the interrupted run logged already
        for run, entry, _ in targets:
            self.model.context.aux_losses.take_loads(run.name)  # not this run's to log
            if run.queue.state_dict() != entry["queue"] or run.steps_done != entry["steps_done"]:
                raise MloraError(
                    f"adapter {run.name!r}: replaying its checkpoint did not reach the saved "
                    f"position {entry['queue']} (step {entry['steps_done']})"
                )
