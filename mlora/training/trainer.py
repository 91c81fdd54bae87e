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

import copy
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mlora.adapters.spec import LoraSpec
from mlora.batching.collate import collate
from mlora.batching.dispatcher import AdapterQueue, Dispatcher, MicroBatch, name_seed
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.errors import MloraError
from mlora.core.interrupt import GracefulStop, TrainingInterrupted
from mlora.data.prompts import load_template
from mlora.data.rows import TokenizedRow, load_rows, pad_token_id, tokenize_rows
from mlora.data.tasks import CHOICE_TASKS, training_rows
from mlora.hardware.backends import get_backend
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import (
    adapter_state_dict,
    load_adapter_weights,
    peft_config,
    read_adapter,
    spec_from_peft_config,
    write_adapter_files,
)
from mlora.persistence.kinds import kind_for_config
from mlora.training.checkpoints import RunCheckpoints, checkpoint_folder
from mlora.training.distributed import Distributed, grouped_expert_dropout, router_stat_slots
from mlora.training.optim import build_optimizer, build_scheduler, step_unless
from mlora.training.recompute import (
    apply_gradient_checkpointing,
    checkpoint_mode,
    resolve_checkpoint_mode,
)
from mlora.training.run_records import RunIdentity

logger = logging.getLogger("mlora")


def adapter_seed(seed: int, name: str) -> int:
    """A per-adapter seed, so an adapter's init does not depend on which others exist."""
    return name_seed(seed, name) % (2**63)


def spec_from_config(config: AdapterConfig) -> LoraSpec:
    """The spec of a validated adapter config, built by its kind (``mlora.persistence.kinds``)."""
    return kind_for_config(config).spec_from_config(config)


def prepare_data(config: TrainConfig, tokenizer) -> dict[str, list[TokenizedRow]]:
    """Load and tokenize every adapter's training data (before the model loads: fail fast)."""
    out = {}
    for adapter in config.lora:
        template = load_template(adapter.prompt)
        if adapter.task_name in CHOICE_TASKS:  # question -> right choice, as evaluation scores
            rows = training_rows(adapter.task_name, adapter.data, adapter.name)
        else:
            rows = load_rows(adapter.data)
        task_field = kind_for_config(adapter).task_field(adapter)
        out[adapter.name] = tokenize_rows(
            rows,
            tokenizer,
            template,
            config.cutoff_len,
            adapter.train_on_inputs,
            source=adapter.data,
            task_field=task_field,
            task_names=[Path(folder).name for folder in adapter.adapters or ()],
        )
    return out


@dataclass
class AdapterRun:
    """Training state of one adapter."""

    config: AdapterConfig
    queue: AdapterQueue
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_done: int = 0
    loss_sum: torch.Tensor | None = None  # on device; read only when logging
    step_loss: torch.Tensor | None = None  # on device; loss of the optimizer step in progress
    failed: str | None = None  # why the adapter was stopped (non-finite loss)
    # On the device: 1.0 once a step's loss was not finite (its updates are skipped from then
    # on), and the (adapter step, global step) where that happened. Read when logging/saving.
    fault: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    fault_at: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.long))
    loss_count: float = 0.0  # optimizer steps ``loss_sum`` covers (fractions mid-step)
    tokens: int = 0
    history: list[float] = field(default_factory=list)
    expert_load: list[list[float]] = field(default_factory=list)  # MoE: per-expert token share
    checkpoint_step: int | None = None  # steps_done of its newest checkpoint folder

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def finished(self) -> bool:
        return self.queue.finished

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The adapter's trainable parameters, in its optimizer's order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def status(self) -> str:
        if self.failed is not None:
            return "failed"
        return "finished" if self.finished else "running"

    def progress_state(self) -> dict[str, Any]:
        """Where the adapter stands (cheap: counters, data position, loss bookkeeping)."""
        return {
            "status": self.status,
            "message": self.failed,
            "steps_done": self.steps_done,
            "queue": self.queue.state_dict(),
            "loss_count": self.loss_count,
            "tokens": self.tokens,
            "history": list(self.history),
            "loss_sum": None if self.loss_sum is None else _own(self.loss_sum),
            "checkpoint_step": self.checkpoint_step,
        }

    def pending_state(self) -> dict[str, Any] | None:
        """The gradients and loss of the optimizer step in progress (None between steps)."""
        grads = {str(i): _own(p.grad) for i, p in enumerate(self.params) if p.grad is not None}
        if not grads and self.step_loss is None:
            return None
        step_loss = None if self.step_loss is None else _own(self.step_loss)
        return {"grads": grads, "step_loss": step_loss}


