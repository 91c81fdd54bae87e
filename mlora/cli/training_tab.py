"""The web page's Training tab: ``D/metrics.jsonl`` as curves and a table, refreshed while the
run writes it (``inference.py --dir D``).

The view is built from the file alone (the training may run in another process, on another
machine sharing the folder): each adapter's newest run, its loss raw and smoothed, validation
loss when there is one, learning rate, and the run's tokens/s and peak memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.training.metrics.metrics_file import MetricsFileError, MetricsTail, metrics_path
from mlora.training.metrics.series import adapter_curves, run_curves, smoothed

REFRESH_SECONDS = 2.0
MAX_POINTS = 400  # per curve: a long run's curves are thinned, evenly, to this many points
TABLE_COLUMNS = ["adapter", "step", "epoch", "loss", "loss (smoothed)", "val loss", "lr"]


@dataclass(frozen=True)
class TrainingView:
    """What the tab shows: a status line, the loss and learning-rate curves (long tables:
    one row per adapter per step) and each adapter's latest values."""

    status: str
    loss: Any  # pandas.DataFrame: step, value, adapter (series "NAME" and "NAME (smoothed)")
    lr: Any  # pandas.DataFrame: step, lr, adapter
    table: Any  # pandas.DataFrame: TABLE_COLUMNS


def thinned(count: int, limit: int = MAX_POINTS) -> range:
    """Indices of at most about ``limit`` evenly spaced points of ``count``, the last included."""
    stride = max(1, -(-count // limit))
    return range((count - 1) % stride, count, stride)


def training_view(output_dir: str | Path, tail: MetricsTail | None = None) -> TrainingView:
    """Read ``output_dir/metrics.jsonl`` now (a missing or empty file gives an empty view whose
    status says why, in one line).

    Args:
        tail: the page's reader of the file, which parses only what was appended since its
            last read (None: read the whole file).
    """
    import pandas as pd

    path = metrics_path(output_dir)
    tail = tail or MetricsTail(path)
    empty_loss = pd.DataFrame({"step": [], "loss": [], "adapter": []})
    empty_lr = pd.DataFrame({"step": [], "lr": [], "adapter": []})
    try:
        rows = tail.read()
    except MetricsFileError as exc:
        table = pd.DataFrame(columns=TABLE_COLUMNS)
        return TrainingView(f"waiting for metrics: {exc}", empty_loss, empty_lr, table)
    curves = adapter_curves(rows)
    loss_rows, lr_rows, table_rows = [], [], []
    for name, curve in curves.items():
        smooth = smoothed(curve.loss)
        for i in thinned(len(curve.steps)):
            step, raw = curve.steps[i], curve.loss[i]
            if raw is not None:
                loss_rows.append((step, raw, name))
                loss_rows.append((step, smooth[i], f"{name} (smoothed)"))
            lr_rows.append((step, curve.lr[i], name))
        for step, val in zip(curve.val_steps, curve.val_loss, strict=True):
            if val is not None:
                loss_rows.append((step, val, f"{name} (validation)"))
        epoch = curve.epochs[-1] if curve.epochs else None
        table_rows.append(
            [
                name,
                curve.steps[-1] if curve.steps else None,
                None if epoch is None else round(float(epoch), 3),
                _round(curve.latest_loss),
                _round(smooth[-1] if smooth else None),
                _round(curve.val_loss[-1] if curve.val_loss else None),
                f"{curve.lr[-1]:.3e}" if curve.lr else None,
            ]
        )
    status = f"{path}: {len(curves)} adapter(s)"
    throughput = run_curves(rows)
    if throughput is not None and throughput.global_steps:
        status += (
            f" · global step {throughput.global_steps[-1]}"
            f" · {throughput.tokens_per_s[-1]:,.0f} tokens/s"
            f" · peak memory {throughput.peak_memory_mib[-1]:,.0f} MiB"
        )
        if throughput.mfu[-1] is not None:
            status += f" · MFU {100 * throughput.mfu[-1]:.1f}%"
    status += f" · read {time.strftime('%H:%M:%S')}"
    return TrainingView(
        status,
        pd.DataFrame(loss_rows, columns=["step", "loss", "adapter"]),
        pd.DataFrame(lr_rows, columns=["step", "lr", "adapter"]),
        pd.DataFrame(table_rows, columns=TABLE_COLUMNS),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def add_training_tab(
    output_dir: str | Path | None, refresh_seconds: float = REFRESH_SECONDS
) -> None:
    """The Training tab inside the current ``gr.Blocks`` (elements: training-status,
    training-loss, training-lr, training-table), refreshed every ``refresh_seconds``."""
    import gradio as gr

    with gr.Tab("Training", elem_id="training-tab"):
        if output_dir is None:
            gr.Markdown("Start the page with `--dir D` to follow the run training into D.")
            return
        status = gr.Markdown(elem_id="training-status")
        with gr.Row():
            loss = gr.LinePlot(
                x="step", y="loss", color="adapter", title="loss per optimizer step",
                elem_id="training-loss", height=320,
            )  # fmt: skip
            lr = gr.LinePlot(
                x="step", y="lr", color="adapter", title="learning rate", elem_id="training-lr",
                height=320,
            )  # fmt: skip
        table = gr.Dataframe(headers=TABLE_COLUMNS, elem_id="training-table", interactive=False)

        tail = MetricsTail(metrics_path(output_dir))
        lock = threading.Lock()  # one reader of the file for every open page

        def refresh() -> tuple[str, Any, Any, Any]:
            with lock:
                view = training_view(output_dir, tail)
            return view.status, view.loss, view.lr, view.table

        gr.Timer(refresh_seconds).tick(refresh, None, [status, loss, lr, table])
