"""What a new user meets first: a wheel install, the quickstart, a notebook, an offline machine.

Each test is one friction a first run hit (issue 17): templates missing from a wheel, a local
run that still touched the network, a 72 s wait on an unreachable hub, a silent notebook, log
lines out of order, usage lines naming the wrong program, no way to give `gen` test data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlora.cli import launch
from mlora.cli import train as cli
from mlora.core import hub
from tests.helpers import addition_rows, write_json, write_template

REPO = Path(__file__).resolve().parents[1]


def small_config(folder: Path, **adapter: object) -> Path:
    rows = write_json(folder / "rows.json", addition_rows(8))
    config = {
        "cutoff_len": 32,
        "log_step": 1,
        "lora": [
            {
                "name": "a",
                "data": rows,
                "prompt": write_template(folder),
                "batch_size": 4,
                "num_epochs": 1,
                **adapter,
            }
        ],
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


# --- a wheel install ---------------------------------------------------------------------------


def test_a_wheel_ships_the_templates_and_gen_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "mlora", source / "mlora", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("mlora-*.whl")
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    templates = sorted((REPO / "mlora" / "adapters").glob("*/templates/*.json"))
    assert templates  # each kind's templates, package data
    assert all((installed / t.relative_to(REPO)).is_file() for t in templates)
    assert (installed / "mlora" / "model" / "resources" / "demo_corpus.txt").is_file()
    packages = {p.parent for p in (REPO / "mlora").rglob("__init__.py")}  # every layer's folder
    assert {installed / p.relative_to(REPO) for p in packages} <= {
        p.parent for p in (installed / "mlora").rglob("__init__.py")
    }
    user = tmp_path / "user"  # a folder with no templates/ of its own
    user.mkdir()
    write_json(user / "rows.json", addition_rows(4))
    done = subprocess.run(
        [sys.executable, "-m", "mlora.cli.launch", "gen", "--template", "lora",
         "--tasks", "rows.json"],
        capture_output=True, text=True, timeout=120, cwd=user,
        env={**os.environ, "PYTHONPATH": str(installed)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((user / "mlora.json").read_text())["lora"][0]["data"] == "rows.json"
    assert "next: python -m mlora.cli.launch run --dir out" in done.stdout
    # gen cannot know the base model: the hint says how to name one (else: the demo model)
    assert "add --base_model MODEL" in done.stdout and "demo model" in done.stdout


# --- the network -------------------------------------------------------------------------------


@pytest.fixture
def online_but_blocked(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Libraries in their default, online mode, while every DNS lookup and connection is
    refused and recorded (the list returned): nothing leaves the machine."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    attempts: list[object] = []

    def refuse(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    hub.hub_unreachable_reason.cache_clear()
    yield attempts
    hub.hub_unreachable_reason.cache_clear()


def test_the_guard_sees_the_datasets_usage_counter(
    online_but_blocked: list[object], tmp_path: Path
) -> None:
    """The check below is not vacuous: datasets' own usage counter is caught by the guard."""
    import datasets

    rows = write_json(tmp_path / "rows.json", addition_rows(2))
    datasets.load_dataset("json", data_files=rows, split="train")
    assert online_but_blocked


