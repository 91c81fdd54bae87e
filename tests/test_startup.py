"""Commands that need no model answer before torch and transformers load.

README gives start-up figures for these (``launch.py gen``, ``--help``, a config error);
each runs here as the real command in a fresh interpreter under ``python -X importtime``,
whose report lists every module the process imported: torch and transformers must not be
among them. (Not a timed test: the imports are what make a start slow.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers"}

COMMANDS = {
    "launch gen": ["launch.py", "gen", "--template", "lora", "--tasks",
                   str(ROOT / "data" / "dummy_data.json"), "--file_name", "{tmp}/g.json"],
    "launch help": ["launch.py", "help"],
    "launch --help": ["launch.py", "--help"],
    "launch avail": ["launch.py", "avail"],
    "launch run --help": ["launch.py", "run", "--help"],
    "mlora --help": ["mlora.py", "--help"],
    "mlora config error": ["mlora.py", "--base_model", "m", "--config", "{tmp}/bad.json"],
    "generate --help": ["generate.py", "--help"],
    "inference --help": ["inference.py", "--help"],
}  # fmt: skip


def imported_modules(importtime_report: str) -> set[str]:
    """The module names of ``-X importtime``'s lines (``import time: self | total | name``)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_report.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_answers_without_torch(name: str, tmp_path: Path) -> None:
    # README's own config-error example: `r` 0 (its check of the adapter name ran through torch)
    bad = {"lora": [{"name": "a", "data": "x.json", "r": 0}]}
    (tmp_path / "bad.json").write_text(str(bad).replace("'", '"'), encoding="utf-8")
    args = [a.format(tmp=tmp_path) for a in COMMANDS[name]]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    modules = imported_modules(done.stderr)
    assert "mlora" in modules, done.stderr[-2000:]  # the report is there and covers mlora
    assert not modules & HEAVY, f"{name} imported {sorted(modules & HEAVY)}"
    if name == "mlora config error":
        assert done.returncode == 2
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: {tmp_path / 'bad.json'}: adapter 'a': key 'r' must be an "
                          "integer >= 1, got 0"], done.stderr[-2000:]  # fmt: skip
    else:
        assert done.returncode == 0, done.stderr[-2000:]


def test_module_dict_attributes_cover_the_installed_torch() -> None:
    """Adapter names are checked without torch against a written-out list of ``nn.ModuleDict``
    attributes; the installed torch must not have one the list lacks."""
    import torch

    from mlora.config.adapter_names import MODULE_DICT_ATTRIBUTES, adapter_name_problem

    missing = set(dir(torch.nn.ModuleDict())) - MODULE_DICT_ATTRIBUTES
    assert not missing, f"add to MODULE_DICT_ATTRIBUTES: {sorted(missing)}"
    assert adapter_name_problem("state_dict") is not None
    assert adapter_name_problem("math_v2") is None
