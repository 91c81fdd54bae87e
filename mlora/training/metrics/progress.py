"""The progress bar's tail: the run's tokens/s and each adapter's latest loss.

The bar is tqdm's (``tqdm.auto``: a widget in Jupyter, text on a terminal); this sink only sets
its postfix, once per log interval, so the bar never reads the device.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from mlora.training.metrics.rows import RunRow, StepRow, ValidationRow
from mlora.training.metrics.sinks import RunStart


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its output is no terminal, yet it shows a
    bar: tqdm's widget, or text when ipywidgets is missing)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    kernel = get_ipython() if get_ipython is not None else None
    return kernel is not None and "IPKernelApp" in getattr(kernel, "config", {})


def postfix(tokens_per_s: float | None, losses: dict[str, float | None]) -> str:
    """``"812 tok/s | math 1.234 | code 2.101"`` (a loss that was not finite shows as nan)."""
    parts = [] if tokens_per_s is None else [f"{tokens_per_s:,.0f} tok/s"]
    parts += [f"{name} {'nan' if v is None else f'{v:.4g}'}" for name, v in losses.items()]
    return " | ".join(parts)


class ProgressSink:
    """Writes the postfix of ``bar`` (a tqdm bar)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.losses: dict[str, float | None] = {}
        self.tokens_per_s: float | None = None

    def start(self, run: RunStart) -> None:
        self.losses = {}

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            self.losses[row.adapter] = row.loss

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        return None

    def log_run(self, row: RunRow) -> None:
        self.tokens_per_s = row.tokens_per_s
        self.bar.set_postfix_str(postfix(self.tokens_per_s, self.losses), refresh=True)

    def sync(self) -> None:
        return None

    def close(self, finished: bool) -> None:
        return None
