"""The Optuna side of a sweep: the study, its sampler and pruner, asking and telling.

Everything here is Optuna's own: ``Study.ask`` with the search space as fixed distributions
(define-and-run), its samplers (``GridSampler``, ``RandomSampler``, ``TPESampler``), pruners
(``MedianPruner``, ``SuccessiveHalvingPruner``, ``HyperbandPruner``, ``NopPruner``) and its
RDB storage: a SQLite file ``DIR/SWEEP/study.db``, written at every ask, report and tell, so a
study outlives a crash and ``optuna-dashboard sqlite:///DIR/SWEEP/study.db`` opens it.

Exact resume: a resumed sweep replays training from its last checkpoint while the study may
already hold what came after it. So a trial the study already has is reused (its number, its
parameters), a decision the study already holds (a reported step, a prune) is read back rather
than asked again, and the sampler is re-seeded before every ask from the run's seed and the
trial's number (a sampler's random state would otherwise depend on how many asks this process
made). Every ask, report and prune then gives what the uninterrupted sweep got.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from mlora.config.sweep import SweepConfig
from mlora.core.errors import ConfigError

STUDY_FILE = "study.db"
PRUNER_CLASSES: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
PRIMITIVE = (type(None), bool, int, float, str)

logger = logging.getLogger("mlora")


@contextlib.contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna's INFO lines (a study created, each trial told) off while a sweep runs, since our
    log says what happens; Optuna's verbosity is put back after, so a program that imports mlora
    keeps its own setting. (Optuna 5 warns about nothing a sweep uses: no ``ExperimentalWarning``
    is raised, and a test keeps it so; none is silenced.)"""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def check_pruner_options(sweep: SweepConfig, source: str) -> None:
    """``pruner_options`` must be keyword arguments of the Optuna pruner's constructor.

    Raises:
        ConfigError: naming the option.
    """
    accepted = inspect.signature(PRUNER_CLASSES[sweep.pruner]).parameters
    for key in sweep.pruner_options:
        if key not in accepted:
            raise ConfigError(
                f"{source}: sweep: key 'pruner_options.{key}' is no option of Optuna's "
                f"{PRUNER_CLASSES[sweep.pruner].__name__} (options: {', '.join(accepted)})"
            )


def _encode(choice: Any) -> Any:
    """A choice as an Optuna categorical value: lists and objects as their JSON text."""
    return choice if isinstance(choice, PRIMITIVE) else json.dumps(choice)


def distributions(sweep: SweepConfig) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions."""
    out: dict[str, BaseDistribution] = {}
    for key, dim in sweep.space.items():
        if dim.kind == "choice":
            out[key] = CategoricalDistribution([_encode(c) for c in dim.choices])
        elif dim.kind == "int":
            out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.log,
                                       step=int(dim.step or 1))  # fmt: skip
        else:
            out[key] = FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return out


def adapter_values(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna parameters as adapter keys (JSON-encoded choices decoded)."""
    out = {}
    for key, value in params.items():
        dim = sweep.space[key]
        if dim.kind == "choice":
            value = next(c for c in dim.choices if _encode(c) == value)
        out[key] = value
    return out


def make_sampler(sweep: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "grid":
        space = {k: [_encode(c) for c in d.choices] for k, d in sweep.space.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def trial_seed(sweep: SweepConfig, seed: int, number: int) -> int:
    """The sampler's seed for the ask of trial ``number`` (see the module docstring). The grid
    sampler keeps the run's: it shuffles the grid once from its seed and gives trial ``number``
    grid point ``number``, so its random state never moves."""
    return seed if sweep.sampler == "grid" else (seed * 1_000_003 + number) % (2**32)


class SweepStudy:
    """One sweep's Optuna study in ``folder/study.db``.

    Args:
        sweep: the validated sweep block.
        folder: ``DIR/SWEEP``.
        seed: the run's ``--seed`` (samplers are seeded from it).
        resume: load the study that is there; else start a new one (an old file is replaced).
    """

    def __init__(self, sweep: SweepConfig, folder: Path, seed: int, resume: bool) -> None:
        self.sweep, self.seed = sweep, seed
        self.path = folder / STUDY_FILE
        if not resume:
            self.path.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(
            study_name=sweep.name,
            storage=f"sqlite:///{self.path}",
            direction="minimize",
            sampler=make_sampler(sweep, trial_seed(sweep, seed, 0)),
            pruner=PRUNER_CLASSES[sweep.pruner](**sweep.pruner_options),
            load_if_exists=resume,
        )
        self.distributions = distributions(sweep)
        self.live: dict[int, optuna.trial.Trial] = {}

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return self.study.get_trials(deepcopy=False)[number]

    def trial(self, number: int) -> dict[str, Any]:
        """Trial ``number``'s adapter values: asked now, or read back when the study already
        has it (a resumed sweep)."""
        known = self.study.get_trials(deepcopy=False)
        if number < len(known):
            trial = optuna.trial.Trial(self.study, known[number]._trial_id)
        else:
            if number != len(known):
                raise RuntimeError(f"trial {number} asked after {len(known)} trials")
            self.study.sampler = make_sampler(self.sweep, trial_seed(self.sweep, self.seed, number))
            trial = self.study.ask(self.distributions)
        self.live[number] = trial
        return adapter_values(self.sweep, trial.params)

    def should_prune(self, number: int, step: int, loss: float) -> bool:
        """Report trial ``number``'s validation loss at its optimizer step ``step`` and ask the
        pruner; a prune is told at once (so the study holds the decision). A step the study
        already holds is answered from it."""
        frozen = self._frozen(number)
        if step in frozen.intermediate_values:  # decided before an interruption
            return frozen.state == TrialState.PRUNED and max(frozen.intermediate_values) == step
        if frozen.state.is_finished():
            return False
        trial = self.live[number]
        trial.report(loss, step)
        if not trial.should_prune():
            return False
        self._tell(trial, state=TrialState.PRUNED)
        return True

    def finish(self, number: int, value: float | None) -> None:
        """Tell a trial that ended: complete with ``value``, failed with None (nothing when the
        study already holds its end, as after a prune or an interruption)."""
        if self._frozen(number).state.is_finished():
            return
        trial = self.live[number]
        if value is None:
            self._tell(trial, state=TrialState.FAIL)
        else:
            self._tell(trial, values=value)

    def _tell(self, trial: optuna.trial.Trial, **outcome: Any) -> None:
        """``Study.tell``. The grid sampler's ``after_trial`` only calls ``Study.stop`` once the
        grid is done, which is for ``optimize`` and raises under ask-and-tell: another sampler
        (which does nothing after a trial) stands in while a grid trial is told."""
        sampler = self.study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler):
            self.study.sampler = optuna.samplers.RandomSampler()
        try:
            self.study.tell(trial, **outcome)
        finally:
            self.study.sampler = sampler

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def best_number(self) -> int | None:
        """Optuna's best trial (over completed trials), None when none completed."""
        completed = [t for t in self.trials() if t.state == TrialState.COMPLETE]
        return self.study.best_trial.number if completed else None
