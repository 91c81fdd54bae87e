"""PNG plots of a run from ``D/metrics.jsonl`` (matplotlib, optional extra ``plot``).

``D/plots/loss.png`` compares every adapter's smoothed training loss (validation loss dashed);
``D/plots/NAME.png`` shows one adapter: training loss raw and smoothed, validation loss when
there is one, and the learning rate. Works on a finished run and on one still writing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from mlora.core.atomic import atomic_write_bytes
from mlora.core.errors import MloraError
from mlora.training.metrics.metrics_file import MetricsFileError, metrics_path, read_metrics
from mlora.training.metrics.rows import RunRow, StepRow, ValidationRow
from mlora.training.metrics.series import AdapterCurves, adapter_curves, smoothed
from mlora.training.metrics.sinks import RunStart

PLOTS_DIR = "plots"
logger = logging.getLogger("mlora")


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# Figure margins (fractions) that fit the titles, tick and axis labels of these plots: fixed
# margins render in about 60% of the time of matplotlib's constrained layout.
_MARGINS = {"left": 0.08, "right": 0.98, "bottom": 0.13, "top": 0.91}


def _points(steps: list[int], values: list[float | None]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def _save(figure, path: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())  # a reader never sees half a PNG


def adapter_figure(name: str, curves: AdapterCurves):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 3.6))
    figure.subplots_adjust(**_MARGINS, wspace=0.22)  # fixed: a layout engine doubles the time
    loss_axes, lr_axes = figure.subplots(1, 2, width_ratios=(2, 1))
    steps, raw = _points(curves.steps, curves.loss)
    loss_axes.plot(steps, raw, color="tab:blue", alpha=0.3, linewidth=1, label="train (raw)")
    smooth_steps, smooth = _points(curves.steps, smoothed(curves.loss))
    loss_axes.plot(smooth_steps, smooth, color="tab:blue", linewidth=2, label="train (smoothed)")
    val_steps, val = _points(curves.val_steps, curves.val_loss)
    if val:
        loss_axes.plot(val_steps, val, "o-", color="tab:orange", label="validation")
    loss_axes.set(title=f"{name}: loss", xlabel="optimizer step", ylabel="loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    lr_axes.plot(curves.steps, curves.lr, color="tab:green")
    lr_axes.set(title="learning rate", xlabel="optimizer step")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_axes.grid(alpha=0.3)
    for axes in (loss_axes, lr_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def overview_figure(curves: dict[str, AdapterCurves]):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5))
    figure.subplots_adjust(**_MARGINS)
    axes = figure.subplots()
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index % 10}"
        steps, smooth = _points(curve.steps, smoothed(curve.loss))
        axes.plot(steps, smooth, color=color, linewidth=2, label=name)
        val_steps, val = _points(curve.val_steps, curve.val_loss)
        if val:
            axes.plot(val_steps, val, "o--", color=color, label=f"{name} (validation)")
    title = "training loss (smoothed) per adapter"
    if any(v is not None for curve in curves.values() for v in curve.val_loss):
        title += ", validation loss dashed"
    axes.set(title=title, xlabel="optimizer step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return figure


def plot_run(output_dir: str | Path) -> list[Path]:
    """Write the PNGs of ``output_dir``'s metrics into ``output_dir/plots``; their paths.

    Raises:
        MloraError: matplotlib is missing, or the metrics file is missing, empty or broken
            (one line naming it).
    """
    if not plotting_available():
        raise MloraError("plots need matplotlib: pip install 'mlora[plot]'")
    source = metrics_path(output_dir)
    curves = adapter_curves(read_metrics(source))
    if not any(curve.steps for curve in curves.values()):
        raise MetricsFileError(f"{source}: no training step logged yet, nothing to plot")
    folder = Path(output_dir) / PLOTS_DIR
    written = [folder / "loss.png"]
    _save(overview_figure(curves), written[0])
    for name, curve in curves.items():
        if curve.steps:
            path = folder / f"{name}.png"
            _save(adapter_figure(name, curve), path)
            written.append(path)
    return written


class PlotSink:
    """Plots the run when it ends (finished or stopped), if matplotlib is installed."""

    def __init__(self) -> None:
        self.output_dir: Path | None = None

    def start(self, run: RunStart) -> None:
        self.output_dir = run.output_dir

    def log_steps(self, rows: Sequence[StepRow]) -> None:
        return None

    def log_validation(self, rows: Sequence[ValidationRow]) -> None:
        return None

    def log_run(self, row: RunRow) -> None:
        return None

    def sync(self) -> None:
        return None

    def close(self, finished: bool) -> None:
        if self.output_dir is None or not plotting_available():
            return
        try:
            written = plot_run(self.output_dir)
        except MetricsFileError as exc:  # nothing logged (e.g. a resume with nothing left)
            logger.info("plots: none (%s)", exc)
            return
        logger.info("plots: %s", ", ".join(str(path) for path in written))
