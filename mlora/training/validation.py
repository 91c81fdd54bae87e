"""Validation while training: each adapter's validation loss, early stopping and its best weights.

An adapter with ``val_data`` (or rows held out of ``data`` by ``val_set_size``) is validated
every ``eval_steps`` of its optimizer steps (or at the steps of a list) and at its end. All
adapters due at one step are validated together: their validation rows are packed into the same
batches, one layout segment per adapter, and run once through the model without gradients
(``MultiLoraModel.token_losses``, the loss code training uses). The validation loss is the mean
token cross-entropy over the supervised tokens of all its rows.

Early stopping follows transformers' ``EarlyStoppingCallback`` on ``eval_loss``: a validation
counts as an improvement when its loss is below the best so far by more than
``early_stopping_threshold``; after ``early_stopping_patience`` validations in a row without one,
the adapter stops (and frees its place in the batch). The best loss itself is the lowest seen
(``TrainerState.best_metric``), and with ``save_best`` the adapter's folder ends with the weights
of that step.

The per-adapter state (curve, best step and loss, patience counter, why it stopped) is part of
the trainer's state, so ``--resume`` continues it; the best weights so far live in
``DIR/NAME/best/`` while the adapter trains (a resume reads them back) and are removed once
the final folder holds them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlora.batching.collate import collate
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.core.atomic import atomic_write_text
from mlora.data.holdout import split_rows
from mlora.data.prompts import load_template
from mlora.data.rows import TokenizedRow, load_rows, tokenize_rows
from mlora.data.tasks import CHOICE_TASKS, training_rows
from mlora.data.token_cache import cached_rows, data_key
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import read_adapter, write_adapter_files
from mlora.training.adapter_run import AdapterRun
from mlora.training.evaluation_schedule import EvalSteps, evaluates_at

logger = logging.getLogger("mlora")

BEST_FOLDER = "best"
RECORD_NAME = "validation.json"
# Why an adapter stopped before its last epoch (``ValidationState.stopped``).
EARLY_STOPPED, PRUNED = "early_stopping", "pruned"


def has_validation(adapter: AdapterConfig) -> bool:
    return adapter.val_data is not None or adapter.val_set_size is not None


def _raw_rows(adapter: AdapterConfig, source: str) -> list[dict[str, Any]]:
    """The rows of ``source`` as the adapter's training reads them (choice tasks: question ->
    right choice)."""
    if adapter.task_name in CHOICE_TASKS:
        return training_rows(adapter.task_name, source, adapter.name)
    return load_rows(source)


def training_rows_of(adapter: AdapterConfig, seed: int) -> list[dict[str, Any]]:
    """The adapter's training rows: its data, less the rows ``val_set_size`` holds out."""
    rows = _raw_rows(adapter, adapter.data)
    if adapter.val_set_size is None:
        return rows
    return split_rows(rows, adapter.val_set_size, seed, adapter.data)[0]


def adapter_data_key(
    config: TrainConfig,
    adapter: AdapterConfig,
    tokenizer: Any,
    seed: int,
    split: str,
    settings: dict[str, Any] | None = None,
) -> str | None:
    """The tokenized data cache's key for ``adapter``'s ``"train"`` or ``"validation"`` rows
    (None: ``data_cache`` is off, or the data cannot be cached). Every key that changes the
    rows goes in here; ``settings`` adds the caller's own (format, task field).

    A new config key that changes tokenization must be added here (see CONTRIBUTING.md)."""
    if not config.data_cache:
        return None
    source = adapter.val_data if split == "validation" and adapter.val_data else adapter.data
    held_out = source == adapter.data and adapter.val_set_size is not None
    template = load_template(adapter.prompt)
    parts = {
        "split": split,
        "task_name": adapter.task_name if adapter.task_name in CHOICE_TASKS else None,
        "val_set_size": adapter.val_set_size if held_out else None,
        "seed": seed if held_out else None,
        "template": [template.prompt_input, template.prompt_no_input],
        "cutoff_len": config.cutoff_len,
        "train_on_inputs": adapter.train_on_inputs,
        **(settings or {}),
    }
    return data_key(source, tokenizer, parts)


def validation_rows_of(
    adapter: AdapterConfig,
    tokenizer: Any,
    cutoff_len: int,
    seed: int,
    config: TrainConfig | None = None,
) -> list[TokenizedRow]:
    """The adapter's tokenized validation rows (``val_data``, or the held-out rows), tokenized
    exactly as its training rows are (same template, cutoff and label masking); from the
    tokenized data cache when ``config`` is given and its ``data_cache`` is on."""

    def build() -> tuple[str, list[TokenizedRow]]:
        if adapter.val_data is not None:
            rows, source = _raw_rows(adapter, adapter.val_data), adapter.val_data
        else:
            assert adapter.val_set_size is not None
            all_rows = _raw_rows(adapter, adapter.data)
            rows = split_rows(all_rows, adapter.val_set_size, seed, adapter.data)[1]
            source = adapter.data
        return "alpaca", tokenize_rows(
            rows, tokenizer, load_template(adapter.prompt), cutoff_len, adapter.train_on_inputs,
            source=source,
        )  # fmt: skip

    key = None
    if config is not None:
        key = adapter_data_key(config, adapter, tokenizer, seed, "validation")
    return cached_rows(key, build)[1]


