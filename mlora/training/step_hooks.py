"""What runs at a step boundary besides training: the hooks, and what they may do to the run.

After every global step the trainer calls each of its step hooks with a ``StepBoundary`` (the
adapters whose optimizer step just happened) and itself as ``RunControl``: a hook may validate
those adapters, stop one (``leave``: finished early, pruned) or bring a new one in (``enter``:
it starts at the next step, with its own seeded init, optimizer and schedule). Hooks run on
every process of a data-parallel run, in the same order, so they must decide the same way on
each (from values every rank has, or agreed through the process group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mlora.config.schema import AdapterConfig
from mlora.data.rows import TokenizedRow
from mlora.training.adapter_run import AdapterRun

Outcome = Literal["finished", "failed"]


class RunControl(Protocol):
    """What a step hook may ask of the trainer (``Trainer`` implements it)."""

    @property
    def global_step(self) -> int: ...

    @property
    def runs(self) -> list[AdapterRun]: ...

    def check_faults(self) -> None:
        """Read every running adapter's fault flag and stop those whose loss was not finite
        (one host read); call it before reading an adapter's results."""
        ...

    def leave(self, run: AdapterRun, outcome: Outcome, message: str | None = None) -> None:
        """``run`` leaves the run now: "finished" saves its adapter as it is (its last step,
        or an early stop), "failed" saves nothing and records ``message`` as the reason."""
        ...

    def enter(self, config: AdapterConfig, rows: Sequence[TokenizedRow]) -> AdapterRun:
        """Add an adapter (a validated config and its tokenized rows); it trains from the next
        step on, as it would alone."""
        ...


@dataclass(frozen=True)
class StepBoundary:
    """The end of a global step.

    Attributes:
        global_step: steps done.
        stepped: the adapters whose optimizer step happened in this step and that are still
            in the run (not failed), in step order; those that finished with it are included
            (``run.finished``), and leave after the hooks ran.
    """

    global_step: int
    stepped: tuple[AdapterRun, ...]


class StepHook(Protocol):
    """Called at each step boundary (see the module docstring)."""

    def __call__(self, boundary: StepBoundary, control: RunControl) -> None: ...
