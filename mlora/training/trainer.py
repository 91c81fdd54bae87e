"""The training recipe: many adapters, one frozen base, one forward and one backward per step.

Lifecycle: ``setup`` (data, adapters, optimizers) -> ``train`` (the step loop) -> ``save``.
Each step the dispatcher picks the adapters that share it; their micro-batches are packed into
one sequence (or padded rows) whose layout gives each adapter its own token segment. The loss of
each adapter is the sum of its token losses divided by its supervised tokens in the whole
optimizer step (token-weighted accumulation: ``micro_batch_size`` changes memory, not the
result); one backward fills every adapter's gradients (segments never mix and each adapter draws
dropout from its own random stream, so each adapter gets exactly the gradient it would get
alone), and each adapter steps its own optimizer and schedule when its batch is complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mlora.batching.collate import LossBatch, collate
from mlora.batching.dispatcher import Dispatcher, MicroBatch, MicroBatchShard
from mlora.batching.passes import forward_passes, pass_size, resolve_pass_tokens
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.errors import MloraError
from mlora.core.interrupt import GracefulStop, TrainingInterrupted
from mlora.data.rows import TokenizedRow, pad_token_id
from mlora.hardware.backends import get_backend
from mlora.hardware.peak_flops import peak_flops
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.adapter_run import AdapterRun
from mlora.training.adapter_setup import setup_adapter
from mlora.training.checkpoint_policy import CheckpointPolicy
from mlora.training.checkpoints import RunCheckpoints, checkpoint_folder
from mlora.training.data_preparation import adapter_seed, prepare_data, spec_from_config
from mlora.training.distributed import Distributed
from mlora.training.evaluation_schedule import EvaluationSchedule
from mlora.training.faults import FaultMonitor
from mlora.training.gradient_sync import gradient_sync
from mlora.training.metrics.collector import StepCollector
from mlora.training.metrics.log_lines import LogLineSink, MetricsSink
from mlora.training.metrics.progress import ProgressSink, in_notebook
from mlora.training.metrics.sinks import RowSinks
from mlora.training.metrics.throughput import FlopsEstimate, RunMeter
from mlora.training.objectives import plan_objectives
from mlora.training.recompute import (
    apply_gradient_checkpointing,
    checkpoint_mode,
    resolve_checkpoint_mode,
)
from mlora.training.reporting import ReportingTrainer
from mlora.training.resume import ResumableTrainer
from mlora.training.run_records import RunIdentity
from mlora.training.saving import SavingTrainer
from mlora.training.step_hooks import Outcome, RunControl, StepBoundary, StepHook
from mlora.training.validation import Validation, prepare_validation

# prepare_data, spec_from_config, adapter_seed: still importable from here, as before
__all__ = ["Trainer", "adapter_seed", "prepare_data", "spec_from_config"]

logger = logging.getLogger("mlora")


class Trainer(ReportingTrainer, SavingTrainer, ResumableTrainer):
    """Trains every adapter of a config on one ``MultiLoraModel``.

    The step (``train_step``) is collate, forward, loss, backward, gradient sync and optimizer
    steps; around it, at each step boundary, sit small collaborators: ``sync`` (one process or
    data parallel, ``gradient_sync.py``), ``faults`` (non-finite losses, ``faults.py``),
    ``checkpoint_policy`` (when a cut is written, ``checkpoint_policy.py``), ``sinks`` (where
    logged results go, ``metrics/log_lines.py``) and ``step_hooks`` (evaluation and anything else
    that acts between steps, ``step_hooks.py``). Adapters leave the run through ``leave``
    (finished, stopped) and may enter through ``enter``, both at step boundaries. Its other
    parts sit in modules beside it: building an adapter's run (``adapter_setup.py``), metrics
    rows and reports (``ReportingTrainer``, ``reporting.py``), final saves and checkpoint cuts
    (``SavingTrainer``, ``saving.py``) and ``state_dict`` / ``load_state_dict``
    (``ResumableTrainer``, ``resume.py``).

    Args:
        model: the wrapped frozen base model.
        tokenizer: its tokenizer (pad id for collation).
        config: the validated run config.
        data: tokenized rows per adapter name (see ``prepare_data``).
        output_dir: adapters go to ``output_dir/NAME``.
        seed: seeds data order and adapter initialisation.
        base_model_name: recorded in each saved ``adapter_config.json``.
        init_from: adapter folders to continue from, by adapter name (``--load_adapter``).
        dist: this process's place in a data-parallel group (default: a single process). Each
            rank trains on its share of every micro-batch; only rank 0 writes files and logs.
        sinks: where each log interval's per-adapter results go (default: the log lines).
        step_hooks: called at every step boundary, in order (see ``step_hooks.py``), after
            the validation of the adapters that have validation data (``validation.py``).
        validation_rows: tokenized validation rows by adapter name (``prepare_validation``;
            None: prepared here from the config and ``seed``).
    """

    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer,
        config: TrainConfig,
        data: dict[str, list[TokenizedRow]],
        output_dir: str | Path,
        seed: int = 42,
        base_model_name: str | None = None,
        init_from: dict[str, Path] | None = None,
        dist: Distributed | None = None,
        sinks: Sequence[MetricsSink] | None = None,
        step_hooks: Sequence[StepHook] = (),
        validation_rows: dict[str, list[TokenizedRow]] | None = None,
    ) -> None:
        self.model = model
        self.dist = dist or Distributed()
        self.sync = gradient_sync(self.dist, model.device)
        self.faults = FaultMonitor()
        self.sinks: list[MetricsSink] = [LogLineSink()] if sinks is None else list(sinks)
        if validation_rows is None:
            validation_rows = prepare_validation(config, tokenizer, seed)
        self.validation = Validation(model, pad_token_id(tokenizer), validation_rows, output_dir)
        validate = EvaluationSchedule(self.validation.eval_steps, self._validate)
        self.step_hooks: list[StepHook] = [validate, *step_hooks]
        self.places: Any = None  # a sweep's trials: its state goes into each cut (mlora.sweep)
        self.tokenizer = tokenizer
        self.config = config
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.base_model_name = base_model_name
        self.pad_token_id = pad_token_id(tokenizer)
        self.runs = [
            self._setup_adapter(a, data[a.name], (init_from or {}).get(a.name)) for a in config.lora
        ]
        self._run_of_queue = {id(run.queue): run for run in self.runs}
        count = len(self.runs)
        self.dispatcher = Dispatcher(
            [run.queue for run in self.runs],
            candidate_num=config.train_lora_candidate_num or count,
            simultaneous_num=config.train_lora_simultaneously_num or count,
            strategy=config.train_strategy,
        )
        self.global_step = 0
        self.init_from = dict(init_from or {})
        identity = RunIdentity(config, seed, base_model_name)
        self.run_id = identity.run_id  # names this run's metrics rows
        self.checkpoints = RunCheckpoints(
            self.output_dir,
            identity,
            config.save_total_limit,
            load_adapter=bool(self.init_from),
        )
        self.checkpoint_policy = CheckpointPolicy(config.save_step, self.runs)
        self._saved: list[str] = []  # "finished, saved" lines, logged after the step's line
        self.last_cut_step: int | None = None
        self.backend = get_backend(str(model.device))
        self.gradient_checkpoint = resolve_checkpoint_mode(config.gradient_checkpoint, self.backend)
        if self.gradient_checkpoint != "none" or checkpoint_mode(model.model) != "none":
            apply_gradient_checkpointing(
                model.model,
                self.gradient_checkpoint,
                self.backend,
                model.context.aux_losses,
                model.context.generators,
                model.context,
            )
            logger.info("gradient checkpointing: %s per decoder layer", self.gradient_checkpoint)
        model.set_packing(config.packing)
        model.loss_chunk_mb = config.loss_chunk_mb
        self.pass_tokens = resolve_pass_tokens(config.pass_tokens, self.backend.name)
        self.sync.adapters_changed(model, [run.name for run in self.runs])
        self.tokens_seen = 0  # tokens of every pass so far, padding included
        self.padded_tokens = 0
        # Per-step metrics rows: each step waits on the device in ``collector`` until the log
        # interval, then goes to ``row_sinks`` (rank 0: metrics file, trackers, progress bar).
        self.row_sinks = RowSinks()
        self.collector = StepCollector()
        self.step_counts: dict[str, tuple[int, int]] = {}  # rows, tokens of the step in progress
        self.meter = RunMeter(
            FlopsEstimate.of(
                model.model, {r.name: sum(p.numel() for p in r.params) for r in self.runs}
            ),
            peak_flops(self.backend.device_name(), model.model.dtype),
            self.dist.world_size,
        )
        self.resumed_at: int | None = None  # the global step load_state_dict resumed at

    @property
    def checkpointing(self) -> bool:
        """Whether any adapter of the run writes checkpoints."""
        return self.checkpoint_policy.enabled

    # --- setup ---------------------------------------------------------------------------------

    def _setup_adapter(
        self, config: AdapterConfig, rows: list[TokenizedRow], init_from: Path | None
    ) -> AdapterRun:
        """One adapter's run (``adapter_setup.py``) on this trainer's model, seed and pad id."""
        return setup_adapter(self.model, config, rows, init_from, self.seed, self.pad_token_id)

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, list[float]]:
        """Run until every adapter has done all its epochs; returns each adapter's loss history."""
        self.model.train()
        total = sum(run.queue.total_micro_batches - run.queue.micro_steps_done for run in self.runs)
        progress = tqdm(
            total=total,
            desc="training",
            unit="micro-batch",
            # a terminal, or a notebook (its output is no terminal, yet shows a bar)
            disable=True if not self.dist.is_main else False if in_notebook() else None,
        )
        if self.dist.is_main:
            self.row_sinks.add(ProgressSink(progress))
            self.row_sinks.start(self._run_start())
        self.meter.restart()
        consoles = [lg for lg in (logging.getLogger(), logger) if lg.handlers]
        try:  # log lines printed above the bar, never through it
            with (
                self.checkpoints.writer,  # waits for the pending writes, raises their error
                GracefulStop() as stop,
                logging_redirect_tqdm(consoles),
            ):
                if self.checkpointing and self.global_step == 0:
                    self.save_cut()  # step-0: --resume after an early crash starts over exactly
                self._loop(stop, progress)
        finally:
            progress.close()
            self._log_saved()
            self.row_sinks.close(finished=self.dispatcher.finished)
        peak = self.backend.memory_stats()["peak"]  # CPU: process peak RSS; GPU: allocator peak
        logger.info("peak memory %.0f MiB on %s", peak / 2**20, self.backend.device)
        if self.tokens_seen:
            logger.info(
                "padding: %.1f%% of %d tokens (rows %s)",
                100 * self.padded_tokens / self.tokens_seen,
                self.tokens_seen,
                {"stream": "in one stream", "bins": "packed in bins", "padded": "padded"}[
                    self.model.packing_form
                ],
            )
        return {run.name: run.history for run in self.runs}

    def _loop(self, stop: GracefulStop, progress) -> None:
        last_report = time.perf_counter()
        while not self.dispatcher.finished:
            self.checkpoints.writer.check()  # a failed background write stops the run here
            step = [(self._run_of_queue[id(q)], mb) for q, mb in self.dispatcher.next_step()]
            self.train_step(step)
            self.global_step += 1
            self._step_boundary([run for run, mb in step if mb.ends_step])
            progress.update(len(step))
            due = self.global_step % self.config.log_step == 0
            if due or self.dispatcher.finished or self._saved:
                now = time.perf_counter()
                self._report(now - last_report)
                last_report = now
            self._log_saved()
            signal_name = self.sync.agreed_signal(stop)
            if self.checkpoint_policy.cut_due or (signal_name and not self.dispatcher.finished):
                cut = self.save_cut(every_adapter=bool(signal_name))
                if signal_name and not self.dispatcher.finished:  # (finished: nothing to stop)
                    self.checkpoints.writer.flush()  # written before we say so
                    interrupted = TrainingInterrupted(
                        f"stopped by {signal_name} after global step {self.global_step}; "
                        f"checkpoint {cut} written"
                    )
                    interrupted.quiet = not self.dist.is_main  # rank 0 says it, once
                    raise interrupted
        if self.checkpointing and self.last_cut_step != self.global_step:
            self.save_cut()  # the end: --resume of a finished run has nothing left to do

    def train_step(self, step: list[tuple[AdapterRun, MicroBatch]]) -> None:
        """A forward and a backward for every adapter in ``step``, then the optimizer steps of
        those whose batch is complete.

        The step's micro-batches share one pass, or several where they hold more tokens than
        ``pass_tokens`` (``forward_passes``): each adapter's segment lies whole in one pass and
        draws from its own random stream, so its gradients are the same either way.

        With several processes this one runs its share of each micro-batch (possibly none of
        some adapter's); token losses are still divided by the whole step's supervised tokens,
        so the gradients summed over processes at the optimizer step are the one-process ones.
        """
        context = self.model.context
        for run, _ in step:  # each micro-batch's noise from (seed, adapter, its index) alone
            context.generators.start_pass(run.name, run.queue.micro_steps_done)
        shards = [self.sync.shard(mb) for _, mb in step]
        sizes = [pass_size(mb.rows, self.model.packing_form) for _, mb in step]
        losses = [  # detached, per entry: the passes are consecutive groups, in step order
            loss
            for entries in forward_passes(sizes, self.pass_tokens)
            for loss in self._forward_backward(
                [step[i] for i in entries], [shards[i] for i in entries]
            )
        ]
        for (run, mb), loss in zip(step, losses, strict=True):
            tokens = sum(len(row) for row in mb.rows)
            run.add_micro_batch(loss, tokens)
            self._count_micro_batch(run, mb, tokens)
        ending = [run for run, mb in step if mb.ends_step]
        self.sync.sum_step(ending)  # gradients and step losses: the sums over processes
        for run, mb in [(run, mb) for run, mb in step if mb.ends_step]:
            self.faults.flag(run, self.global_step)  # a non-finite step is never applied
            self._collect_step(run, mb)
            run.optimizer_step()

    def _forward_backward(
        self, step: list[tuple[AdapterRun, MicroBatch]], shards: list[MicroBatchShard]
    ) -> list[torch.Tensor]:
        """One pass over these entries of a step: forward, losses, backward. Returns their
        detached losses (zero where this process has no rows)."""
        context = self.model.context
        local = [i for i, shard in enumerate(shards) if shard.rows]
        losses = [torch.zeros((), device=self.model.device)] * len(step)
        if local:
            batch = self._collate([(step[i][0].name, shards[i]) for i in local])
            # (S, 2) queued before the forward: a blocking copy after it would wait for the GPU
            divisors = torch.tensor(
                [[step[i][1].step_tokens, step[i][1].accumulation] for i in local],
                dtype=torch.float32,
            ).to(self.model.device, non_blocking=True)
            plan = plan_objectives(  # preference adapters: their objective over their pairs
                [(step[i][0].objective, shards[i].rows, step[i][1].step_items,
                  step[i][1].step_tokens) for i in local],
                self.model.device,
            )  # fmt: skip
            # (S,) fp32: token-loss sums over the step's supervised tokens (+ router losses)
            segment = self.model.segment_losses(batch, divisors[:, 0], divisors[:, 1], plan)
        else:
            context.aux_losses.clear()
        names = [run.name for run, _ in step]
        router = self.sync.router_losses(context.aux_losses, names, [names[i] for i in local])
        if local:
            if router is not None:  # data parallel: over the whole micro-batches, per micro
                segment = segment + router / divisors[:, 1]
            with context.install(batch.pass_state()):  # what a recomputed layer reads
                segment.sum().backward()
            detached = segment.detach()
            for k, i in enumerate(local):
                losses[i] = detached[k]
        return losses

    def _collate(self, shards: list[tuple[str, MicroBatchShard]]) -> LossBatch:
        """This process's rows of the step as one batch (packed or padded, as the model)."""
        batch = collate(
            [(name, shard.rows) for name, shard in shards],
            self.pad_token_id,
            self.model.device,
            packed=self.model.packing,
            stream=self.model.packing_form == "stream",
            shards=[shard for _, shard in shards] if self.sync.sharded else None,
        )
        self.tokens_seen += batch.num_tokens
        self.padded_tokens += batch.padded_tokens
        return batch

    def _step_boundary(self, stepped: list[AdapterRun]) -> None:
        """After a global step: the checkpoint schedule, the step hooks, then the adapters
        whose last step it was leave the run (saved)."""
        for run in stepped:
            self.checkpoint_policy.stepped(run)
        if any(run.finished for run in stepped):
            self.check_faults()  # never save an adapter whose skipped step is unread
        boundary = StepBoundary(self.global_step, tuple(r for r in stepped if not r.left))
        for hook in self.step_hooks:
            hook(boundary, self)
        for run in boundary.stepped:
            if run.finished and not run.left:
                self.leave(run, "finished")

    # --- adapters entering and leaving ---------------------------------------------------------

    def leave(self, run: AdapterRun, outcome: Outcome, message: str | None = None) -> None:
        """``run`` leaves the run at this step boundary and takes no further step.

        Args:
            run: one of ``self.runs``, still in the run.
            outcome: "finished" saves its adapter (its last step, or an early stop) to
                ``output_dir/NAME``; "failed" saves nothing.
            message: why (logged; "failed" records it as the adapter's status message).
        """
        if run.left:
            raise RuntimeError(f"adapter {run.name!r} already left the run")
        run.left = True
        run.queue.stop()
        run.optimizer.zero_grad(set_to_none=True)
        run.step_loss = None
        if outcome == "failed":
            run.failed = message or f"adapter {run.name}: stopped"
            logger.error("%s", run.failed)
        else:
            if message:
                logger.info("adapter %s: %s", run.name, message)
            if self.dist.is_main:
                self.save_final(run)
        self.checkpoint_policy.left(run)

    def enter(self, config: AdapterConfig, rows: Sequence[TokenizedRow]) -> AdapterRun:
        """Add an adapter at this step boundary; it takes part from the next step on, with its
        own seeded init, noise, optimizer and schedule, so it trains as it would alone.

        Args:
            config: its validated config (a name no adapter of the run has).
            rows: its tokenized training rows.

        Raises:
            MloraError: an adapter of that name is already in the run.
        """
        if any(run.name == config.name for run in self.runs):
            raise MloraError(f"adapter {config.name!r} is already in the run")
        run = self._setup_adapter(config, list(rows), None)
        self.runs.append(run)
        self._run_of_queue[id(run.queue)] = run
        self.dispatcher.add(run.queue)
        if not self.config.train_lora_candidate_num:  # (unset: every adapter is a candidate)
            self.dispatcher.candidate_num = len(self.runs)
        if not self.config.train_lora_simultaneously_num:
            self.dispatcher.simultaneous_num = len(self.runs)
        self.checkpoint_policy.entered(run)
        self.sync.adapters_changed(self.model, [r.name for r in self.runs])
        self.model.train(self.model.training)  # its modules take the model's mode
        return run

    def retire(self, run: AdapterRun) -> None:
        """Take an adapter that left the run out of the model (its files are written or
        queued): its weights, gradients and optimizer state are freed; the base is untouched."""
        if not run.left:
            raise RuntimeError(f"adapter {run.name!r} is still in the run")
        self.model.remove_adapter(run.name)
        run.optimizer.state.clear()
        for group in run.optimizer.param_groups:
            group["params"] = []
        self.runs.remove(run)
        del self._run_of_queue[id(run.queue)]
        self.dispatcher.queues.remove(run.queue)
        self.sync.adapters_changed(self.model, [r.name for r in self.runs])

    # --- validation ------------------------------------------------------------------------

    def _validate(self, due: Sequence[AdapterRun], control: RunControl) -> None:
        """The evaluation schedule's callback: validate the due adapters that have validation
        data in one pass, queue new best weights, and let those that early stopping (or a
        sweep's pruner) ends leave the run (their place is free at once)."""
        due = [r for r in due if self.validation.due(r.config, r.steps_done, r.finished)]
        if not due:
            return
        by_name = {run.name: run for run in due}
        stopping = self.validation.validate(
            [(run.config, run.steps_done, run.finished) for run in due],
            lambda name: self.weights_copy(by_name[name]),
        )
        if self.dist.is_main:
            self._log_validation(due)
        for name in self.validation.take_fresh_best():  # queued before a final save removes them
            if self.dist.is_main:
                config = self.adapter_config_json(by_name[name])
                self.checkpoints.writer.submit(self.validation.best_write(name, config))
        for name in stopping:
            state = self.validation.states[name]
            control.leave(by_name[name], "finished", f"{state.stopped} at step {state.last_step}")

    # --- faults ----------------------------------------------------------------------------------

    def consolidate_partial_steps(self) -> None:
        """Before a checkpoint: move the partial gradients and step losses of adapters in the
        middle of a gradient accumulation to rank 0 (summed; nothing pending elsewhere).

        The sum at the optimizer step is then the same, and rank 0's state is the whole run's,
        which is what the checkpoint saves and what every rank resumes from (rank 0 with it,
        the others with nothing pending): a resumed run does what the uninterrupted one did,
        with this world size or another.
        """
        self.sync.consolidate(
            [r for r in self.runs if r.step_loss is not None and r.failed is None]
        )

    def check_faults(self) -> None:
        """Read every running adapter's fault flag (one host read) and stop those whose loss
        was not finite. Called before logging, saving and reading results."""
        for fault in self.faults.read([r for r in self.runs if not r.left]):
            run = fault.run
            run.steps_done = fault.adapter_step - 1  # that update and later ones were skipped
            good = (
                "none (no checkpoint written yet)"
                if run.checkpoint_step is None
                else checkpoint_folder(self.output_dir, run.name, run.checkpoint_step)
            )
            self.leave(
                run,
                "failed",
                f"adapter {run.name}: non-finite loss at adapter step {fault.adapter_step} "
                f"(global step {fault.global_step}); stopped it, the others carry on; "
                f"last good checkpoint: {good}",
            )
