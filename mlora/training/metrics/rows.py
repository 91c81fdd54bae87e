"""The rows of ``D/metrics.jsonl``: one per adapter per optimizer step, one per log interval
for the whole run, and validation results.

Every row is a flat JSON object with a ``kind`` and the ``run`` it belongs to (the id of the
run's records, ``run_records.RunIdentity.run_id``): several runs may train into one folder, and
a resume must find its own rows. Readers ignore keys they do not know, so rows may grow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

METRICS_FILE = "metrics.jsonl"
STEP, RUN, VALIDATION = "step", "run", "validation"


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a non-finite value is written as null."""
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class StepRow:
    """One optimizer step of one adapter.

    Attributes:
        step: the adapter's optimizer steps done, this one included (1-based).
        global_step: the run's passes done when the step ended.
        epoch: fractional epochs done (``step / steps_per_epoch``, as HF's Trainer logs it).
        rows: training rows in the step; ``tokens``: their tokens (prompt included);
            ``supervised_tokens``: the tokens the loss is over.
        loss: the step's loss (mean over its supervised tokens, + router losses).
        lr: the learning rate the step used.
        grad_norm: the L2 norm of the adapter's gradients in the step.
        val_loss: validation loss computed at this step, when there was one.
    """

    run: str
    adapter: str
    step: int
    global_step: int
    epoch: float
    rows: int
    tokens: int
    supervised_tokens: int
    loss: float | None
    lr: float
    grad_norm: float | None
    time: float
    val_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        row = {"kind": STEP, **asdict(self)}
        for key in ("loss", "grad_norm", "val_loss"):
            row[key] = _finite_or_none(row[key])
        if self.val_loss is None:
            del row["val_loss"]
        return row


@dataclass(frozen=True)
class RunRow:
    """The whole run over one log interval.

    Attributes:
        tokens_per_s: tokens (prompt included, padding not) of every adapter per second.
        peak_memory_mib: the backend's peak memory so far (GPU: allocator peak; CPU: peak RSS).
        mfu: model FLOPs utilization, the estimated FLOPs done over the device's peak in the
            interval; None where the device's peak is not known (see ``throughput.py``).
    """

    run: str
    global_step: int
    time: float
    seconds: float
    tokens: int
    tokens_per_s: float
    peak_memory_mib: float
    mfu: float | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": RUN, **asdict(self)}


@dataclass(frozen=True)
class ValidationRow:
    """A validation loss of one adapter, computed after its optimizer step ``step``."""

    run: str
    adapter: str
    step: int
    global_step: int
    val_loss: float | None
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": VALIDATION, **asdict(self), "val_loss": _finite_or_none(self.val_loss)}
