"""Damaged files: found by their headers before anything loads, one line naming the file, and
``--resume`` falls back to the newest intact checkpoint, saying which it skipped and why.

The reference for "damaged" is the real reader: safetensors' ``load_file`` and ``torch.load``
must fail on every file the cheap header checks call damaged, and succeed on every one they pass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from mlora.core.errors import MloraError
from mlora.core.integrity import safetensors_problem, torch_file_problem
from mlora.persistence.adapter_files import read_adapter
from mlora.training.checkpoints import cut_problem, find_resume_point
from tests.reliability_support import fake_checkpoint, fake_cut, small_identity


def _loads(reader, path: Path) -> bool:
    try:
        reader(path)
    except Exception:
        return False
    return True


def test_safetensors_check_agrees_with_the_real_reader(tmp_path: Path) -> None:
    whole = save({"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.zeros(0)})
    path = tmp_path / "x.safetensors"
    variants = [whole[:cut] for cut in range(0, len(whole), 7)]
    variants += [whole + b"\0", b"\xff" * 64, b"{" * 16, whole[:8] + b"[1]" + whole[11:]]
    for data in [whole, *variants]:
        path.write_bytes(data)
        assert (safetensors_problem(path) is None) == _loads(load_file, path), data[:16]
    path.write_bytes(whole)
    assert safetensors_problem(path) is None


def test_torch_file_check_agrees_with_the_real_reader(tmp_path: Path) -> None:
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.randn(4)}}, "param_groups": []}, path)
    whole = path.read_bytes()
    for data in [whole[: len(whole) // 2], whole[:-30], b"garbage", b""]:
        path.write_bytes(data)
        assert torch_file_problem(path) is not None
        assert not _loads(lambda p: torch.load(p, weights_only=True), path)
    path.write_bytes(whole)
    assert torch_file_problem(path) is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not what it should be")


def _json(value: object):
    return lambda path: path.write_text(json.dumps(value))


# (file inside the newest cut's world, damage, what the skip message says)
DAMAGE = [
    ("a/checkpoint-4/adapter_model.safetensors", _truncate, "truncated: "),
    ("a/checkpoint-4/optimizer.pt", _garbage, "truncated or not a torch file"),
    ("a/checkpoint-4/adapter_config.json", _json([1, 2]), "must be a JSON object, not a list"),
    ("a/checkpoint-4/adapter_config.json", _json({"r": "2"}), "key 'r' is of the wrong type"),
    ("a/checkpoint-4/trainer_state.json", _garbage, "invalid JSON at line 1"),
    ("a/checkpoint-4/scheduler.pt", Path.unlink, "scheduler.pt is missing"),
    ("RECORDS/step-4/state.safetensors", _truncate, "truncated"),
    ("RECORDS/step-4/manifest.json", _json({"format": 1}), "missing the key 'global_step'"),
    ("RECORDS/step-4/manifest.json", _json(["x"]), "must be a JSON object"),
    ("b/adapter_model.safetensors", _garbage, "truncated or not a safetensors file"),
]


@pytest.mark.parametrize(("where", "damage", "reason"), DAMAGE, ids=[d[0] + d[2] for d in DAMAGE])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(
    tmp_path: Path, caplog, where: str, damage, reason: str
) -> None:
    identity = small_identity("a", "b")
    records = identity.records(tmp_path)
    for step in (2, 4):
        fake_checkpoint(tmp_path, "a", f"checkpoint-{step}")
        fake_cut(records, identity, step, {"a": f"checkpoint-{step}", "b": None})
    # "b" finished at step 4: the cut needs its final adapter
    manifest_path = records / "step-4" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["adapters"]["b"]["status"] = "finished"
    manifest_path.write_text(json.dumps(manifest))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / name).write_bytes((tmp_path / "a/checkpoint-4" / name).read_bytes())
    assert cut_problem(tmp_path, records / "step-4") is None

    damage(tmp_path / where.replace("RECORDS", str(records.relative_to(tmp_path))))
    with caplog.at_level(logging.WARNING, logger="mlora"):
        point = find_resume_point(tmp_path, identity)
    assert point.path == records / "step-2"
    (skipped,) = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped.startswith(f"skipping checkpoint {records / 'step-4'}: ")
    assert reason in skipped and where.split("/")[-1] in skipped


def test_nothing_intact_is_one_line(tmp_path: Path) -> None:
    identity = small_identity("a")
    fake_checkpoint(tmp_path, "a", "checkpoint-2")
    fake_cut(identity.records(tmp_path), identity, 2, {"a": "checkpoint-2"})
    _truncate(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors")
    with pytest.raises(MloraError, match=r"nothing to resume in .*no complete checkpoint of "):
        find_resume_point(tmp_path, identity)


def test_reading_a_damaged_adapter_is_one_line_naming_the_file(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, "a", "checkpoint-1")
    _truncate(folder / "adapter_model.safetensors")
    with pytest.raises(MloraError, match=r"adapter_model\.safetensors: truncated: \d+ bytes"):
        read_adapter(folder)
