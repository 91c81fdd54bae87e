"""The log interval's per-adapter summary and the log line made of it.

Every ``log_step`` steps (and when an adapter finishes) the trainer reads every adapter's mean
loss from the device in one host read and hands one ``AdapterMetrics`` per adapter to each of
its ``MetricsSink``s: ``LogLineSink`` is the log line the command prints (a caller may pass
others, ``Trainer(sinks=...)``). Per-step rows (the metrics file, trackers, the progress bar)
go through ``sinks.py``'s ``RowSink`` instead. Sinks never touch the device nor see the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger("mlora")


@dataclass(frozen=True)
class AdapterMetrics:
    """One adapter's results over one log interval.

    Attributes:
        global_step: steps of the run done (the step the interval ends at).
        adapter: the adapter's name.
        epoch: its current epoch, 1-based.
        num_epochs: its epochs in all.
        adapter_step: its optimizer steps done.
        total_steps: its optimizer steps in all.
        loss: mean loss over its optimizer steps in the interval (may be NaN or inf).
        lr: the learning rate of its first parameter group now.
        tokens: tokens it trained on in the interval (padding excluded).
        seconds: wall time of the interval.
        expert_load: MoE: share of routed tokens per expert (or per embedded adapter, see
            ``expert_names``) over the interval, all layers; None for other kinds.
        expert_names: MeteoRA: the names of what ``expert_load`` counts; None: experts by index.
    """

    global_step: int
    adapter: str
    epoch: int
    num_epochs: int
    adapter_step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    expert_load: tuple[float, ...] | None = None
    expert_names: tuple[str, ...] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class MetricsSink(Protocol):
    """Receives each log interval's results, one entry per adapter that stepped in it."""

    def report(self, metrics: Sequence[AdapterMetrics]) -> None: ...


class LogLineSink:
    """The log lines of ``mlora.py``: loss, lr and tokens/s per adapter, and MoE loads."""

    def report(self, metrics: Sequence[AdapterMetrics]) -> None:
        for m in metrics:
            logger.info(
                "step %d | %s | epoch %d | adapter step %d/%d | loss %.4f | lr %.3e | %.0f tok/s",
                m.global_step, m.adapter, m.epoch, m.adapter_step, m.total_steps, m.loss, m.lr,
                m.tokens_per_second,
            )  # fmt: skip
            if m.expert_load is not None:
                names = m.expert_names
                logger.info(
                    "step %d | %s | %s load %s",
                    m.global_step, m.adapter, "adapter" if names else "expert",
                    " ".join(f"{n} {v:.2f}" if names else f"{v:.2f}"
                             for n, v in zip(names or m.expert_load, m.expert_load, strict=True)),
                )  # fmt: skip
            if not math.isfinite(m.loss):
                logger.warning("adapter %s: loss is %s", m.adapter, m.loss)
