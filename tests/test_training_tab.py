"""The web page's Training tab: ``training_view`` over D/metrics.jsonl, and the real page in
headless Chromium following a training that is running (its table must move forward and show
the rows of the metrics file).

The browser test needs gradio (extra ``webui``), selenium and Chromium with its driver; it is
skipped without them (see tests/test_webui.py).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlora.training.metrics.metrics_file import metrics_path, read_metrics
from tests.reliability_support import ROOT, env_with, mlora_args
from tests.test_metrics import (
    steps_of,
    train_config,
    two_adapter_config,
    validation_curve,
    with_validation,
)
from tests.test_webui import BROWSER, DRIVER, MISSING, free_port, wait_for_page

pytest.importorskip("pandas")


def test_view_of_a_finished_run(tiny_model_dir: Path, tmp_path: Path):
    from mlora.cli.training_tab import training_view

    train_config(tmp_path, tiny_model_dir, with_validation(two_adapter_config(tmp_path)))
    out = tmp_path / "out"
    rows = read_metrics(metrics_path(out))
    view = training_view(out)
    curve = validation_curve(out, "add")  # add validates, rev does not
    assert view.table["val loss"].tolist()[0] == round(curve[-1][1], 4)
    assert view.table["val loss"].isna().tolist()[1]
    val = view.loss[view.loss["adapter"] == "add (validation)"]
    assert val[["step", "loss"]].values.tolist() == curve
    assert view.table["adapter"].tolist() == ["add", "rev"]
    for _, line in view.table.iterrows():
        last = steps_of(rows, line["adapter"])[-1]
        assert line["step"] == last["step"]
        assert line["loss"] == round(last["loss"], 4)
    raw = view.loss[view.loss["adapter"] == "add"]
    assert raw["loss"].tolist() == [row["loss"] for row in steps_of(rows, "add")]
    assert "global step" in view.status and "tokens/s" in view.status


def test_view_before_any_row_says_why(tmp_path: Path):
    from mlora.cli.training_tab import training_view

    view = training_view(tmp_path)
    assert view.status.startswith("waiting for metrics: ")
    assert "no metrics file" in view.status and view.table.empty


def start(command: list, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *map(str, command)],
        stdout=log.open("w", encoding="utf-8"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.skipif(bool(MISSING), reason=f"browser test needs: {', '.join(MISSING)}")
def test_training_tab_follows_a_running_training_in_chromium(tiny_model_dir, tmp_path):
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    raw = with_validation(two_adapter_config(tmp_path), every=5)  # add validates, rev not
    for adapter in raw["lora"]:
        adapter["num_epochs"] = 100_000  # runs far longer than the test; killed at the end
    config = tmp_path / "long.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    out = tmp_path / "out"
    env = {**env_with(), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    trainer = start(["mlora.py", *mlora_args(tiny_model_dir, config, out)], tmp_path / "t.log", env)
    port = free_port()
    page = ["inference.py", "--base_model", tiny_model_dir, "--dir", out, "--port", port]
    server = None
    driver = None
    options = Options()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1300,1000",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    try:
        while not metrics_path(out).exists():  # the page is started on a run already writing
            assert trainer.poll() is None, (tmp_path / "t.log").read_text()
            time.sleep(0.2)
        server = start(page, tmp_path / "server.log", env)
        wait_for_page(f"http://127.0.0.1:{port}/", server, tmp_path / "server.log")
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        driver.implicitly_wait(30)
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Training']").click()

        def table() -> dict[str, tuple[int, float, str]]:
            cells = driver.find_elements(By.CSS_SELECTOR, "#training-table [role=row]")
            found = {}
            for row in cells:
                texts = [
                    td.text for td in row.find_elements(By.CSS_SELECTOR, "[role=gridcell], td")
                ]
                if len(texts) >= 6 and texts[1].isdigit():
                    found[texts[0]] = (int(texts[1]), float(texts[3]), texts[5])
            return found

        def wait(until, what: str) -> None:
            try:
                WebDriverWait(driver, 60).until(until)
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / "training-tab.png"))
                status = driver.find_elements(By.CSS_SELECTOR, "#training-status")
                shown = status[0].text if status else "no status"
                cells = [
                    [td.text for td in row.find_elements(By.CSS_SELECTOR, "[role=gridcell], td")]
                    for row in driver.find_elements(By.CSS_SELECTOR, "#training-table [role=row]")
                ]
                pytest.fail(f"{what}: the page shows {cells} ({shown})")

        wait(lambda _: set(table()) == {"add", "rev"}, "both adapters")
        first = table()
        wait(lambda _: table()["add"][0] > first["add"][0], "a later step")
        later = table()
        status = driver.find_element(By.CSS_SELECTOR, "#training-status").text
        driver.save_screenshot(str(tmp_path / "training-tab.png"))
        assert trainer.poll() is None, "the training ended: the page must follow a running one"
        assert re.search(r"global step \d+ · [\d,]+ tokens/s", status), status
        rows = read_metrics(metrics_path(out))
        for name, (step, loss, val) in later.items():  # what the page shows is the file's row
            (row,) = [r for r in steps_of(rows, name) if r["step"] == step]
            assert loss == round(row["loss"], 4)
            vals = [r["val_loss"] for r in steps_of(rows, name) if r["step"] <= step and
                    "val_loss" in r]  # fmt: skip
            assert (float(val) if val else None) == (round(vals[-1], 4) if vals else None)
        assert later["add"][2] and not later["rev"][2]  # add's latest validation is shown
        plots = driver.find_elements(By.CSS_SELECTOR, "#training-loss canvas, #training-loss svg")
        assert plots, "the loss plot was not drawn"
        print(f"screenshot: {tmp_path / 'training-tab.png'}; table {first} -> {later}")
    finally:
        if driver is not None:
            driver.quit()
        for proc in (server, trainer):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)


def test_the_tail_reads_only_what_was_appended(tmp_path: Path):
    from mlora.training.metrics.metrics_file import MetricsTail

    path = metrics_path(tmp_path)
    path.write_text('{"a": 1}\n{"a": 2', encoding="utf-8")  # the second row is being written
    tail = MetricsTail(path)
    assert tail.read() == [{"a": 1}]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('}\n{"a": 3}\n')
    assert tail.read() == [{"a": 1}, {"a": 2}, {"a": 3}]
    path.write_text('{"a": 1}\n', encoding="utf-8")  # cut by a --resume: read again
    assert tail.read() == [{"a": 1}]


def test_long_curves_are_thinned_evenly_keeping_the_last_point():
    from mlora.cli.training_tab import thinned

    assert list(thinned(5, limit=10)) == [0, 1, 2, 3, 4]
    points = list(thinned(10_001, limit=400))
    assert points[-1] == 10_000 and len(points) <= 401
    assert len({b - a for a, b in itertools.pairwise(points)}) == 1
