"""The tokenized data cache gives exactly the rows the uncached path gives (the reference).

Each case prepares an adapter's training and validation rows three ways: ``data_cache: false``
(the reference), a first cached run (a miss: built and stored) and a second (a hit: read back,
with the data reader made to fail so a hit is proven). A changed file, tokenizer or key
misses; a damaged entry is rebuilt with a warning; ``data_cache: false`` writes nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError
from mlora.data import token_cache
from mlora.training.data_preparation import prepare_data
from mlora.training.validation import prepare_validation
from tests.conftest import make_tokenizer
from tests.helpers import addition_rows, write_json, write_template

CHAT = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
FORMATS: dict[str, list[dict[str, Any]]] = {
    "alpaca": addition_rows(12),
    "text": [{"text": f"row {i} " * (i + 1)} for i in range(8)],
    "prompt_completion": [{"prompt": f"q{i}?", "completion": f" a{i}"} for i in range(8)],
    "messages": [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"yo {i}"},
            ]
        }
        for i in range(8)
    ],
    "preference": [
        {"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(8)
    ],
}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLORA_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / token_cache.FOLDER


def tokenizer() -> Any:
    tok = make_tokenizer()
    tok.chat_template = CHAT
    return tok


def config(data: str, folder: Path, **keys: Any) -> Any:
    adapter = {"name": "a", "data": data, "prompt": write_template(folder)}
    adapter.update({k: v for k, v in keys.items() if k not in ("cutoff_len", "data_cache")})
    run = {k: v for k, v in keys.items() if k in ("cutoff_len", "data_cache")}
    return parse_config({"cutoff_len": 64, **run, "lora": [adapter]}, "test")


def prepared(cfg: Any, tok: Any) -> tuple[list, list]:
    return prepare_data(cfg, tok)["a"], prepare_validation(cfg, tok, 42).get("a", [])


def entries(home: Path) -> list[Path]:
    return sorted(home.glob(f"*{token_cache.SUFFIX}")) if home.exists() else []


def reader_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of a data file fails: the rows must come from the cache."""

    def fail(source: str) -> Any:
        raise AssertionError(f"{source} was read: not a cache hit")

    monkeypatch.setattr("mlora.training.validation.load_rows", fail)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cached_rows_equal_the_uncached_rows(fmt, home, tmp_path, monkeypatch) -> None:
    data = write_json(tmp_path / f"{fmt}.json", FORMATS[fmt])
    keys = {"alpaca": {"val_set_size": 3}, "preference": {"objective": "orpo"}}.get(fmt, {})
    tok = tokenizer()
    reference = prepared(config(data, tmp_path, data_cache=False, **keys), tok)
    assert entries(home) == []  # data_cache: false writes nothing
    cached = config(data, tmp_path, **keys)
    assert prepared(cached, tok) == reference  # a miss: built and stored
    assert len(entries(home)) == (2 if fmt == "alpaca" else 1)
    with monkeypatch.context() as patch:
        reader_fails(patch)
        assert prepared(cached, tok) == reference  # a hit
        assert prepared(cached, tokenizer()) == reference  # the same tokenizer, another object


def test_a_changed_file_tokenizer_or_key_misses(home, tmp_path, monkeypatch) -> None:
    path = tmp_path / "add.json"
    data = write_json(path, addition_rows(8))
    tok = tokenizer()
    prepared(config(data, tmp_path), tok)
    seen = len(entries(home))
    variants = [
        ({"cutoff_len": 32}, tok),
        ({"train_on_inputs": True}, tok),
        ({"val_set_size": 2}, tok),
        ({}, make_tokenizer()),  # no chat template: another tokenizer
    ]
    for keys, other in variants:
        cfg = config(data, tmp_path, **keys)
        reference = prepared(config(data, tmp_path, data_cache=False, **keys), other)
        assert prepared(cfg, other) == reference
        assert len(entries(home)) > seen, keys
        seen = len(entries(home))
    tok.chat_template = CHAT + "{# changed #}"  # the same tokenizer object, changed
    prepared(config(data, tmp_path), tok)
    assert len(entries(home)) == seen + 1
    seen += 1
    write_json(path, addition_rows(8, offset=3))  # the same path, other rows
    reference = prepared(config(data, tmp_path, data_cache=False), tok)
    assert prepared(config(data, tmp_path), tok) == reference
    assert len(entries(home)) == seen + 1


def test_a_damaged_entry_is_rebuilt_with_a_warning(home, tmp_path, caplog) -> None:
    data = write_json(tmp_path / "add.json", addition_rows(8))
    cfg, tok = config(data, tmp_path), tokenizer()
    reference = prepared(cfg, tok)
    [entry] = entries(home)
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the token data
    entry.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mlora"):
        assert prepared(cfg, tok) == reference
    assert [r.getMessage() for r in caplog.records] == [
        f"tokenized data cache {entry} is damaged or stale (its contents do not match their "
        "digest); rebuilding it"
    ]
    entry.write_bytes(b"not a safetensors file")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlora"):
        assert prepared(cfg, tok) == reference
    assert "is damaged or stale" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlora"):
        assert prepared(cfg, tok) == reference  # rebuilt: a clean hit now
    assert caplog.text == ""


def test_a_hit_repeats_the_warnings_tokenizing_gave(home, tmp_path, caplog) -> None:
    rows = [*addition_rows(4), {"instruction": "x" * 200, "input": "", "output": "y"}]
    cfg, tok = config(write_json(tmp_path / "add.json", rows), tmp_path), tokenizer()
    logs = []
    for _ in range(2):  # miss, hit
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlora"):
            prepared(cfg, tok)
        logs.append([(r.levelno, r.getMessage()) for r in caplog.records])
    assert logs[0] == logs[1] and "skipped 1 of 5 rows" in logs[0][0][1]


def test_least_recently_used_entries_go(home, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(token_cache, "MAX_ENTRIES", 2)
    data = write_json(tmp_path / "add.json", addition_rows(8))
    tok = tokenizer()
    for cutoff in (40, 50, 60):
        prepared(config(data, tmp_path, cutoff_len=cutoff), tok)
    assert len(entries(home)) == 2


def test_data_cache_must_be_a_boolean(tmp_path) -> None:
    with pytest.raises(ConfigError, match="key 'data_cache'"):
        config("x.json", tmp_path, data_cache="yes")


def test_an_unwritable_cache_is_a_warning(home, tmp_path, caplog) -> None:
    home.parent.mkdir(parents=True)
    home.write_text("a file where the folder should be")
    data = write_json(tmp_path / "add.json", addition_rows(8))
    cfg, tok = config(data, tmp_path), tokenizer()
    with caplog.at_level(logging.WARNING, logger="mlora"):
        rows = prepared(cfg, tok)
    assert rows == prepared(config(data, tmp_path, data_cache=False), tok)
    assert "tokenized data not cached: cannot write" in caplog.text
    assert json.loads(Path(data).read_text()) == addition_rows(8)


def test_errors_read_as_without_the_cache(home, tmp_path) -> None:
    from mlora.core.errors import DataError

    data = write_json(tmp_path / "add.json", addition_rows(8))
    errors = []
    for cache in (False, True):
        cfg = config(data, tmp_path, data_cache=cache, val_data=str(tmp_path / "missing.json"))
        with pytest.raises(DataError) as caught:
            prepare_validation(cfg, tokenizer(), 42)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "missing.json" in errors[0]
