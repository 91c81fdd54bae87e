"""The Optuna side of a sweep: every sampler and pruner through Optuna's own objects, quietly,
and a resumed study that answers what it already holds instead of telling it twice.

The reference is Optuna's study itself (``study.db``): the trials it holds, their parameters
inside the space, and each trial's state and reported steps equal to what the sweep wrote. A
sweep raises no Optuna warning (``ExperimentalWarning`` or any other: nothing is silenced to get
there) and leaves Optuna's logging verbosity as it found it.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from mlora.config.schema import parse_config
from mlora.sweep.runner import run_sweep
from mlora.sweep.study import SweepStudy
from tests.test_sweep import SEED, sweep_config

STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}


def optuna_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, ExperimentalWarning)
        or "optuna" in w.filename
        or "optuna" in str(w.message).lower()
    ]


@pytest.mark.parametrize(
    ("sampler", "pruner"), [("tpe", "hyperband"), ("random", "successive_halving")]
)
def test_sampler_and_pruner_run_through_optuna_quietly(
    sampler: str, pruner: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    space = {"lr": {"low": 1e-3, "high": 0.3, "log": True}, "r": [2, 4]}
    raw = sweep_config(tmp_path, name=sampler, sampler=sampler, trials=5, pruner=pruner,
                       search_space=space)  # fmt: skip
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)  # a program's own setting
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_sweep(parse_config(raw, "s.json"), str(tiny_model_dir), tmp_path, SEED)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG  # put back
    finally:
        optuna.logging.set_verbosity(before)
    assert optuna_warnings(caught) == []
    storage = f"sqlite:///{result.folder / 'study.db'}"
    trials = optuna.load_study(study_name=sampler, storage=storage).trials
    with open(result.folder / "trials.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(trials) == len(rows) == 5
    for trial, row in zip(trials, rows, strict=True):
        assert 1e-3 <= trial.params["lr"] <= 0.3 and trial.params["r"] in (2, 4)
        assert (float(row["lr"]), int(row["r"])) == (trial.params["lr"], trial.params["r"])
        assert trial.state == STATES[row["state"]]
        reported = sorted(trial.intermediate_values)  # each validation but the last, once
        assert reported == list(range(1, int(row["steps"]) + (row["state"] == "pruned")))


def study_record(study: SweepStudy) -> list[tuple]:
    return [
        (t.number, t.state, t.params, t.intermediate_values, t.value, t.system_attrs)
        for t in study.trials()
    ]


def test_a_resumed_study_answers_what_it_holds_and_tells_nothing_twice(tmp_path: Path) -> None:
    """A sweep resumed from a cut replays steps whose validations the study already holds:
    every report, prune and end is answered from the study, which stays exactly as it was."""
    raw = sweep_config(tmp_path, pruner="median", pruner_options={"n_startup_trials": 1})
    sweep = parse_config(raw, "s.json").sweep
    assert sweep is not None

    def run(study: SweepStudy) -> list[bool]:
        """Trial 0 reports steps 1-3 and completes; trial 1, worse at step 1, is pruned."""
        study.trial(0)
        answers = [study.should_prune(0, step, 4.0 - step) for step in (1, 2, 3)]
        study.finish(0, 1.0)
        study.trial(1)
        answers.append(study.should_prune(1, 1, 9.0))
        study.finish(1, None)  # its end after the prune: the study holds it already
        return answers

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        first = SweepStudy(sweep, tmp_path, SEED, resume=False)
        assert run(first) == [False, False, False, True]
        held = study_record(first)
        again = SweepStudy(sweep, tmp_path, SEED, resume=True)
        assert run(again) == [False, False, False, True]
    assert study_record(again) == held
    assert [t.state for t in again.trials()] == [TrialState.COMPLETE, TrialState.PRUNED]
