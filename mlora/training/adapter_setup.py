"""Building one adapter's run: its layers added to the model with their own seeded init and noise
stream, initial weights (``--load_adapter``, or MeteoRA's embedded LoRAs), data queue, optimizer
and schedule. Used when the run starts and when an adapter enters it (``Trainer.enter``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mlora.adapters.kinds import kind_for_config
from mlora.adapters.spec import LoraSpec
from mlora.batching.dispatcher import AdapterQueue
from mlora.config.schema import AdapterConfig
from mlora.core.errors import MloraError
from mlora.data.preference import PAIR_ROWS
from mlora.data.rows import TokenizedRow
from mlora.model.multi_lora import MultiLoraModel
from mlora.persistence.adapter_files import (
    load_adapter_weights,
    read_adapter,
    spec_from_peft_config,
)
from mlora.training.adapter_run import AdapterRun
from mlora.training.data_preparation import adapter_seed, spec_from_config
from mlora.training.objectives import Objective, objective_rows
from mlora.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger("mlora")


def setup_adapter(
    model: MultiLoraModel,
    config: AdapterConfig,
    rows: list[TokenizedRow],
    init_from: Path | None,
    seed: int,
    pad_token_id: int,
) -> AdapterRun:
    """Add adapter ``config`` to ``model`` (seeded init, its noise stream, its initial weights)
    and build its run: data queue, optimizer and schedule."""
    spec = spec_from_config(config)
    objective = Objective.from_config(config)
    rows = objective_rows(objective, rows, model, pad_token_id)  # before the adapter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed(seed, config.name))
        model.add_adapter(config.name, spec)
    model.context.generators.seed(config.name, adapter_seed(seed, config.name))
    if init_from is not None:
        load_initial_weights(model, config, spec, init_from)
    elif (load_fresh := kind_for_config(config).load_fresh) is not None:
        load_fresh(model, config.name)  # MeteoRA: the LoRAs it embeds, from their folders
    queue = AdapterQueue(
        config.name,
        rows,
        config.batch_size,
        config.micro_batch_size or config.batch_size,
        config.num_epochs,
        shuffle=config.shuffle,
        group_by_length=config.group_by_length,
        seed=seed,
        rows_per_item=PAIR_ROWS if objective.pairs else 1,
        max_steps=config.max_steps,
    )
    named = [
        (f"{path}.{n}", p)
        for path, module in model.adapter_modules(config.name)
        for n, p in module.named_parameters()
        if p.requires_grad  # MeteoRA's embedded LoRAs are frozen unless train_loras
    ]
    optimizer = build_optimizer(config, named)
    scheduler = build_scheduler(config, optimizer, queue.total_steps)
    run = AdapterRun(config, queue, optimizer, scheduler, objective=objective)
    run.fault, run.fault_at = (
        run.fault.to(model.device),
        run.fault_at.to(model.device),
    )
    return run


def load_initial_weights(
    model: MultiLoraModel, config: AdapterConfig, spec: LoraSpec, folder: Path
) -> None:
    """Load ``folder``'s saved adapter into ``config``'s fresh adapter (``--load_adapter``),
    after checking that its shape matches the config."""
    saved, tensors = read_adapter(folder)
    saved_spec = spec_from_peft_config(saved, str(folder))
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
                f"adapter {config.name!r}: {key} is {ours} in the config but {theirs} in {folder}"
            )
    load_adapter_weights(model, config.name, tensors, str(folder))
    logger.info("adapter %s: continuing from %s", config.name, folder)
