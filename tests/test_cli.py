"""``mlora.py`` through its real entry point: training, PEFT-loadable output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mlora.cli.train import main
from tests.helpers import addition_rows, reverse_rows, write_json, write_template

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **extra) -> Path:
    template = write_template(tmp_path)
    config = {
        "cutoff_len": 48,
        "save_step": 2,
        "lora": [
            {"name": "add", "data": write_json(tmp_path / "add.json", addition_rows(12)),
             "prompt": template, "r": 4, "batch_size": 4, "num_epochs": 1, **extra},
            {"name": "rev", "data": write_json(tmp_path / "rev.json", reverse_rows(8)),
             "prompt": template, "r": 2, "batch_size": 2, "num_epochs": 1, "use_dora": True},
        ],
    }  # fmt: skip
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return path


def test_mlora_py_trains_and_writes_peft_adapters(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "mlora.py"), "--base_model", str(tiny_model_dir)]
    command += ["--config", str(config), "--dir", str(out), "--seed", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| add |" in result.stderr and "loss" in result.stderr
    for name in ("add", "rev"):
        assert (out / name / "adapter_model.safetensors").is_file()
        assert (out / name / "checkpoint-2" / "optimizer.pt").is_file()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        peft_model = PeftModel.from_pretrained(base, out / name)
        assert any(
            torch.count_nonzero(p) for n, p in peft_model.named_parameters() if "lora_B" in n
        )


def test_the_package_wins_over_the_mlora_py_script() -> None:
    """From the checkout's root, ``mlora/`` (the package) and ``mlora.py`` (the documented command)
    sit in one folder: ``import mlora`` gets the package (a package directory wins over a module of
    the same name in one path entry), and ``python mlora.py`` still runs the command."""
    imported = subprocess.run(
        [sys.executable, "-c", "import mlora; print(mlora.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()) == ROOT / "mlora" / "__init__.py"
    helped = subprocess.run(
        [sys.executable, "mlora.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: mlora.py "), helped.stdout


def test_refuses_to_overwrite_and_continues_with_load_adapter(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    config = write_config(tmp_path)
    args = [
        "--base_model",
        str(tiny_model_dir),
        "--config",
        str(config),
        "--dir",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    before = (tmp_path / "out" / "add" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "already exists; pass --overwrite" in err
    assert (tmp_path / "out" / "add" / "adapter_model.safetensors").read_bytes() == before
    assert main([*args, "--load_adapter"]) == 0
    assert (tmp_path / "out" / "add" / "adapter_model.safetensors").read_bytes() != before
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 1.0}, "unknown key 'learning_rate' (did you mean 'lr'?)"),
        ({"target_modules": ["nope_proj"]}, "target module 'nope_proj' not found"),
        ({"data": "missing.json"}, "data file not found: missing.json"),
        ({"prompt": "nope"}, "unknown prompt template 'nope'"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    tmp_path: Path, tiny_model_dir: Path, capsys, change: dict, message: str
) -> None:
    config = write_config(tmp_path, **change)
    args = [
        "--base_model",
        str(tiny_model_dir),
        "--config",
        str(config),
        "--dir",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o" / "add").exists()


def test_nonexistent_base_model(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    assert main(["--base_model", str(tmp_path / "no-model"), "--config", str(config)]) == 2
    assert "no-model" in capsys.readouterr().err


def test_log_lines_follow_a_swapped_stderr() -> None:
    """A stderr captured and closed by a caller (notebook, capsys) must not break later logging:
    the CLI's handler writes to the stderr of the moment."""
    import contextlib
    import io
    import logging

    from mlora.core.stderr_log import CurrentStderrHandler

    log = logging.getLogger("mlora.test-stderr")
    log.propagate = False  # only this handler (an earlier CLI test configured the root logger)
    handler = CurrentStderrHandler()
    log.addHandler(handler)
    try:
        first, second = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(first):
            log.warning("one")
        first.close()
        with contextlib.redirect_stderr(second):
            log.warning("two")  # a handler holding the closed stream would fail here
        assert second.getvalue() == "two\n"
    finally:
        log.removeHandler(handler)
