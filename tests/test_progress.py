"""The progress bar shows the run's tokens/s and each adapter's latest loss (the values
D/metrics.jsonl holds): ``mlora.py`` on a real terminal (a pseudo-terminal), and
``mlora.train(...)`` run by a real Jupyter kernel (ipykernel, driven by nbclient, as Jupyter runs
a cell).

The kernel's output is no terminal, so the bar shows only because mlora finds the kernel
(``progress.in_notebook``). Without ipywidgets tqdm draws text into the cell's stderr; with
it, a widget whose state nbclient stores in the notebook: the test reads both.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from mlora.training.metrics.metrics_file import metrics_path, read_metrics
from tests.helpers import read_terminal
from tests.reliability_support import MLORA, ROOT, env_with, mlora_args
from tests.test_metrics import steps_of, two_adapter_config


def last_postfix(output_dir: Path) -> str:
    """The bar's tail as the file's last values say it should read: tokens/s, each loss."""
    rows = read_metrics(metrics_path(output_dir))
    speed = [row for row in rows if row["kind"] == "run"][-1]["tokens_per_s"]
    losses = {name: steps_of(rows, name)[-1]["loss"] for name in ("add", "rev")}
    return f"{speed:,.0f} tok/s | add {losses['add']:.4g} | rev {losses['rev']:.4g}"


def test_a_terminal_run_shows_tokens_per_s_and_each_adapters_loss(tiny_model_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(two_adapter_config(tmp_path, log_step=2)), encoding="utf-8")
    out = tmp_path / "out"
    env = {k: v for k, v in env_with().items() if k != "TQDM_DISABLE"}
    leader, follower = pty.openpty()  # stderr is a terminal: tqdm draws its bar
    columns = struct.pack("HHHH", 50, 200, 0, 0)  # rows, columns: wide enough for the postfix
    fcntl.ioctl(follower, termios.TIOCSWINSZ, columns)
    proc = subprocess.Popen(
        [sys.executable, MLORA, *mlora_args(tiny_model_dir, config, out)],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=ROOT,
    )  # fmt: skip
    os.close(follower)
    shown = read_terminal(leader)
    os.close(leader)
    assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode("utf-8", errors="replace")
    assert last_postfix(out) in text, text[-3000:]
    assert re.search(r"training: 100%\|.*\| \d+/\d+ \[", text), text[-3000:]


NOTEBOOK = "the notebook test needs nbformat, nbclient and ipykernel"


def cell_text(notebook) -> str:  # type: ignore[no-untyped-def]
    """Everything the cells showed: streams, results, errors and stored widget state."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                parts.append(output["text"])
            elif output["output_type"] == "error":
                parts.append("\n".join(output["traceback"]))
            else:
                parts.append(json.dumps(output.get("data", {})))
    parts.append(json.dumps(notebook.metadata.get("widgets", {})))
    return "\n".join(parts)


def test_a_notebook_run_shows_tokens_per_s_and_each_adapters_loss(tiny_model_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason=NOTEBOOK)
    nbclient = pytest.importorskip("nbclient", reason=NOTEBOOK)
    pytest.importorskip("ipykernel", reason=NOTEBOOK)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(two_adapter_config(tmp_path, log_step=2)), encoding="utf-8")
    out = tmp_path / "out"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport mlora"),
        nbformat.v4.new_code_cell(
            f"trainer = mlora.train({str(config)!r}, base_model={str(tiny_model_dir)!r}, "
            f"output_dir={str(out)!r}, seed=3)"
        ),
    ]
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )  # fmt: skip
    client.execute()
    shown = cell_text(notebook)

    want = last_postfix(out)
    assert want in shown, shown[-3000:]  # the bar's last postfix: the file's last values
    assert re.search(r"training: 100%\|.*\| \d+/\d+ \[", shown), shown[-3000:]  # a bar, done
    assert "step 2 | add |" in shown  # and the log lines, as on the command line
