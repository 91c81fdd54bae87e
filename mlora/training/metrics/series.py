"""Reading ``D/metrics.jsonl`` back as curves: each adapter's newest run, step by step.

Several runs may have trained into one folder (and an adapter name may come back in a later
run): each adapter is shown from the last run that logged it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlora.training.metrics.rows import RUN, STEP, VALIDATION


@dataclass
class AdapterCurves:
    """One adapter's curves over its optimizer steps (None where a value was not finite)."""

    run: str
    steps: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)

    @property
    def latest_loss(self) -> float | None:
        return self.loss[-1] if self.loss else None


@dataclass
class RunCurves:
    """The run's throughput rows over global steps."""

    run: str
    global_steps: list[int] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    peak_memory_mib: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)


def adapter_curves(rows: list[dict[str, Any]]) -> dict[str, AdapterCurves]:
    """Each adapter's curves from its newest run, adapters in the order they first appear."""
    newest: dict[str, str] = {}
    for row in rows:
        if row.get("kind") in (STEP, VALIDATION) and isinstance(row.get("adapter"), str):
            newest[row["adapter"]] = str(row.get("run"))
    curves = {name: AdapterCurves(run) for name, run in newest.items()}
    for row in rows:
        name = row.get("adapter")
        if name not in curves or str(row.get("run")) != curves[name].run:
            continue
        curve = curves[name]
        if row.get("kind") == STEP:
            curve.steps.append(int(row["step"]))
            curve.loss.append(row.get("loss"))
            curve.lr.append(float(row.get("lr", 0.0)))
            curve.epochs.append(float(row.get("epoch", 0.0)))
        if row.get("val_loss") is not None or row.get("kind") == VALIDATION:
            curve.val_steps.append(int(row["step"]))
            curve.val_loss.append(row.get("val_loss"))
    return curves


def run_curves(rows: list[dict[str, Any]]) -> RunCurves | None:
    """The throughput of the newest run in the file (None without run rows)."""
    runs = [row for row in rows if row.get("kind") == RUN]
    if not runs:
        return None
    newest = str(runs[-1].get("run"))
    curves = RunCurves(newest)
    for row in runs:
        if str(row.get("run")) == newest:
            curves.global_steps.append(int(row["global_step"]))
            curves.tokens_per_s.append(float(row["tokens_per_s"]))
            curves.peak_memory_mib.append(float(row["peak_memory_mib"]))
            curves.mfu.append(row.get("mfu"))
    return curves


def smoothed(values: list[float | None], weight: float = 0.9) -> list[float | None]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start (so the
    first values are not pulled toward 0); a missing value stays missing and is skipped."""
    out: list[float | None] = []
    average, count = 0.0, 0
    for value in values:
        if value is None:
            out.append(None)
            continue
        count += 1
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out
