"""``launch.py plot --dir D``: PNG curves of a run from ``D/metrics.jsonl`` (finished or
still training); see ``mlora.training.metrics.plots``."""

from __future__ import annotations

import argparse


def cmd_plot(args: argparse.Namespace) -> int:
    """Write ``D/plots/*.png`` and print their paths."""
    from mlora.training.metrics.plots import plot_run

    for path in plot_run(args.dir):
        print(path)
    return 0


def add_plot_verb(sub: argparse._SubParsersAction) -> None:
    """The ``plot`` verb of ``launch.py``."""
    p = sub.add_parser(
        "plot",
        help="plot a run's metrics (DIR/metrics.jsonl) as PNG files in DIR/plots",
        description="Plot each adapter's training loss (raw and smoothed), validation loss and "
        "learning rate from DIR/metrics.jsonl into DIR/plots/NAME.png, and all adapters' "
        "smoothed losses into DIR/plots/loss.png. Works while the run is still training.",
    )
    p.add_argument("--dir", default=".", help="the run's output folder (default .)")
    p.set_defaults(func=cmd_plot)
