"""When adapters are evaluated during training: a step hook that finds the due adapters.

An adapter is due after every ``every(run)``-th optimizer step of its own (or at the steps of a
list: a pruner's rungs, so nothing is evaluated that no decision reads) and after its last one;
the schedule reads the fault flags first (a failed adapter is never evaluated) and hands the due
adapters to ``evaluate``, which may end them through ``control.leave`` (early stopping,
pruning). What evaluation computes is the caller's: this module only keeps the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlora.training.adapter_run import AdapterRun
from mlora.training.step_hooks import RunControl, StepBoundary

Evaluate = Callable[[Sequence[AdapterRun], RunControl], None]
# An evaluation schedule: every N-th step (an int), the listed steps, or none (None, 0).
EvalSteps = int | Sequence[int] | None


def evaluates_at(eval_steps: EvalSteps, step: int) -> bool:
    """Whether the schedule ``eval_steps`` names the optimizer step ``step``."""
    if isinstance(eval_steps, int):
        return eval_steps > 0 and step % eval_steps == 0
    return eval_steps is not None and step in eval_steps


class EvaluationSchedule:
    """A ``StepHook`` that evaluates adapters on their own step schedule.

    Args:
        every: an adapter's schedule in its optimizer steps: an interval, a list of steps, or
            0 / None (only after its last step).
        evaluate: called with the due adapters (at least one) and the run.
        at_end: also evaluate an adapter after its last step.
    """

    def __init__(
        self,
        every: Callable[[AdapterRun], EvalSteps],
        evaluate: Evaluate,
        at_end: bool = True,
    ) -> None:
        self.every = every
        self.evaluate = evaluate
        self.at_end = at_end

    def due(self, run: AdapterRun) -> bool:
        return (run.finished and self.at_end) or evaluates_at(self.every(run), run.steps_done)

    def __call__(self, boundary: StepBoundary, control: RunControl) -> None:
        if not any(self.due(run) for run in boundary.stepped):
            return
        control.check_faults()  # may stop some of them: their results are not to be read
        due = [run for run in boundary.stepped if run.failed is None and self.due(run)]
        if due:
            self.evaluate(due, control)
