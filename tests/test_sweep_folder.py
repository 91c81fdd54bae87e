"""``--overwrite`` of a sweep: the old sweep's outputs go, nothing else does.

The reference is the folder as the old sweep and the user left it: every file the old sweep
wrote is gone (its trials beyond the new sweep's too), every other file stays, and a trial
folder holding a file no sweep writes stops the run before anything is removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from mlora.cli.train import main
from mlora.config.schema import parse_config
from mlora.sweep.runner import run_sweep
from tests.reliability_support import one_error_line
from tests.test_sweep import SEED, read_trials, sweep_config, write_config


def argv(model: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["--base_model", str(model), "--config", str(config), "--dir", str(out),
            "--seed", str(SEED), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def old(tiny_model_dir, tmp_path_factory) -> Path:
    """An old sweep ``grid``: three trials, two at a time."""
    folder = tmp_path_factory.mktemp("old")
    raw = sweep_config(folder, name="grid", search_space={"lr": [0.3, 0.05, 1e-3], "r": [2]})
    config = parse_config(raw, "old.json")
    return run_sweep(config, str(tiny_model_dir), folder / "out", SEED, show=False).folder


def one_trial_config(folder: Path) -> Path:
    """A one-trial sweep named ``grid`` (the grid fixture's name), one epoch."""
    raw = sweep_config(folder, name="grid", search_space={"lr": [0.05], "r": [2]})
    raw["sweep"]["base"]["num_epochs"] = 1
    return write_config(folder, raw)


def test_overwrite_clears_the_old_sweeps_outputs_only(old, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "out"
    folder = out / "grid"
    shutil.copytree(old, folder)  # three trials, study, results, run records
    (folder / "notes.txt").write_text("mine")  # the user's: stays
    (folder / "trial-000" / "checkpoint-3").mkdir()  # a checkpoint of the old trial: goes
    old_records = sorted(p.name for p in (folder / ".mlora-run").iterdir())
    config = one_trial_config(tmp_path)
    assert main(argv(tiny_model_dir, config, out)) == 2  # never without --overwrite
    assert (folder / "trial-002").is_dir()
    assert main(argv(tiny_model_dir, config, out, "--overwrite")) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([".mlora-lock", ".mlora-run", "best_adapter", "notes.txt", "study.db",
                            "sweep_result.json", "trial-000", "trials.csv",
                            "validation_curves.png"])  # fmt: skip
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (folder / "trial-000" / "checkpoint-3").exists()
    assert not set(old_records) & {p.name for p in (folder / ".mlora-run").iterdir()}
    assert [row["name"] for row in read_trials(folder)] == ["trial-000"]
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 1
    result = json.loads((folder / "sweep_result.json").read_text())
    assert [trial["params"] for trial in result["trials"]] == [{"lr": 0.05, "r": 2}]


def test_overwrite_refuses_a_trial_folder_holding_a_users_file(
    old, tiny_model_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    folder = out / "grid"
    shutil.copytree(old, folder)
    (folder / "trial-002" / "my-notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    missing = tmp_path / "no-such-model"  # the folder check comes first
    assert main(argv(missing, one_trial_config(tmp_path), out, "--overwrite")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "trial-002/my-notes.txt: --overwrite would remove it, but no sweep writes it" in line
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
