"""The public API of ``import mlora``: every name resolves, and importing costs no torch.

Names load on first use (``mlora/__init__.py``), so a name listed in ``__all__`` but missing
from the lazy table would only fail when a user touches it; this walks them all.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mlora

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_defining_module() -> None:
    assert sorted(mlora.__all__) == sorted(set(mlora.__all__))
    for name in mlora.__all__:
        value = getattr(mlora, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value, name
    assert set(mlora.__all__) <= set(dir(mlora))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        mlora.no_such_name  # noqa: B018


def test_import_mlora_and_the_launcher_load_no_torch() -> None:
    """``launch.py gen`` and ``--help`` start in a second, not after torch and transformers."""
    probe = (
        "import sys, mlora, mlora.cli.launch, mlora.cli.program; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
