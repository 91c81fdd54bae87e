"""What a finished sweep leaves in ``DIR/SWEEP/``: ``trials.csv``, ``sweep_result.json``, the
best trial's adapter (``best_adapter/``, a PEFT folder), ``validation_curves.png`` and the summary
table printed at the end. Every file is written whole (temp file + rename)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlora.core.atomic import atomic_directory, atomic_write_bytes, atomic_write_text

TRIALS_CSV = "trials.csv"
RESULT_JSON = "sweep_result.json"
CURVES_PNG = "validation_curves.png"
BEST_ADAPTER = "best_adapter"


@dataclass
class TrialRecord:
    """One trial as the outputs report it.

    Attributes:
        state: "complete", "pruned", "failed" or "running" (an interrupted sweep).
        value: the objective Optuna was told (validation loss of the saved weights).
        curve: ``[adapter step, validation loss]`` of each validation.
        steps, tokens: optimizer steps and training tokens it ran.
        wall_time_s: seconds from its entry to its end (training shared with the other trials
            of the same steps).
        entered_at, left_at: the global steps (step boundaries) it entered and left at.
    """

    number: int
    name: str
    params: dict[str, Any]
    state: str = "running"
    value: float | None = None
    best_step: int | None = None
    curve: list[list[float]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    entered_at: int = 0
    left_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_trials_csv(path: Path, records: Sequence[TrialRecord]) -> None:
    """One row per trial: number, name, state, value, steps, tokens, wall time, entry and exit
    steps, one column per searched key, and the validation curve as JSON."""
    keys = sorted({key for record in records for key in record.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["number", "name", "state", "value", "best_step", "steps", "tokens", "wall_time_s",
         "entered_at_step", "left_at_step", *keys, "val_curve"]
    )  # fmt: skip
    for r in records:
        params = [
            json.dumps(r.params[k]) if isinstance(r.params.get(k), list | dict) else r.params.get(k)
            for k in keys
        ]
        writer.writerow(
            [r.number, r.name, r.state, "" if r.value is None else r.value,
             "" if r.best_step is None else r.best_step, r.steps, r.tokens,
             f"{r.wall_time_s:.3f}", r.entered_at, "" if r.left_at is None else r.left_at,
             *params, json.dumps(r.curve)]
        )  # fmt: skip
    atomic_write_text(path, buffer.getvalue())


def write_result_json(
    path: Path, sweep: dict[str, Any], records: Sequence[TrialRecord], best: int | None
) -> None:
    best_record = next((r for r in records if r.number == best), None)
    payload = {
        "sweep": sweep,
        "best": None
        if best_record is None
        else {
            "number": best_record.number,
            "name": best_record.name,
            "value": best_record.value,
            "params": best_record.params,
            "adapter": BEST_ADAPTER,
        },
        "trials": [r.to_json() for r in records],
    }
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def copy_best_adapter(folder: Path, trial_folder: Path) -> Path:
    """``folder/best_adapter/``: the PEFT files of the best trial's folder (not its
    checkpoints), replacing an older copy whole."""
    target = folder / BEST_ADAPTER
    with atomic_directory(target) as tmp:
        for item in sorted(trial_folder.iterdir()):
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    return target


def plot_curves(path: Path, records: Sequence[TrialRecord], best: int | None, title: str) -> None:
    """Every trial's validation curve (matplotlib, no display needed); pruned trials dashed and
    ending in an x, the best trial thick."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.subplots()
    for r in records:
        if not r.curve:
            continue
        steps, losses = zip(*r.curve, strict=True)
        pruned = r.state == "pruned"
        (line,) = axes.plot(
            steps, losses, linestyle="--" if pruned else "-", linewidth=2.5 if r.number == best
            else 1.2, alpha=0.6 if pruned else 1.0,
            label=f"{r.name}{' (pruned)' if pruned else ''}{' (best)' if r.number == best else ''}",
        )  # fmt: skip
        if pruned:
            axes.plot(steps[-1], losses[-1], marker="x", markersize=9, color=line.get_color())
    axes.set_xlabel("adapter optimizer step")
    axes.set_ylabel("validation loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if records:
        axes.legend(fontsize="small", ncol=2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def summary_table(records: Sequence[TrialRecord], best: int | None) -> str:
    """A plain-text table, one line per trial, the best marked with ``*``."""
    keys = sorted({key for record in records for key in record.params})
    header = ["", "trial", "state", "val_loss", "steps", "wall_s", *keys]
    lines = [header]
    for r in records:
        lines.append(
            ["*" if r.number == best else "", r.name, r.state,
             "-" if r.value is None else f"{r.value:.4f}", str(r.steps), f"{r.wall_time_s:.1f}",
             *(_short(r.params.get(k)) for k in keys)]
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
