"""``launch.py plot --dir D`` and the plots written at the end of a run: PNGs of a finished run
and of one still training; a missing or empty metrics file is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlora.cli.launch import main as launch_main
from mlora.training.metrics.metrics_file import metrics_path, read_metrics
from mlora.training.metrics.plots import adapter_figure, overview_figure
from mlora.training.metrics.series import adapter_curves, smoothed
from tests.reliability_support import ROOT, env_with, mlora_args
from tests.test_metrics import (
    steps_of,
    train_config,
    two_adapter_config,
    validation_curve,
    with_validation,
)

pytest.importorskip("matplotlib")


def is_png(path: Path) -> bool:
    from matplotlib.image import imread

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[0] > 100


def test_a_finished_run_is_plotted_at_its_end_and_by_the_command(tiny_model_dir, tmp_path, capsys):
    train_config(tmp_path, tiny_model_dir, two_adapter_config(tmp_path))
    out = tmp_path / "out"
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["add.png", "loss.png", "rev.png"]  # written when the run ended
    for name in plots:
        (out / "plots" / name).unlink()
    assert launch_main(["plot", "--dir", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "plots" / n) for n in ("loss.png", "add.png", "rev.png")]
    assert all(is_png(Path(p)) for p in printed)


def test_the_figure_shows_the_rows_raw_and_smoothed(tiny_model_dir, tmp_path):
    """A run with validation: the adapter's figure draws the file's training losses, its
    validation losses (the trainer's own record) and learning rates; the overview draws the
    validation curve too."""
    train_config(tmp_path, tiny_model_dir, with_validation(two_adapter_config(tmp_path)))
    out = tmp_path / "out"
    rows = read_metrics(metrics_path(out))
    curves = adapter_curves(rows)
    figure = adapter_figure("add", curves["add"])
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    mine = steps_of(rows, "add")
    assert list(lines["train (raw)"].get_ydata()) == [row["loss"] for row in mine]
    smooth = smoothed([row["loss"] for row in mine])
    assert list(lines["train (smoothed)"].get_ydata()) == smooth
    curve = validation_curve(out, "add")
    assert len(curve) >= 3
    assert lines["validation"].get_xydata().tolist() == curve
    lr = figure.axes[1].get_lines()[0]
    assert list(lr.get_ydata()) == [row["lr"] for row in mine]
    overview = {line.get_label(): line for line in overview_figure(curves).axes[0].get_lines()}
    assert overview["add (validation)"].get_xydata().tolist() == curve
    assert "rev (validation)" not in overview and "rev" in overview
    assert is_png(out / "plots" / "add.png")  # written at the run's end, with this curve


def test_smoothing_is_debiased():
    """TensorBoard's debiased moving average: a constant stays itself from the first value, and
    a jump is approached geometrically at rate ``weight``."""
    assert smoothed([3.0] * 5) == pytest.approx([3.0] * 5)
    values = smoothed([0.0] * 20 + [1.0] * 40, weight=0.9)
    assert values[19] == 0.0
    # after k + 1 ones: (1 - w^(k+1)) of the weight is on 1, debiased by 1 - w^(20+k+1)
    want = [(1 - 0.9 ** (k + 1)) / (1 - 0.9 ** (21 + k)) for k in range(40)]
    assert values[20:] == pytest.approx(want, rel=1e-12)
    assert smoothed([1.0, None, 1.0]) == [1.0, None, 1.0]


def test_a_running_training_is_plotted_while_it_writes(tiny_model_dir, tmp_path):
    raw = two_adapter_config(tmp_path)
    for adapter in raw["lora"]:
        adapter["num_epochs"] = 100_000  # runs far longer than the test; killed at its end
    config = tmp_path / "long.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "mlora.py"), *mlora_args(tiny_model_dir, config, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with(), cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not metrics_path(out).exists() or metrics_path(out).stat().st_size < 4000:
            assert proc.poll() is None and time.monotonic() < deadline, "no rows were written"
            time.sleep(0.2)
        plotted = subprocess.run(  # the command itself, as a user runs it beside the training
            [sys.executable, str(ROOT / "launch.py"), "plot", "--dir", str(out)],
            capture_output=True, text=True, env=env_with(), cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert proc.poll() is None, "the run ended before it was plotted"
        assert plotted.returncode == 0, plotted.stderr
        written = [Path(line) for line in plotted.stdout.split()]
        assert [p.name for p in written] == ["loss.png", "add.png", "rev.png"]
        assert all(is_png(path) for path in written)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_missing_or_empty_metrics_are_one_line(tmp_path, capsys):
    assert launch_main(["plot", "--dir", str(tmp_path)]) == 2
    path = tmp_path / "metrics.jsonl"
    assert capsys.readouterr().err == (
        f"error: {path}: no metrics file (a training run writes it into its --dir)\n"
    )
    path.write_text("", encoding="utf-8")
    assert launch_main(["plot", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: no rows yet (the run has not logged a step)\n"
    )
    path.write_text('{"kind": "step"}\n[1, 2]\n', encoding="utf-8")
    assert launch_main(["plot", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: line 2 is not a JSON object\n"
    run_only = {"kind": "run", "run": "r", "global_step": 1, "tokens_per_s": 1.0,
                "peak_memory_mib": 1.0}  # fmt: skip
    path.write_text(json.dumps(run_only) + "\n", encoding="utf-8")
    assert launch_main(["plot", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: no training step logged yet, nothing to plot\n"
    )
    assert not (tmp_path / "plots").exists()
