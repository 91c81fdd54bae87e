"""``report_to``: each tracker's own reader finds every adapter's run with the values of
D/metrics.jsonl, validation loss (``eval/loss``) included (TensorBoard's EventAccumulator,
MLflow's client over its file store, Trackio's local store, W&B's offline run files); a missing
package or a bad name is one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.cli.train import main as mlora_main
from mlora.training.metrics.metrics_file import metrics_path, read_metrics
from tests.reliability_support import env_with, mlora_args, one_error_line, run_mlora
from tests.test_metrics import steps_of, two_adapter_config, validation_curve, with_validation

INSTALLED = [n for n in ("tensorboard", "mlflow", "trackio") if importlib.util.find_spec(n)]


def write_config(folder: Path, **top: object) -> Path:
    """Two adapters; ``add`` validates every 2 steps on 3 held-out rows."""
    path = folder / "config.json"
    raw = with_validation(two_adapter_config(folder, **top))
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def trackio_logs(store: Path, project: str, run_name: str, group: str) -> list[dict]:
    """Trackio's own reader, in a process that starts with TRACKIO_DIR set (read at import)."""
    code = (
        "import json, sys\n"
        "from trackio.sqlite_storage import SQLiteStorage as S\n"
        "print(json.dumps({'logs': S.get_logs(sys.argv[1], sys.argv[2]), "
        "'config': S.get_run_config(sys.argv[1], sys.argv[2])}))"
    )
    env = {**env_with(), "TRACKIO_DIR": str(store)}
    done = subprocess.run(
        [sys.executable, "-c", code, project, run_name],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["config"]["_Group"] == group  # Trackio keeps a run's group in its config
    assert found["config"]["r"] == 4
    return found["logs"]


@pytest.mark.skipif(not INSTALLED, reason="needs tensorboard, mlflow or trackio")
def test_each_tracker_reads_back_every_adapters_values(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    out, store = tmp_path / "out", tmp_path / "stores"
    args = mlora_args(tiny_model_dir, write_config(tmp_path), out, "--report_to", *INSTALLED)
    result = run_mlora(
        args,
        MLFLOW_TRACKING_URI=(store / "mlruns").as_uri(),
        MLFLOW_ALLOW_FILE_STORE="true",  # MLflow 3 wants a database; its file store is allowed
        TRACKIO_DIR=str(store / "trackio"),
    )
    assert result.returncode == 0, result.stderr
    rows = read_metrics(metrics_path(out))
    (run,) = {row["run"] for row in rows}
    group = f"mlora-{run}"
    wanted = {name: steps_of(rows, name) for name in ("add", "rev")}
    throughput = [row for row in rows if row["kind"] == "run"]
    validated = {  # adapter -> [(step, val_loss)] as metrics.jsonl has them
        name: [(row["step"], row["val_loss"]) for row in mine if "val_loss" in row]
        for name, mine in wanted.items()
    }
    assert [list(v) for v in validated["add"]] == validation_curve(out, "add")
    assert len(validated["add"]) >= 3 and validated["rev"] == []

    if "tensorboard" in INSTALLED:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for name, mine in wanted.items():
            events = EventAccumulator(str(out / "tensorboard" / group / name)).Reload()
            for tag, key in [("train/loss", "loss"), ("train/learning_rate", "lr"),
                             ("train/grad_norm", "grad_norm")]:  # fmt: skip
                scalars = events.Scalars(tag)
                assert [s.step for s in scalars] == [row["step"] for row in mine]
                assert [s.value for s in scalars] == pytest.approx([r[key] for r in mine], 1e-6)
            tags = events.Tags()["scalars"]
            evals = events.Scalars("eval/loss") if "eval/loss" in tags else []
            assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in evals] == validated[name]
        events = EventAccumulator(str(out / "tensorboard" / group / "run")).Reload()
        speeds = events.Scalars("run/tokens_per_s")
        assert [s.step for s in speeds] == [row["global_step"] for row in throughput]

    if "mlflow" in INSTALLED:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(store / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("mlora")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.info.run_name == group]
        children = {r.info.run_name: r for r in runs if r.info.run_name != group}
        assert set(children) == set(wanted)
        for name, mine in wanted.items():
            child = children[name]
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert child.info.status == "FINISHED"
            assert child.data.params["r"] == "4"
            history = client.get_metric_history(child.info.run_id, "train/loss")
            assert sorted((m.step, m.value) for m in history) == [
                (row["step"], pytest.approx(row["loss"], rel=1e-12)) for row in mine
            ]
            evals = client.get_metric_history(child.info.run_id, "eval/loss")
            assert sorted((m.step, m.value) for m in evals) == validated[name]
        speeds = client.get_metric_history(parent.info.run_id, "run/tokens_per_s")
        assert sorted(m.step for m in speeds) == [row["global_step"] for row in throughput]

    if "trackio" in INSTALLED:
        for name, mine in wanted.items():
            logs = trackio_logs(store / "trackio", "mlora", f"{group}-{name}", group)
            assert [log["step"] for log in logs] == [row["step"] for row in mine]
            assert [log["train/loss"] for log in logs] == pytest.approx(
                [row["loss"] for row in mine], rel=1e-12
            )
            evals = [(log["step"], log["eval/loss"]) for log in logs if "eval/loss" in log]
            assert evals == validated[name]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_offline_has_one_run_per_adapter_in_the_group(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = mlora_args(tiny_model_dir, write_config(tmp_path), out, "--report_to", "wandb")
    result = run_mlora(args, WANDB_MODE="offline", WANDB_SILENT="true")
    assert result.returncode == 0, result.stderr
    (run,) = {row["run"] for row in read_metrics(metrics_path(out))}
    group = f"mlora-{run}"
    for key in ("add", "rev", "run"):
        (folder,) = (out / "wandb").glob(f"offline-run-*-{group}-{key}")
        record = (folder / f"run-{group}-{key}.wandb").read_bytes()  # W&B's transaction log
        assert group.encode() in record  # the run group
        metrics = [b"train/loss", b"eval/loss"] if key == "add" else [b"train/loss"]
        for metric in metrics if key != "run" else [b"run/tokens_per_s"]:
            assert metric in record
        if key == "rev":  # no validation: no eval/loss
            assert b"eval/loss" not in record


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, capsys):
    from mlora.training.metrics import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name)
    )
    config = write_config(tmp_path)
    code = mlora_main(["--base_model", str(tmp_path), "--config", str(config), "--dir",
                       str(tmp_path / "out"), "--report_to", "tensorboard,mlflow"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert one_error_line(err) == (
        "error: report_to 'mlflow' needs the mlflow package: pip install 'mlora[mlflow]'"
    )
    assert not (tmp_path / "out").exists()  # said before anything was written


def test_bad_tracker_names_are_one_line(tmp_path, capsys):
    config = write_config(tmp_path)
    base = ["--base_model", str(tmp_path), "--config", str(config), "--dir", str(tmp_path)]
    assert mlora_main([*base, "--report_to", "comet"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: --report_to must be a list of 'tensorboard', 'mlflow', 'trackio', 'wandb', "
        "'none', got comet"
    )
    assert mlora_main([*base, "--report_to", "none", "tensorboard"]) == 2
    assert "'none' alone" in one_error_line(capsys.readouterr().err)
    bad = write_config(tmp_path, report_to="tensorboard")
    assert mlora_main([*base[:2], "--config", str(bad), "--dir", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {bad}: key 'report_to' must be a list of 'tensorboard', 'mlflow', 'trackio', "
        "'wandb', 'none', got \"tensorboard\""
    )
