"""When the run writes a checkpoint cut, and which adapters get a folder in it.

Each adapter checkpoints on its own schedule (its ``save_step``, or the run's): after its
optimizer step ``k * save_step`` it is *due*, and the loop writes a cut at that step boundary
in which only the due adapters get a checkpoint folder (see ``checkpoints.py``). A cut is also
due whenever an adapter leaves the run (finished or stopped), so the manifest records it. The
writing itself is ``Trainer.save_cut``; this class only keeps the schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlora.training.adapter_run import AdapterRun


class CheckpointPolicy:
    """The checkpoint schedule of a run.

    Args:
        save_step: the run's ``save_step`` (an adapter's own one wins, see
            ``AdapterConfig.checkpoint_every``).
        runs: the run's adapters.
    """

    def __init__(self, save_step: int, runs: Iterable[AdapterRun]) -> None:
        self.save_step = save_step
        self.enabled = False
        self.cut_due = False
        self._due: set[str] = set()
        for run in runs:
            self.entered(run)

    def entered(self, run: AdapterRun) -> None:
        """``run`` joined the run: checkpointing is on as soon as one adapter checkpoints."""
        self.enabled = self.enabled or bool(run.config.checkpoint_every(self.save_step))

    def stepped(self, run: AdapterRun) -> None:
        """``run`` just took an optimizer step."""
        every = run.config.checkpoint_every(self.save_step)
        if every and run.steps_done % every == 0 and not run.finished:
            self._due.add(run.name)  # its own schedule: only this adapter is written
            self.cut_due = True

    def left(self, run: AdapterRun) -> None:
        """``run`` left the run (finished or stopped): the manifest must record it, and it is
        no longer due."""
        self._due.discard(run.name)
        if self.enabled:
            self.cut_due = True

    def take(self) -> set[str]:
        """The adapters due for a folder in the cut being written now; the schedule restarts."""
        due, self._due, self.cut_due = set(self._due), set(), False
        return due
