"""Progress in a notebook: ``mlora.train(...)`` run by a real Jupyter kernel (ipykernel, driven
by nbclient, as Jupyter runs a cell) shows the progress bar with the run's tokens/s and each
adapter's latest loss, the values D/metrics.jsonl holds.

The kernel's output is no terminal, so the bar shows only because mlora finds the kernel
(``progress.in_notebook``). Without ipywidgets tqdm draws text into the cell's stderr; with
it, a widget whose state nbclient stores in the notebook: the test reads both.
"""

from __future__ import annotations

import json
import re

import pytest

from mlora.training.metrics.metrics_file import metrics_path, read_metrics
from tests.reliability_support import ROOT
from tests.test_metrics import steps_of, two_adapter_config

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient and ipykernel")
pytest.importorskip("ipykernel", reason="the notebook test needs nbclient and ipykernel")


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

    rows = read_metrics(metrics_path(out))
    speed = [row for row in rows if row["kind"] == "run"][-1]["tokens_per_s"]
    losses = {name: steps_of(rows, name)[-1]["loss"] for name in ("add", "rev")}
    want = f"{speed:,.0f} tok/s | add {losses['add']:.4g} | rev {losses['rev']:.4g}"
    assert want in shown, shown[-3000:]  # the bar's last postfix: the file's last values
    assert re.search(r"training: 100%\|.*\| \d+/\d+ \[", shown), shown[-3000:]  # a bar, done
    assert "step 2 | add |" in shown  # and the log lines, as on the command line
