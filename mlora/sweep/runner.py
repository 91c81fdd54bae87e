"""``run_sweep``: a hyperparameter search trained in one process on one loaded base model.

The lifecycle: validate (config, pruner options, data of every trial, the base model's
modules) -> load the base once -> train, trials entering and leaving the trainer's places at
step boundaries (``mlora.sweep.places``) -> write the outputs (``mlora.sweep.outputs``).
Everything goes to ``DIR/SWEEP/``: each trial's adapter ``trial-NNN/``, the Optuna study
``study.db``, the run records for ``--resume``, and the result files.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from mlora.config.schema import TrainConfig, build_adapter
from mlora.config.sweep import SweepConfig
from mlora.core.atomic import output_lock
from mlora.core.errors import MloraError
from mlora.core.hub import before_loading
from mlora.model.base_model import resolve_base_model
from mlora.model.loading import plan_base_load
from mlora.model.multi_lora import MultiLoraModel
from mlora.sweep.folder import check_sweep_folder, clear_sweep_outputs
from mlora.sweep.outputs import (
    CURVES_PNG,
    RESULT_JSON,
    TRIALS_CSV,
    TrialRecord,
    copy_best_adapter,
    plot_curves,
    summary_table,
    write_result_json,
    write_trials_csv,
)
from mlora.sweep.places import SweepPlaces, TrialData
from mlora.sweep.study import SweepStudy, check_pruner_options, optuna_quiet
from mlora.training.checkpoints import (
    clear_run_state,
    drop_newer_files,
    find_resume_point,
    read_run_state,
)
from mlora.training.preflight import check_seed, preflight
from mlora.training.run_records import RunIdentity
from mlora.training.trainer import Trainer

logger = logging.getLogger("mlora")


@dataclasses.dataclass
class SweepResult:
    """What ``run_sweep`` returns: every trial's record, the best trial's number (None when
    none completed) and the sweep's folder."""

    records: list[TrialRecord]
    best: int | None
    folder: Path
    trainer: Trainer


def sweep_train_config(config: TrainConfig) -> TrainConfig:
    """The run-wide config a sweep trains with: ``concurrent`` places, every one in each step."""
    assert config.sweep is not None
    places = config.sweep.concurrent
    return dataclasses.replace(
        config, train_lora_candidate_num=places, train_lora_simultaneously_num=places
    )


def preflight_config(config: TrainConfig, sweep: SweepConfig) -> TrainConfig:
    """One adapter per ``target_modules`` and ``data`` choice (the rest as the base), for the
    checks that need only the model's config (target modules exist, data sources, cutoff)."""
    variants: list[dict] = [{}]
    for key in ("target_modules", "data"):
        if key in sweep.space:
            variants = [{**v, key: c} for v in variants for c in sweep.space[key].choices]
    adapters = [
        build_adapter({**sweep.base, **v, "name": f"trial-{i:03d}"}, f"{config.source}: sweep")
        for i, v in enumerate(variants)
    ]
    return dataclasses.replace(config, lora=adapters, sweep=None)


def run_sweep(
    config: TrainConfig,
    base_model: str,
    output_dir: str | Path = ".",
    seed: int = 42,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    show: bool = True,
) -> SweepResult:
    """Run the sweep of ``config`` (a config with a ``sweep`` block) into ``output_dir/SWEEP``.

    Args:
        resume: continue the interrupted sweep in that folder exactly (same trials, same
            parameters; running trials continue where they were).
        show: print the summary table at the end.

    Raises:
        MloraError: bad config, data or model (one line each, before the model loads), an
            existing folder without ``overwrite``/``resume``, nothing to resume.
    """
    sweep = config.sweep
    if sweep is None:
        raise MloraError(f"{config.source}: no 'sweep' block")
    check_pruner_options(sweep, config.source)
    check_seed(seed)
    folder = Path(output_dir) / sweep.name
    plan = plan_base_load(device, dtype, quantize, attn_implementation)
    train_config = sweep_train_config(config)
    identity = RunIdentity(train_config, seed, base_model)
    with output_lock(folder), optuna_quiet():
        point = find_resume_point(folder, identity) if resume else None
        if point is None:
            check_sweep_folder(folder, overwrite)
        model_path = resolve_base_model(base_model)
        before_loading(model_path, "base model")
        preflight(preflight_config(config, sweep), model_path, folder, trust_remote_code)
        plan.backend.manual_seed(seed)
        tokenizer = plan.load_tokenizer(model_path, trust_remote_code)
        data = TrialData(train_config, sweep, tokenizer, seed)  # every trial's rows, now
        if point is None:  # every check passed: an old sweep's outputs go (--overwrite)
            clear_sweep_outputs(folder)
        study = SweepStudy(sweep, folder, seed, resume=point is not None)
        hf_model, _ = plan.load(model_path, trust_remote_code, tokenizer)
        trainer = Trainer(
            MultiLoraModel(hf_model), tokenizer, train_config, {}, folder, seed, base_model,
            validation_rows={},
        )  # fmt: skip
        places = SweepPlaces(sweep, study, data, config.source)
        trainer.places, trainer.validation.judge = places, places.judge
        trainer.step_hooks.append(places)  # after the validation hook
        trainer.checkpoint_policy.enabled = True  # a cut at every trial's end: always resumable
        if point is not None:
            state = read_run_state(point, folder, identity)
            places.load_state_dict(state["sweep"], trainer)
            trainer.load_state_dict(state)
            drop_newer_files(folder, point, identity)
        else:
            clear_run_state(folder, identity)
        places.fill(trainer)  # the first trials (or, resumed, any place a cut left free)
        trainer.train()
        records, best = places.ordered_records(), study.best_number()
        write_outputs(folder, sweep, records, best)
    if show:
        print(summary_table(records, best))
    return SweepResult(records, best, folder, trainer)


def write_outputs(
    folder: Path, sweep: SweepConfig, records: list[TrialRecord], best: int | None
) -> None:
    """``trials.csv``, ``sweep_result.json``, ``validation_curves.png`` and ``best_adapter/``."""
    write_trials_csv(folder / TRIALS_CSV, records)
    description = {"name": sweep.name, "sampler": sweep.sampler, "pruner": sweep.pruner,
                   "trials": sweep.trials, "concurrent": sweep.concurrent}  # fmt: skip
    write_result_json(folder / RESULT_JSON, description, records, best)
    title = f"sweep {sweep.name}: {sweep.sampler} sampler, pruner {sweep.pruner}"
    plot_curves(folder / CURVES_PNG, records, best, title)
    if best is not None:
        target = copy_best_adapter(folder, folder / sweep.trial_name(best))
        logger.info("best trial %s; its adapter copied to %s", sweep.trial_name(best), target)