def test_a_run_on_local_files_makes_no_network_request(
    online_but_blocked: list[object], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mlora import api

    api.train(small_config(tmp_path), str(tiny_model_dir), tmp_path / "out", log=False)
    assert online_but_blocked == []
    assert (tmp_path / "out" / "a" / "adapter_model.safetensors").is_file()


def test_an_unreachable_hub_fails_at_once_in_one_line(
    online_but_blocked: list[object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_config(tmp_path)
    code = cli.main(["--base_model", "no-such-org/no-such-model", "--config", str(config),
                     "--dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "no-such-org/no-such-model" in errors[0], err
    assert "unreachable" in err and "Retrying" not in err
    assert len(online_but_blocked) == 1  # the one probe; no retries, no second library trying


# --- the log -----------------------------------------------------------------------------------


def _train_in_fresh_python(tiny_model_dir: Path, tmp_path: Path) -> str:
    """stderr of ``mlora.train(...)`` in a new interpreter where nothing configured logging
    (as in a notebook)."""
    config = small_config(tmp_path, num_epochs=2)
    code = (
        "import mlora; "
        f"mlora.train({str(config)!r}, base_model={str(tiny_model_dir)!r}, "
        f"output_dir={str(tmp_path / 'out')!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_train_from_a_notebook_logs_its_steps_and_saves_after_the_last_step_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    lines = _train_in_fresh_python(tiny_model_dir, tmp_path).splitlines()
    steps = [i for i, line in enumerate(lines) if "| loss " in line]
    saved = [i for i, line in enumerate(lines) if "finished, saved to" in line]
    assert len(steps) == 4 and len(saved) == 1, lines  # 8 rows / 4 per step * 2 epochs
    assert saved[0] > steps[-1], lines
    assert not any("Loading weights" in line for line in lines), lines  # transformers' bar


@pytest.mark.parametrize("log", [True, False])
def test_log_switch_attaches_a_handler_only_where_none_is_configured(
    log: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from mlora.api import log_to_stderr_unless_configured

    mlora_logger = logging.getLogger("mlora")
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh notebook kernel
    monkeypatch.setattr(mlora_logger, "handlers", [])
    with log_to_stderr_unless_configured(log):
        assert len(mlora_logger.handlers) == int(log)
        assert not log or mlora_logger.isEnabledFor(logging.INFO)
    assert mlora_logger.handlers == []
    monkeypatch.setattr(logging.root, "handlers", [logging.NullHandler()])  # configured
    with log_to_stderr_unless_configured(log):
        assert mlora_logger.handlers == []


# --- the command lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv0", "build", "expected"),
    [
        ("/venv/bin/mlora", cli.build_parser, "mlora"),
        ("mlora.py", cli.build_parser, "mlora.py"),
        (cli.__file__, cli.build_parser, "python -m mlora.cli.train"),
        ("/venv/bin/mlora-launch", launch.build_parser, "mlora-launch"),
        ("launch.py", launch.build_parser, "launch.py"),
        (launch.__file__, launch.build_parser, "python -m mlora.cli.launch"),
    ],
)
def test_usage_names_the_program_as_it_was_started(
    argv0: str, build, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [argv0])
    assert build().format_usage().startswith(f"usage: {expected} ")


def test_generate_usage_names_its_console_script(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlora.cli import generate as generate_cli

    monkeypatch.setattr(sys, "argv", ["/venv/bin/mlora-generate"])
    assert generate_cli.build_parser().format_usage().startswith("usage: mlora-generate ")


def test_gen_test_data_one_file_for_every_task_or_one_per_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a.json", "b.json", "ta.json", "tb.json"):
        write_json(tmp_path / name, addition_rows(2))
    gen = ["gen", "--template", "lora", "--tasks", "a.json;b.json", "--overwrite"]
    assert launch.main([*gen, "--test_data", "ta.json"]) == 0
    written = json.loads(Path("mlora.json").read_text())["lora"]
    assert [a["test_data"] for a in written] == ["ta.json", "ta.json"]
    assert launch.main([*gen, "--test_data", "ta.json;tb.json"]) == 0
    written = json.loads(Path("mlora.json").read_text())["lora"]
    assert [a["test_data"] for a in written] == ["ta.json", "tb.json"]


@pytest.mark.parametrize(
    ("test_data", "message"),
    [
        (
            "ta.json;tb.json;tc.json",
            "--test_data gives 3 files for 2 tasks (use one, or one per task)",
        ),
        ("missing.json", "data file not found: missing.json"),
    ],
)
def test_gen_test_data_mistakes_are_one_line(
    test_data: str, message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a.json", "b.json"):
        write_json(tmp_path / name, addition_rows(2))
    argv = ["gen", "--template", "lora", "--tasks", "a.json;b.json", "--test_data", test_data]
    assert launch.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not Path("mlora.json").exists()