def prepare_validation(
    config: TrainConfig, tokenizer: Any, seed: int
) -> dict[str, list[TokenizedRow]]:
    """Every validated adapter's tokenized validation rows (before the model loads)."""
    return {
        a.name: validation_rows_of(a, tokenizer, config.cutoff_len, seed, config)
        for a in config.lora
        if has_validation(a)
    }


@torch.no_grad()
def validation_losses(
    model: MultiLoraModel, pad_id: int, sets: Sequence[tuple[str, Sequence[TokenizedRow], int]]
) -> list[float]:
    """Mean token cross-entropy of each ``(adapter, rows, rows per batch)`` over its rows'
    supervised tokens, all adapters packed into the same batches (one pass, not one per adapter).

    The model is put in eval mode (no dropout) for the pass and back after; one host read at
    the end.
    """
    device = model.device
    sums = torch.zeros(len(sets), dtype=torch.float32, device=device)
    tokens = [sum(row.num_supervised for row in rows) for _, rows, _ in sets]
    was_training = model.training
    model.eval()
    try:
        step = 0
        while True:
            picked = [
                (k, name, rows[step * size : (step + 1) * size])
                for k, (name, rows, size) in enumerate(sets)
                if step * size < len(rows)
            ]
            if not picked:
                break
            batch = collate(
                [(name, list(chunk)) for _, name, chunk in picked],
                pad_id,
                device,
                packed=model.packing,
                stream=model.packing_form == "stream",
            )
            token_loss = model.token_losses(batch)  # (N,)
            per_segment = token_loss.new_zeros(len(picked)).index_add(0, batch.owners, token_loss)
            index = torch.tensor([k for k, _, _ in picked], device=device)
            sums.index_add_(0, index, per_segment.float())
            step += 1
    finally:
        model.train(was_training)
    return [s / n if n else math.nan for s, n in zip(sums.tolist(), tokens, strict=True)]


@dataclass
class ValidationState:
    """One adapter's validation record (JSON-able: it goes into each run-level cut).

    Attributes:
        curve: ``[adapter step, validation loss]`` of every validation so far.
        best_step, best_loss: the lowest loss and the step it was seen at.
        bad_evals: validations in a row without an improvement (the patience counter).
        stopped: ``"early_stopping"`` or ``"pruned"`` once it stopped early, else None.
    """

    curve: list[list[float]] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float | None = None
    bad_evals: int = 0
    stopped: str | None = None

    @property
    def last_step(self) -> int:
        return int(self.curve[-1][0]) if self.curve else 0

    def record(self, step: int, loss: float, threshold: float) -> bool:
        """Add a validation; returns whether it is the new best (its weights are kept).

        The patience counter resets only on an improvement over the best by more than
        ``threshold`` (``EarlyStoppingCallback.check_metric_value``); the best itself moves on
        any lower loss (``Trainer._determine_best_metric``).
        """
        best = self.best_loss
        improved = best is None or (loss < best and abs(loss - best) > threshold)
        self.bad_evals = 0 if improved else self.bad_evals + 1
        self.curve.append([step, loss])
        if best is None or loss < best:
            self.best_step, self.best_loss = step, loss
            return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "curve": [list(point) for point in self.curve],
            "best_step": self.best_step,
            "best_val_loss": self.best_loss,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValidationState:
        return cls(
            curve=[list(point) for point in data["curve"]],
            best_step=data["best_step"],
            best_loss=data["best_val_loss"],
            bad_evals=data["bad_evals"],
            stopped=data["stopped"],
        )


# Told each validation of an adapter (name, its step, the loss, whether the adapter ends there:
# then it only records); answers whether to stop it now (the sweep's pruner).
Judge = Callable[[str, int, float, bool], bool]


