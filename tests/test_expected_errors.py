"""A user mistake is one line; a bug is a traceback: each ``except`` catches what it expects.

For each place that turns a library's failure into an ``MloraError`` (or a fallback), the
library's own failure for bad input gives the one-line error, and any other exception (a bug:
here an ``AttributeError`` injected into the library call) comes through unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch

from mlora.adapters.peft_files import read_adapter
from mlora.batching.packing import packing_problem
from mlora.core.errors import DataError, MloraError
from mlora.data.rows import load_rows
from tests.conftest import make_model


def refuse_packed_rows(model, error: Exception) -> None:
    """Make ``model``'s backbone raise ``error`` on packed input (several rows in one)."""
    forward = model.base_model.forward

    def packed_fails(*args, position_ids=None, **kwargs):  # type: ignore[no-untyped-def]
        if position_ids is not None and position_ids.shape[-1] > 5:
            raise error
        return forward(*args, position_ids=position_ids, **kwargs)

    model.base_model.forward = packed_fails


def test_a_model_that_refuses_packed_rows_is_padded_and_says_why() -> None:
    model = make_model()
    assert packing_problem(model) is None  # the tiny LLaMA packs exactly
    refuse_packed_rows(model, TypeError("forward() got an unexpected keyword 'position_ids'"))
    problem = packing_problem(model)
    assert problem is not None and "TypeError" in problem and "position_ids" in problem


def test_a_bug_in_the_packing_probe_is_a_traceback_not_padding() -> None:
    model = make_model()
    refuse_packed_rows(model, AttributeError("'NoneType' object has no attribute 'shape'"))
    with pytest.raises(AttributeError, match="no attribute 'shape'"):
        packing_problem(model)


def write_legacy_adapter(folder: Path, payload: bytes) -> Path:
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "adapter_model.bin").write_bytes(payload)
    return folder


def test_legacy_weights_torch_refuses_are_one_line_and_a_bug_is_a_traceback(
    tmp_path: Path, monkeypatch
) -> None:
    """A whole torch file holding an object ``weights_only`` refuses (the header checks pass)."""
    saved = tmp_path / "saved.bin"
    torch.save({"w": Path("a path is no tensor")}, saved)
    folder = write_legacy_adapter(tmp_path / "a", saved.read_bytes())
    with pytest.raises(MloraError, match=r"adapter_model\.bin: cannot be read"):
        read_adapter(folder)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AttributeError("a bug")

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(AttributeError, match="a bug"):
        read_adapter(folder)


def test_data_that_datasets_cannot_parse_is_one_line_and_a_bug_is_a_traceback(
    tmp_path: Path, monkeypatch
) -> None:
    bad = tmp_path / "rows.csv"
    bad.write_text('instruction,output\n"open quote,never closed\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        load_rows(str(bad))

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AttributeError("a bug")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(AttributeError, match="a bug"):
        load_rows(str(bad))
