"""The built-in demo model: deterministic bytes, loadable by transformers, cached atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlora.model import demo_model

REPO = Path(__file__).resolve().parents[1]
FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_same_bytes_in_process_and_in_a_fresh_process(built: Path, tmp_path: Path) -> None:
    again = demo_model.build_demo_model(tmp_path / "again")
    # A fresh interpreter with another hash seed and thread count: the tokenizer trainer must
    # not depend on either.
    env = {**os.environ, "PYTHONHASHSEED": "7", "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = "import sys; from mlora.model import demo_model as d; d.build_demo_model(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True, env=env)
    for name in FILES:
        reference = (built / name).read_bytes()
        assert (again / name).read_bytes() == reference, name
        assert (tmp_path / "fresh" / name).read_bytes() == reference, name


def test_loads_with_auto_classes_as_a_real_llama(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers >= 4
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.hidden_act == "silu" and hasattr(model.model.layers[0].mlp, "gate_proj")  # SwiGLU
    assert config.vocab_size == len(tokenizer)
    for token in ("bos", "eos", "pad", "unk"):
        assert getattr(tokenizer, f"{token}_token_id") is not None, token
    text = "What is the capital of Velloria? ünïcode 42"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size)


@pytest.fixture
def fast_build(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caching tests copy the module's build instead of regenerating it (same files, faster)."""

    def copy_build(out_dir: str | Path) -> Path:
        shutil.copytree(built, out_dir, dirs_exist_ok=True)
        return Path(out_dir)

    monkeypatch.setattr(demo_model, "build_demo_model", copy_build)


def test_demo_model_path_caches_under_mlora_home(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast_build: None,
) -> None:
    monkeypatch.setenv("MLORA_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="mlora"):
        path = demo_model.demo_model_path()
    assert path == tmp_path / "demo-model"
    assert "random-weight demo model (not a real LLM)" in caplog.text
    assert str(path) in caplog.text
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlora"):
        assert demo_model.demo_model_path() == path
    assert "generating" not in caplog.text  # served from the cache
    assert weights.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-model"]  # no temp leftovers


def test_incomplete_or_stale_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_build: None
) -> None:
    monkeypatch.setenv("MLORA_HOME", str(tmp_path))
    stale = tmp_path / "demo-model"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # e.g. a copy made by hand, without the marker
    path = demo_model.demo_model_path()
    marker = json.loads((path / demo_model.MARKER).read_text())
    assert marker["version"] == demo_model.DEMO_MODEL_VERSION
    assert (path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-model"]


def test_default_home_is_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLORA_HOME", raising=False)
    assert demo_model.demo_model_home() == Path.home() / ".cache" / "mlora" / "demo-model"


def test_losing_the_first_run_race_keeps_the_winners_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_build: None
) -> None:
    monkeypatch.setenv("MLORA_HOME", str(tmp_path))
    winner = demo_model.demo_model_path()
    late = tmp_path / ".demo-model-late"
    demo_model.build_demo_model(late)
    demo_model._install(late, winner)  # a concurrent first run finishing second
    assert demo_model._is_current(winner)
    assert (winner / "model.safetensors").is_file()