class Validation:
    """The evaluation schedule and state of every validated adapter of one trainer.

    Args:
        model: the trainer's model.
        pad_id: the tokenizer's pad id.
        rows: validation rows by adapter name (``prepare_validation``).
        output_dir: adapters' folders ``output_dir/NAME`` (the best weights go below them).
        judge: asked after each validation whether to stop the adapter (the sweep's pruner);
            called only for validations not yet in the state (a resume's replay never asks).
    """

    def __init__(
        self,
        model: MultiLoraModel,
        pad_id: int,
        rows: dict[str, list[TokenizedRow]] | None,
        output_dir: Path,
        judge: Judge | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.rows = dict(rows or {})
        self.output_dir = output_dir
        self.judge = judge
        self.states: dict[str, ValidationState] = {}
        self.best_weights: dict[str, dict[str, torch.Tensor]] = {}
        self.fresh_best: list[str] = []  # new best weights found by the last ``validate``

    def add(self, name: str, rows: list[TokenizedRow]) -> None:
        """Validation rows of an adapter that enters after the start (a sweep's trial)."""
        self.rows[name] = rows

    def state(self, name: str) -> ValidationState | None:
        if name not in self.rows:
            return None
        return self.states.setdefault(name, ValidationState())

    def eval_steps(self, run: AdapterRun) -> EvalSteps:
        """``run``'s validation schedule for the evaluation schedule (None: only at its end)."""
        return run.config.eval_steps if run.name in self.rows else None

    def due(self, config: AdapterConfig, steps_done: int, finished: bool) -> bool:
        """Whether ``config``'s adapter validates after its optimizer step ``steps_done``."""
        state = self.state(config.name)
        if state is None or steps_done <= state.last_step:  # replayed: already validated
            return False
        return finished or evaluates_at(config.eval_steps, steps_done)

    def validate(
        self, due: Sequence[tuple[AdapterConfig, int, bool]], weights: Callable[[str], dict]
    ) -> list[str]:
        """Validate the adapters ``due`` (config, steps done, whether that was its last step)
        in one pass; record their losses, keep new best weights (``save_best``:
        ``weights(name)`` gives a CPU copy) and return the names that must stop now (the judge
        or early stopping), with ``stopped`` set."""
        if not due:
            return []
        sets = [(c.name, self.rows[c.name], c.evaluate_batch_size) for c, _, _ in due]
        losses = validation_losses(self.model, self.pad_id, sets)
        stopping = []
        for (config, step, last), loss in zip(due, losses, strict=True):
            state = self.state(config.name)
            assert state is not None
            if state.record(step, loss, config.early_stopping_threshold) and config.save_best:
                self.best_weights[config.name] = weights(config.name)
                self.fresh_best.append(config.name)
            logger.info(
                "adapter %s | step %d | val_loss %.4f | best %.4f (step %s)",
                config.name, step, loss, state.best_loss, state.best_step,
            )  # fmt: skip
            patience = config.early_stopping_patience
            if self.judge is not None and self.judge(config.name, step, loss, last):
                state.stopped = PRUNED
            elif patience is not None and state.bad_evals >= patience and not last:
                state.stopped = EARLY_STOPPED
                logger.info(
                    "adapter %s: early stopping at step %d (%d validations without improvement)",
                    config.name, step, state.bad_evals,
                )  # fmt: skip
            if state.stopped is not None:
                stopping.append(config.name)
        return stopping

    def best_folder(self, name: str) -> Path:
        return self.output_dir / name / BEST_FOLDER

    def take_fresh_best(self) -> list[str]:
        """The adapters whose best weights the last ``validate`` replaced (once)."""
        names, self.fresh_best = self.fresh_best, []
        return names

    def best_write(self, name: str, config_json: dict) -> Callable[[], None]:
        """The write (for the background writer) of ``name``'s best weights so far, with its
        record, into ``DIR/NAME/best/``."""
        tensors, state = self.best_weights[name], self.states[name]
        folder, record = self.best_folder(name), json.dumps(state.to_json(), indent=1) + "\n"

        def write() -> None:
            write_adapter_files(folder, tensors, config_json)
            atomic_write_text(folder / RECORD_NAME, record)

        return write

    def final_write(
        self, name: str, final: dict[str, torch.Tensor], config_json: dict
    ) -> Callable[[], None]:
        """The write of ``name``'s final folder: its best weights with ``save_best`` (else
        ``final``) and its ``validation.json``; then its ``best/`` folder goes."""
        state = self.states.get(name)
        tensors = self.best_weights.get(name, final)
        folder = self.output_dir / name
        record = None if state is None else json.dumps(state.to_json(), indent=1) + "\n"
        best = self.best_folder(name)

        def write() -> None:
            write_adapter_files(folder, tensors, config_json)
            if record is not None:
                atomic_write_text(folder / RECORD_NAME, record)
            shutil.rmtree(best, ignore_errors=True)

        return write

    def state_dict(self, name: str) -> dict[str, Any] | None:
        state = self.states.get(name)
        return None if state is None else state.to_json()

    def load_state(self, name: str, data: dict[str, Any] | None, save_best: bool) -> None:
        """Restore ``name``'s record from a cut, and with ``save_best`` its best weights from
        ``DIR/NAME/best/`` (written when that best was found, before any later cut)."""
        if data is None or name not in self.rows:
            return
        state = ValidationState.from_json(data)
        self.states[name] = state
        if save_best and state.best_step is not None:
            _, tensors = read_adapter(self.best_folder(name))
            self.best_weights[name] = tensors