def _own(value: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage: the loop may change the original while a
    background thread writes the copy (and safetensors refuses shared storage)."""
    return value.detach().to("cpu", copy=True).contiguous()


def _cpu_copy(value: Any) -> Any:
    """``value`` (an optimizer or scheduler state dict) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return _own(value)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


class Trainer:
    """Trains every adapter of a config on one ``MultiLoraModel``.

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
    ) -> None:
        self.model = model
        self.dist = dist or Distributed()
        self.tokenizer = tokenizer
        self.config = config
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.base_model_name = base_model_name
        self.pad_token_id = pad_token_id(tokenizer)
        self.runs = [
            self._setup_adapter(a, data[a.name], (init_from or {}).get(a.name)) for a in config.lora
        ]
        count = len(self.runs)
        self.dispatcher = Dispatcher(
            [run.queue for run in self.runs],
            candidate_num=config.train_lora_candidate_num or count,
            simultaneous_num=config.train_lora_simultaneously_num or count,
            strategy=config.train_strategy,
        )
        self.global_step = 0
        self.init_from = dict(init_from or {})
        self.checkpoints = RunCheckpoints(
            self.output_dir,
            RunIdentity(config, seed, base_model_name),
            config.save_total_limit,
            load_adapter=bool(self.init_from),
        )
        self.checkpointing = any(r.config.checkpoint_every(config.save_step) for r in self.runs)
        self._cut_due = False
        self._due: set[str] = set()  # adapters whose checkpoint is due at this step
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
            )
            logger.info("gradient checkpointing: %s per decoder layer", self.gradient_checkpoint)
        model.set_packing(config.packing)
        if self.dist.enabled:  # router losses over whole micro-batches: sums reduced over ranks
            names = [run.name for run in self.runs]
            model.context.aux_losses.use_global_stats(router_stat_slots(model, names) or None)
            inexact = grouped_expert_dropout(model, names)
            if inexact and self.dist.is_main:
                logger.warning(
                    "distributed: the MoE experts of %s draw dropout per expert group, which "
                    "depends on how the rows are split over processes: they train as one "
                    "process does in distribution, not bit for bit (expert lora_dropout 0 "
                    "makes them exact)",
                    ", ".join(repr(n) for n in inexact),
                )
        self.tokens_seen = 0  # tokens of every pass so far, padding included
        self.padded_tokens = 0

    # --- setup ---------------------------------------------------------------------------------

    def _setup_adapter(
        self, config: AdapterConfig, rows: list[TokenizedRow], init_from: Path | None
    ) -> AdapterRun:
        spec = spec_from_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(adapter_seed(self.seed, config.name))
            self.model.add_adapter(config.name, spec)
        self.model.context.generators.seed(config.name, adapter_seed(self.seed, config.name))
        if init_from is not None:
            self._load_initial_weights(config, spec, init_from)
        elif (load_fresh := kind_for_config(config).load_fresh) is not None:
            load_fresh(self.model, config.name)  # MeteoRA: the LoRAs it embeds, from their folders
        queue = AdapterQueue(
            config.name,
            rows,
            config.batch_size,
            config.micro_batch_size or config.batch_size,
            config.num_epochs,
            shuffle=config.shuffle,
            group_by_length=config.group_by_length,
            seed=self.seed,
        )
        named = [
            (f"{path}.{n}", p)
            for path, module in self.model.adapter_modules(config.name)
            for n, p in module.named_parameters()
            if p.requires_grad  # MeteoRA's embedded LoRAs are frozen unless train_loras
        ]
        optimizer = build_optimizer(config, named)
        scheduler = build_scheduler(config, optimizer, queue.total_steps)
        run = AdapterRun(config, queue, optimizer, scheduler)
        run.fault, run.fault_at = (
            run.fault.to(self.model.device),
            run.fault_at.to(self.model.device),
        )
        return run

    def _load_initial_weights(self, config: AdapterConfig, spec: LoraSpec, folder: Path) -> None:
        saved, tensors = read_adapter(folder)
        saved_spec, _, _ = spec_from_peft_config(saved, str(folder))
        for key, ours, theirs in [
            ("r", spec.r, saved_spec.r),
            ("target_modules", sorted(spec.target_modules), sorted(saved_spec.target_modules)),
            (
                "target_parameters",
                sorted(spec.target_parameters),
                sorted(saved_spec.target_parameters),
            ),
            ("use_dora", spec.use_dora, saved_spec.use_dora),
        ]:
            if ours != theirs:
                raise MloraError(
                    f"adapter {config.name!r}: {key} is {ours} in the config "
                    f"but {theirs} in {folder}"
                )
        load_adapter_weights(self.model, config.name, tensors, str(folder))
        logger.info("adapter %s: continuing from %s", config.name, folder)

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, list[float]]:
        """Run until every adapter has done all its epochs; returns each adapter's loss history."""
        self.model.train()
        total = sum(run.queue.total_micro_batches - run.queue.micro_steps_done for run in self.runs)
        progress = tqdm(
            total=total,
            desc="training",
            unit="micro-batch",
            disable=None if self.dist.is_main else True,
        )
        last_log = time.perf_counter()
        by_queue = {id(run.queue): run for run in self.runs}
        consoles = [lg for lg in (logging.getLogger(), logger) if lg.handlers]
        try:  # log lines printed above the bar, never through it
            with (
                self.checkpoints.writer,  # waits for the pending writes, raises their error
                GracefulStop() as stop,
                logging_redirect_tqdm(consoles),
            ):
                if self.checkpointing and self.global_step == 0:
                    self.save_cut()  # step-0: --resume after an early crash starts over exactly
                self._loop(stop, progress, by_queue, last_log)
        finally:
            progress.close()
            self._log_saved()
            self.model.context.set(None)
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

    def _loop(self, stop: GracefulStop, progress, by_queue: dict, last_log: float) -> None:
        while not self.dispatcher.finished:
            self.checkpoints.writer.check()  # a failed background write stops the run here
            step = [(by_queue[id(q)], mb) for q, mb in self.dispatcher.next_step()]
            self.train_step(step)
            self.global_step += 1
            progress.update(len(step))
            due = self.global_step % self.config.log_step == 0
            if due or self.dispatcher.finished or self._saved:
                now = time.perf_counter()
                self._log(now - last_log)
                last_log = now
            self._log_saved()
            signal_name = self._agreed_signal(stop)
            if self._cut_due or (signal_name and not self.dispatcher.finished):
                cut = self.save_cut(every_adapter=bool(signal_name))
                if signal_name:
                    self.checkpoints.writer.flush()  # written before we say so
                    interrupted = TrainingInterrupted(
                        f"stopped by {signal_name} after global step {self.global_step}; "
                        f"checkpoint {cut} written"
                    )
                    interrupted.quiet = not self.dist.is_main  # rank 0 says it, once
                    raise interrupted
        if self.checkpointing and self.last_cut_step != self.global_step:
            self.save_cut()  # the end: --resume of a finished run has nothing left to do

    def _agreed_signal(self, stop: GracefulStop) -> str | None:
        """The signal that stops the run after this step, agreed by every rank (a launcher
        signals its processes at slightly different moments: all must stop at the same step)."""
        if not self.dist.enabled:
            return stop.signal_name
        if self.dist.any(stop.signal_name is not None):
            return stop.signal_name or "a signal to another rank"
        return None

    def train_step(self, step: list[tuple[AdapterRun, MicroBatch]]) -> None:
        """One forward and one backward for every adapter in ``step``, then due optimizer steps.

        With several processes this rank runs its share of each micro-batch (possibly none of
        some adapter's); token losses are still divided by the whole step's supervised tokens,
        so the gradients summed over ranks at the optimizer step are the one-process gradients.
        """
        for run, _ in step:  # each micro-batch's noise from (seed, adapter, its index) alone
            self.model.context.generators.start_pass(run.name, run.queue.micro_steps_done)
        losses = self._forward_backward(step)
        zero = torch.zeros((), device=self.model.device)
        for i, (run, mb) in enumerate(step):
            loss = zero if losses[i] is None else losses[i]
            run.step_loss = loss if run.step_loss is None else run.step_loss + loss
            run.tokens += sum(len(row) for row in mb.rows)
            if not self.dist.enabled:  # (data parallel: the global loss, at the step's end)
                run.loss_sum = loss if run.loss_sum is None else run.loss_sum + loss
                run.loss_count += sum(row.num_supervised for row in mb.rows) / mb.step_tokens
        ending = [run for run, mb in step if mb.ends_step]
        self._sum_over_ranks(ending)
        for run in ending:
            self._flag_non_finite(run)
            run.step_loss = None
            step_unless(run.optimizer, run.fault)  # a non-finite step is never applied
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.steps_done += 1
            every = run.config.checkpoint_every(self.config.save_step)
            if every and run.steps_done % every == 0 and not run.finished:
                self._due.add(run.name)  # its own schedule: only this adapter is written
                self._cut_due = True
            if run.finished and self.checkpointing:
                self._cut_due = True  # the manifest records it as finished
            if run.finished:
                self.check_faults()  # never save an adapter whose skipped step is unread
                if run.failed is None and self.dist.is_main:
                    self.save_final(run)

    def _forward_backward(
        self, step: list[tuple[AdapterRun, MicroBatch]]
    ) -> list[torch.Tensor | None]:
        """This rank's forward and backward over its rows of ``step``; each entry's detached
        loss (its token-loss sum over the step's supervised tokens), None where it has no rows."""
        dist = self.dist
        shards = [mb.shard(dist.rank, dist.world_size) for _, mb in step]
        local = [i for i, shard in enumerate(shards) if shard.rows]
        out: list[torch.Tensor | None] = [None] * len(step)
        if not local:
            self.model.context.aux_losses.clear()
            self._router_losses(step, [])  # joins the ranks' reduction with zeros
            return out
        batch = collate(
            [(step[i][0].name, shards[i].rows) for i in local],
            self.pad_token_id,
            self.model.device,
            packed=self.model.packing,
            stream=self.model.packing_form == "stream",
            shards=[shards[i] for i in local] if dist.enabled else None,
        )
        self.tokens_seen += batch.num_tokens
        self.padded_tokens += batch.padded_tokens
        # Built and queued before the forward: a blocking copy after it would wait for the GPU.
        divisors = torch.tensor(
            [[step[i][1].step_tokens, step[i][1].accumulation] for i in local],
            dtype=torch.float32,
        ).to(self.model.device, non_blocking=True)
        # (S,) fp32: token-loss sums over the step's supervised tokens, + router losses / micro
        losses = self.model.segment_losses(batch, divisors[:, 0], divisors[:, 1])
        router = self._router_losses(step, [step[i][0].name for i in local])
        if router is not None:
            losses = losses + router / divisors[:, 1]
        losses.sum().backward()
        detached = losses.detach()
        for k, i in enumerate(local):
            out[i] = detached[k]
        return out

    def _router_losses(
        self, step: list[tuple[AdapterRun, MicroBatch]], local: list[str]
    ) -> torch.Tensor | None:
        """Data parallel: (S,) router losses of this rank's segments (adapters ``local``) over
        their whole micro-batches, from the router sums of this pass reduced over all ranks
        (one collective, which every rank joins); None when no adapter has router sums."""
        collector = self.model.context.aux_losses
        if not collector.global_stats:
            return None
        zero = torch.zeros((), device=self.model.device)
        found = collector.reduce_stats(
            [run.name for run, _ in step], zero, self.dist.all_reduce_flat
        )
        if not found or not local:
            return None
        return torch.stack([found.get(name, zero) for name in local])

    def consolidate_partial_steps(self) -> None:
        """Before a checkpoint: move the partial gradients and step losses of adapters in the
        middle of a gradient accumulation to rank 0 (summed; nothing pending elsewhere).

        The sum at the optimizer step is then the same, and rank 0's state is the whole run's,
        which is what the checkpoint saves and what every rank resumes from (rank 0 with it,
        the others with nothing pending): a resumed run does what the uninterrupted one did,
        with this world size or another.
        """
        pending = [r for r in self.runs if r.step_loss is not None and r.failed is None]
        if self.dist.enabled and pending:
            self._reduce_over_ranks(pending, keep=self.dist.is_main)

    def _reduce_over_ranks(self, runs: list[AdapterRun], keep: bool) -> None:
        """One ``all_reduce`` over one flat buffer of ``runs``' gradients and step losses; the
        sums replace this rank's own (``keep``), or this rank's share is dropped."""
        params = [p for run in runs for p in run.params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        local_losses = [run.step_loss for run in runs]
        summed = self.dist.all_reduce_flat([*grads, *(loss.reshape(1) for loss in local_losses)])
        for param, grad in zip(params, summed, strict=False):
            param.grad = grad if keep else None
        for run, local, total in zip(runs, local_losses, summed[len(params) :], strict=True):
            run.step_loss = total.reshape(()) if keep else torch.zeros_like(local)

    def _sum_over_ranks(self, ending: list[AdapterRun]) -> None:
        """Sum the gradients and step losses of the adapters that step now over every rank, so
        every rank applies the same update (a rank without rows of an adapter adds zeros); the
        logged loss is the global step loss."""
        if not self.dist.enabled or not ending:
            return
        self._reduce_over_ranks(ending, keep=True)
        for run in ending:
            assert run.step_loss is not None
            run.loss_sum = run.step_loss if run.loss_sum is None else run.loss_sum + run.step_loss
            run.loss_count += 1

    def _flag_non_finite(self, run: AdapterRun) -> None:
        """Raise ``run``'s device fault flag if this step's loss is not finite (no host read);
        from then on its updates are skipped until ``check_faults`` stops it."""
        assert run.step_loss is not None
        first = (run.fault == 0) & ~torch.isfinite(run.step_loss)
        at = run.fault_at  # the Python ints below ride along as kernel scalars: no copy, no sync
        run.fault_at = torch.stack(
            [
                torch.where(first, run.steps_done + 1, at[0]),
                torch.where(first, self.global_step + 1, at[1]),
            ]
        )
        run.fault = torch.maximum(run.fault, first.float())

    def check_faults(self) -> None:
        """Read every running adapter's fault flag (one host read) and stop those whose loss
        was not finite. Called before logging and saving."""
        watched = [r for r in self.runs if r.failed is None]
        if not watched:
            return
        flags = torch.stack([torch.cat([r.fault.view(1).long(), r.fault_at]) for r in watched])
        for run, (bad, adapter_step, global_step) in zip(watched, flags.tolist(), strict=True):
            if bad:
                self._stop_adapter(run, adapter_step, global_step)

    def _stop_adapter(self, run: AdapterRun, adapter_step: int, global_step: int) -> None:
        """Stop an adapter whose loss was not finite at ``adapter_step``; that update and every
        later one were skipped on the device, so its weights are those of the step before."""
        run.optimizer.zero_grad(set_to_none=True)
        run.queue.stop()
        run.steps_done = adapter_step - 1
        good = (
            "none (no checkpoint written yet)"
            if run.checkpoint_step is None
            else checkpoint_folder(self.output_dir, run.name, run.checkpoint_step)
        )
        run.failed = (
            f"adapter {run.name}: non-finite loss at adapter step {adapter_step} "
            f"(global step {global_step}); stopped it, the others carry on; "
            f"last good checkpoint: {good}"
        )
        logger.error("%s", run.failed)
        self._due.discard(run.name)
        if self.checkpointing:
            self._cut_due = True

    def _log(self, elapsed: float) -> None:
        self.check_faults()
        logged = [run for run in self.runs if run.loss_count]
        if not logged:
            return
        # One host read for every adapter's mean loss, every log_step steps.
        means = torch.stack([run.loss_sum / run.loss_count for run in logged]).tolist()
        for run, loss in zip(logged, means, strict=True):
            run.history.append(loss)
            lr = run.optimizer.param_groups[0]["lr"]
            logger.info(
                "step %d | %s | epoch %d | adapter step %d/%d | loss %.4f | lr %.3e | %.0f tok/s",
                self.global_step, run.name, min(run.queue.epoch + 1, run.config.num_epochs),
                run.steps_done, run.queue.total_steps, loss, lr, run.tokens / max(elapsed, 1e-9),
            )  # fmt: skip
            loads = self.model.context.aux_losses.take_loads(run.name)
            if loads is not None:  # MoE adapters: share of routed tokens per expert, all layers
                shares = loads.tolist()
                run.expert_load.append(shares)
                names = getattr(self.model.specs[run.name], "expert_names", None)  # MeteoRA
                logger.info(
                    "step %d | %s | %s load %s",
                    self.global_step, run.name, "adapter" if names else "expert",
                    " ".join(f"{n} {v:.2f}" if names else f"{v:.2f}"
                             for n, v in zip(names or shares, shares, strict=True)),
                )  # fmt: skip
            if not math.isfinite(loss):
                logger.warning("adapter %s: loss is %s", run.name, loss)
            run.loss_sum, run.loss_count, run.tokens = None, 0.0, 0

    # --- saving --------------------------------------------------------------------------------

    def adapter_config_json(self, run: AdapterRun) -> dict:
        spec = self.model.specs[run.name]
        return peft_config(spec, run.config.lora_alpha, run.config.use_rslora, self.base_model_name)

    def weights_copy(self, run: AdapterRun) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys, as CPU copies the writer thread owns."""
        return {key: _own(t) for key, t in adapter_state_dict(self.model, run.name).items()}

    def save_final(self, run: AdapterRun) -> Path:
        """Queue the finished adapter's PEFT files on the checkpoint writer: one ordered stream
        of writes (a later cut that records it as finished is written after its files)."""
        folder = self.output_dir / run.name
        tensors = self.weights_copy(run)
        config = self.adapter_config_json(run)
        self.checkpoints.writer.submit(lambda: write_adapter_files(folder, tensors, config))
        self._saved.append(f"adapter {run.name}: finished, saved to {folder}")
        return folder

    def _log_saved(self) -> None:
        """The adapters saved this step, said after the step's loss line (not before it)."""
        for line in self._saved:
            logger.info("%s", line)
        self._saved.clear()

    def save_cut(self, every_adapter: bool = False) -> Path:
        """Take a run-level cut at this global step (see checkpoints.py); returns its path.

        Args:
            every_adapter: save every running adapter at this step, gradients in progress
                included (Ctrl-C / SIGTERM: the resume then replays nothing); otherwise only
                the adapters whose own checkpoint is due get a folder.
        """
        self.check_faults()  # a stopped adapter is saved as failed, never with a skipped step
        self._cut_due, self.last_cut_step = False, self.global_step
        due = None if every_adapter else set(self._due)
        self._due.clear()
        if every_adapter:
            self.consolidate_partial_steps()
        rng = self.dist.gather(self.backend.get_rng_state())  # every rank's, for --resume
        path = self.checkpoints.cut_path(self.global_step)
        if self.dist.is_main:
            path = self.checkpoints.save(self.state_dict(due), rng)
        for run in self.runs:
            if run.status == "running" and (due is None or run.name in due) and run.steps_done:
                run.checkpoint_step = run.steps_done  # its folder now (or already) holds this step
        return path

    # --- state -----------------------------------------------------------------------------

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
            if run.status == "running" and (full is None or run.name in full):
                entry["snapshot"] = self._snapshot(run)
                pending = run.pending_state()
                if pending is not None:
                    entry["pending"] = pending
            adapters[run.name] = entry
        return {
            "global_step": self.global_step,
            "adapter_rng": self.model.context.generators.state_dict(),
            "adapters": adapters,
        }

    def _snapshot(self, run: AdapterRun) -> dict[str, Any]:
        queue = run.queue.step_start_state()
        return {
            "steps_done": run.steps_done,
            "queue": queue,
            "epoch_order": run.queue.epoch_order(queue["epoch"]),
            "weights": self.weights_copy(run),
            "adapter_config": self.adapter_config_json(run),
            "optimizer": _cpu_copy(run.optimizer.state_dict()),
            "scheduler": _cpu_copy(run.scheduler.state_dict()),
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
            run.checkpoint_step = entry["checkpoint_step"]
            snapshot = entry.get("snapshot")
            if entry["status"] != "running":
                run.queue.load_state_dict(entry["queue"])
                run.steps_done, run.failed = entry["steps_done"], entry["message"]
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
        self.global_step = self.last_cut_step = state["global_step"]
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
            self.model.context.set(None)
        self.tokens_seen, self.padded_tokens = seen, padded
        self._cut_due = False
        self._due.clear()
        for run, entry, _ in targets:
            self.model.context.aux_losses.take_loads(run.name)  # not this run's to log
            if run.queue.state_dict() != entry["queue"] or run.steps_done != entry["steps_done"]:
                raise MloraError(
                    f"adapter {run.name!r}: replaying its checkpoint did not reach the saved "
                    f"position {entry['queue']} (step {entry['steps_done']})"
                )
