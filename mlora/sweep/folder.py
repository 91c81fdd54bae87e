"""A sweep's folder ``DIR/SWEEP/``: what in it is the sweep's own, refusing to replace it without
``--overwrite``, and clearing an old sweep's outputs when it is replaced.

A sweep owns exactly what it writes: ``trials.csv``, ``sweep_result.json``,
``validation_curves.png``, ``study.db`` (and SQLite's side files), ``best_adapter/``, one
``trial-NNN/`` folder per trial and its run records ``.mlora-run/``. ``--overwrite`` removes
those and nothing else: a trial or best-adapter folder holding a file no sweep writes is not
removed but refused (one line naming the file), and any other file in the folder stays.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mlora.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME
from mlora.core.atomic import LOCK_NAME
from mlora.core.errors import MloraError
from mlora.sweep.outputs import BEST_ADAPTER, CURVES_PNG, RESULT_JSON, TRIALS_CSV
from mlora.sweep.study import STUDY_FILE
from mlora.training.checkpoints import CHECKPOINT_PATTERN, TEMP_PATTERN
from mlora.training.run_records import RUN_DIR, RUN_ID_PATTERN
from mlora.training.validation import BEST_FOLDER, RECORD_NAME

TRIAL_FOLDER = re.compile(r"^trial-\d{3,}$")  # SweepConfig.trial_name
RESULT_FILES = (TRIALS_CSV, RESULT_JSON, CURVES_PNG)
# SQLite's own files beside the study (a journal or write-ahead log left by a crash).
STUDY_FILES = (STUDY_FILE, f"{STUDY_FILE}-journal", f"{STUDY_FILE}-wal", f"{STUDY_FILE}-shm")
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME)


def check_sweep_folder(folder: Path, overwrite: bool) -> None:
    """Refuse to replace a sweep's folder that holds anything unless ``--overwrite``; with it,
    refuse when clearing would have to remove something the sweep did not write.

    Raises:
        MloraError: naming the folder, or the file no sweep writes.
    """
    held = [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []
    if held and not overwrite:
        raise MloraError(
            f"{folder} already exists; pass --overwrite to replace it (or --resume to continue it)"
        )
    for path in held:
        _check_adapter_folder(path)


def _is_adapter_folder(path: Path) -> bool:
    return (
        path.is_dir()
        and not path.is_symlink()
        and (TRIAL_FOLDER.match(path.name) is not None or path.name == BEST_ADAPTER)
    )


def _check_adapter_folder(path: Path) -> None:
    """A ``trial-NNN/`` or ``best_adapter/`` folder to be removed holds only what a trial
    writes (adapter files, ``validation.json``, ``best/``, checkpoints, temporaries)."""
    if not _is_adapter_folder(path):
        return
    for child in path.iterdir():
        own = child.name in ADAPTER_FILES and child.is_file()
        own = own or (child.is_dir() and child.name == BEST_FOLDER)
        own = own or (child.is_dir() and CHECKPOINT_PATTERN.match(child.name) is not None)
        if not (own or TEMP_PATTERN.match(child.name)):
            raise MloraError(
                f"{child}: --overwrite would remove it, but no sweep writes it; move it away "
                "(or pass another --dir)"
            )


def clear_sweep_outputs(folder: Path) -> None:
    """Remove an old sweep's outputs from ``folder`` (after ``check_sweep_folder``): its result
    files, study, trial and best-adapter folders and run records; nothing else."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name in RESULT_FILES + STUDY_FILES and path.is_file():
            path.unlink()
        elif _is_adapter_folder(path):
            _check_adapter_folder(path)
            shutil.rmtree(path)
        elif path.name == RUN_DIR and path.is_dir():
            for records in path.iterdir():
                if RUN_ID_PATTERN.match(records.name) and records.is_dir():
                    shutil.rmtree(records)
