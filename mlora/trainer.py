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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mlora.backends import get_backend
from mlora.batch import collate
from mlora.checkpointing import (
    apply_gradient_checkpointing,
    checkpoint_mode,
    resolve_checkpoint_mode,
)
from mlora.config import LINEAR_MOE_STRATEGIES, MIXLORA_STRATEGIES, AdapterConfig, TrainConfig
from mlora.data import TokenizedRow, load_rows, pad_token_id, tokenize_rows
from mlora.dispatcher import AdapterQueue, Dispatcher, MicroBatch, name_seed
from mlora.distributed import Distributed
from mlora.errors import MloraError
from mlora.eval_tasks import CHOICE_TASKS, training_rows
from mlora.interrupt import GracefulStop, TrainingInterrupted
from mlora.model import LoraSpec, MultiLoraModel
from mlora.optim import build_optimizer, build_scheduler, step_unless
from mlora.persistence import (
    load_adapter_weights,
    peft_config,
    read_adapter,
    save_adapter,
    spec_from_peft_config,
)
from mlora.prompts import load_template

logger = logging.getLogger("mlora")


def adapter_seed(seed: int, name: str) -> int:
    """A per-adapter seed, so an adapter's init does not depend on which others exist."""
    return name_seed(seed, name) % (2**63)


def spec_from_config(config: AdapterConfig) -> LoraSpec:
    if config.routing_strategy in MIXLORA_STRATEGIES:
        from mlora.moe import mixlora_spec

        return mixlora_spec(config)
    if config.routing_strategy in LINEAR_MOE_STRATEGIES:
        from mlora.linear_moe import linear_moe_spec

        return linear_moe_spec(config)
    if config.routing_strategy == "meteora":
        from mlora.meteora_persistence import meteora_spec

        return meteora_spec(config)
    return LoraSpec(
        r=config.r,
        scaling=config.scaling,
        dropout=config.lora_dropout,
        target_modules=tuple(config.target_module_names),
        init=config.lora_init,
        use_dora=config.use_dora,
    )


def prepare_data(config: TrainConfig, tokenizer) -> dict[str, list[TokenizedRow]]:
    """Load and tokenize every adapter's training data (before the model loads: fail fast)."""
    out = {}
    for adapter in config.lora:
        template = load_template(adapter.prompt)
        if adapter.task_name in CHOICE_TASKS:  # question -> right choice, as evaluation scores
            rows = training_rows(adapter.task_name, adapter.data, adapter.name)
        else:
            rows = load_rows(adapter.data)
        task_field = adapter.moe("task_field") if adapter.routing_strategy == "meteora" else None
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
        self.checkpoints_written: dict[str, int] = {}  # adapter -> STEP of its newest folder
        self._cut_due = False
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
        elif config.routing_strategy == "meteora":  # the adapters it embeds, from their folders
            from mlora.meteora_persistence import load_embedded_adapters

            load_embedded_adapters(self.model, config.name)
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
        if self.config.save_step and self.global_step == 0:
            self.save_cut()  # step-0: --resume after an early crash starts over exactly
        consoles = [lg for lg in (logging.getLogger(), logger) if lg.handlers]
        try:  # log lines printed above the bar, never through it
            with GracefulStop() as stop, logging_redirect_tqdm(consoles):
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
                cut = self.save_cut()
                if signal_name:
                    interrupted = TrainingInterrupted(
                        f"stopped by {signal_name} after global step {self.global_step}; "
                        f"checkpoint {cut} written"
                    )
                    interrupted.quiet = not self.dist.is_main  # rank 0 says it, once
                    raise interrupted
        if self.config.save_step and self.last_cut_step != self.global_step:
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
            if self.config.save_step and (
                run.steps_done % self.config.save_step == 0 or run.finished
            ):
                self._cut_due = True
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
        # Router losses are means over a micro-batch's tokens: each rank holding rows of it adds
        # its own, so their sum over ranks is divided by how many ranks hold rows.
        holders = [min(dist.world_size, len(step[i][1].rows)) for i in local]
        # Built and queued before the forward: a blocking copy after it would wait for the GPU.
        divisors = torch.tensor(
            [
                [step[i][1].step_tokens, step[i][1].accumulation * h]
                for i, h in zip(local, holders, strict=True)
            ],
            dtype=torch.float32,
        ).to(self.model.device, non_blocking=True)
        # (S,) fp32: token-loss sums over the step's supervised tokens, + router losses / micro
        losses = self.model.segment_losses(batch, divisors[:, 0], divisors[:, 1])
        losses.sum().backward()
        detached = losses.detach()
        for k, i in enumerate(local):
            out[i] = detached[k]
        return out

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
        from mlora.checkpoint import last_good_checkpoint

        run.optimizer.zero_grad(set_to_none=True)
        run.queue.stop()
        run.steps_done = adapter_step - 1
        run.failed = (
            f"adapter {run.name}: non-finite loss at adapter step {adapter_step} "
            f"(global step {global_step}); stopped it, the others carry on; "
            f"last good checkpoint: {last_good_checkpoint(self, run)}"
        )
        logger.error("%s", run.failed)
        if self.config.save_step:
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

    def save_final(self, run: AdapterRun) -> Path:
        folder = self.output_dir / run.name
        save_adapter(self.model, run.name, folder, self.adapter_config_json(run))
        self._saved.append(f"adapter {run.name}: finished, saved to {folder}")
        return folder

    def _log_saved(self) -> None:
        """The adapters saved this step, said after the step's loss line (not before it)."""
        for line in self._saved:
            logger.info("%s", line)
        self._saved.clear()

    def save_cut(self) -> Path:
        """Write a resumable snapshot of every adapter at this global step (see checkpoint.py)."""
        from mlora.checkpoint import cut_path, write_cut

        self.check_faults()  # a stopped adapter is saved as failed, never with a skipped step
        self._cut_due, self.last_cut_step = False, self.global_step
        self.consolidate_partial_steps()
        rng = self.dist.gather(self.backend.get_rng_state())  # every rank's, for --resume
        return write_cut(self, rng) if self.dist.is_main else cut_path(self)
