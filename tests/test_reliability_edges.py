"""The edges of "never lose work", each through the real ``mlora.py`` (issue 32's "Why"):

- JSON nested deeply enough to exhaust Python's recursion, in the config and in every other
  JSON file mlora reads (data, prompt template, adapter_config.json, run records, checkpoint
  state, a MeteoRA folder, the base model's config.json);
- a byte that is not UTF-8 in each data format mlora accepts (and in its other text files);
- ``--dir D`` where ``D/NAME`` (or D itself, or a folder above it) is a plain file, a symbolic
  link loop, a name too long: the OS errors at paths mlora writes;
- adapter names that are one folder on macOS or Windows (case, Unicode normalization).

Each must end with one line naming the file (no traceback, before the model loads) and leave
every earlier file byte for byte as it was. The cases run as forks of one interpreter.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlora.core.jsonfile import MAX_NESTING
from tests.bad_files import Scratch, failure_line, run_forked

DEEP = 100_000  # levels: far past Python's recursion limit (and pyarrow's reader crashed)


def deep(levels: int = DEEP) -> str:
    return "[" * levels + "]" * levels


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Scratch], list[str]]  # damages the scratch folder; returns extra CLI args
    expect: str  # part of the error line (relative paths: the command runs in the folder)
    warnings: tuple[str, ...] = ()  # warning lines allowed besides the error


def config_text(text: str | bytes) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        s.write_config(text)
        return []

    return make


def data_file(name: str, content: bytes) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        (s.folder / name).write_bytes(content)
        s.write_config(s.config(data=name))
        return []

    return make


def template_text(content: bytes) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        (s.folder / "template.json").write_bytes(content)
        return []

    return make


def adapter_config(content: bytes) -> Callable[[Scratch], list[str]]:
    """``--load_adapter`` of an adapter folder whose adapter_config.json is ``content``."""

    def make(s: Scratch) -> list[str]:
        folder = s.folder / "out" / "chat"
        shutil.copytree(s.folder / "lora", folder)
        (folder / "adapter_config.json").write_bytes(content)
        return ["--load_adapter"]

    return make


def meteora_config(content: bytes) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        (s.folder / "lora" / "adapter_config.json").write_bytes(content)
        s.write_config(s.meteora_config())
        return []

    return make


def run_record(name: str, content: bytes) -> Callable[[Scratch], list[str]]:
    """``--resume`` of a run whose only cut has ``name`` (its manifest, or its checkpoint's
    trainer_state.json) replaced by ``content``."""

    def make(s: Scratch) -> list[str]:
        from tests.reliability_support import fake_checkpoint, fake_cut, run_identity

        identity = run_identity(s.folder / "config.json", s.folder / "model", seed=1)
        out = s.folder / "out"
        checkpoint = fake_checkpoint(out, "chat", "checkpoint-1")
        cut = fake_cut(identity.records(out), identity, 1, {"chat": "checkpoint-1"})
        target = cut / "manifest.json" if name == "manifest" else checkpoint / name
        target.write_bytes(content)
        return ["--resume"]

    return make


def base_config(content: bytes) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        model = s.folder / "model"
        real = model.resolve()
        model.unlink()
        shutil.copytree(real, model)
        (model / "config.json").write_bytes(content)
        return []

    return make


def bad_parquet(s: Scratch) -> list[str]:
    """A parquet string column holding a byte that is not UTF-8 (pyarrow writes what it gets)."""
    text = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.array([0, 3], pa.int32()).buffers()[1], pa.py_buffer(b"a\xffb")]
    )
    table = pa.table({"instruction": text, "output": pa.array(["x"])})
    pq.write_table(table, s.folder / "bad.parquet")
    s.write_config(s.config(data="bad.parquet"))
    return []


def file_at(relative: str, out: str = "out") -> Callable[[Scratch], list[str]]:
    """A user's file at ``relative``; the run writes to ``--dir out``."""

    def make(s: Scratch) -> list[str]:
        (s.folder / relative).write_text("a user's notes, not a folder")
        return ["--dir", out]

    return make


def symlink_loop(s: Scratch) -> list[str]:
    (s.folder / "loop").symlink_to("loop")
    return ["--dir", "loop/out"]


def log_file_under_a_file(s: Scratch) -> list[str]:
    (s.folder / "notes.txt").write_text("a user's notes, not a folder")
    return ["--log_file", "notes.txt/run.log"]


def dangling_link(s: Scratch) -> list[str]:
    (s.folder / "gone").symlink_to("nowhere")
    return ["--dir", "gone"]


def names(*pair: str) -> Callable[[Scratch], list[str]]:
    def make(s: Scratch) -> list[str]:
        config = s.config(name=pair[0])
        config["lora"].append({**config["lora"][0], "name": pair[1]})
        s.write_config(json.dumps(config, ensure_ascii=False))
        return []

    return make


ROW = '{"instruction": "add", "input": "1 2", "output": "3"}'
NOT_UTF8 = b'[{"instruction": "caf\xe9", "input": "", "output": "3"}]'  # latin-1, not UTF-8
NESTED = f"nested deeper than {MAX_NESTING} levels"
UTF8 = "not UTF-8 text: line"
CASES = [
    # JSON nested past Python's recursion limit, in every JSON file mlora reads
    Case("deep-config", config_text('{"cutoff_len": 32, "lora": ' + deep() + "}"),
         f"config.json: JSON {NESTED} at line 1, column 127"),
    Case("deep-config-open", config_text("[" * DEEP), f"config.json: JSON {NESTED}"),
    Case("deep-data-json", data_file("d.json", f"[{ROW[:-1]}, \"x\": {deep()}}}]".encode()),
         f"d.json: JSON {NESTED}"),
    Case("deep-data-jsonl", data_file("d.jsonl", f"{ROW}\n{{\"x\": {deep()}}}\n".encode()),
         f"d.jsonl: JSON {NESTED} at line 2"),
    Case("deep-template", template_text(b'{"prompt_input": ' + deep().encode() + b"}"),
         f"template.json: JSON {NESTED}"),
    Case("deep-adapter-config", adapter_config(b'{"r": ' + deep().encode() + b"}"),
         f"out/chat/adapter_config.json: JSON {NESTED}"),
    Case("deep-meteora", meteora_config(b'{"r": 2, "x": ' + deep().encode() + b"}"),
         f"lora/adapter_config.json: JSON {NESTED}"),
    Case("deep-manifest", run_record("manifest", deep().encode()), "nothing to resume in out",
         warnings=(f"manifest.json: JSON {NESTED}",)),
    Case("deep-trainer-state", run_record("trainer_state.json", deep().encode()),
         "nothing to resume in out", warnings=(f"trainer_state.json: JSON {NESTED}",)),
    Case("deep-base-config", base_config(deep().encode()), f"model/config.json: JSON {NESTED}"),
    # a byte that is not UTF-8, in each data format and the other text files
    Case("latin1-json", data_file("d.json", NOT_UTF8),
         f"d.json: {UTF8} 1, column 22 (byte 21: 0xe9); save it as UTF-8"),
    Case("latin1-jsonl", data_file("d.jsonl", NOT_UTF8[1:-1] + b"\n"),
         f"d.jsonl: {UTF8} 1, column 21 (byte 20: 0xe9)"),
    Case("latin1-csv", data_file("d.csv", b"instruction,input,output\ncaf\xe9,,3\n"),
         f"d.csv: {UTF8} 2, column 4 (byte 28: 0xe9); save it as UTF-8"),
    Case("utf16-jsonl", data_file("d.jsonl", (ROW + "\n").encode("utf-16")),
         "d.jsonl: UTF-16 text, not UTF-8 (save it as UTF-8)"),
    Case("not-utf8-parquet", bad_parquet, "bad.parquet: a text column holds bytes that are not "
         "UTF-8"),
    Case("latin1-config", config_text(b'{"lora": [{"name": "caf\xe9", "data": "data.json"}]}'),
         f"config.json: {UTF8} 1, column 24"),
    Case("latin1-template", template_text(b'{"prompt_input": "\xe9"}'),
         f"template.json: {UTF8} 1, column 19"),
    Case("latin1-adapter-config", adapter_config(b'{"r": 2, "x": "\xe9"}'),
         f"out/chat/adapter_config.json: {UTF8} 1, column 16"),
    # the paths mlora writes: a file, a loop or a name too long in the way
    Case("dir-name-is-a-file", file_at("out/chat"),
         "out/chat is a file, not a folder: adapter 'chat' is saved there; move the file away "
         "or pass another --dir"),
    Case("dir-under-a-file", file_at("notes.txt", out="notes.txt/out"),
         "cannot write notes.txt/out: notes.txt is a file, not a folder"),
    Case("dir-symlink-loop", symlink_loop,
         "cannot write loop/out: Too many levels of symbolic links (symbolic links there point "
         "at each other: fix the link, or write elsewhere)"),
    Case("dir-dangling-link", dangling_link,
         "cannot write gone: gone is a symbolic link that leads to no folder"),
    Case("dir-name-too-long", lambda s: ["--dir", "x" * 300],
         "File name too long (the file system refuses a name or path that long"),
    Case("log-file-under-a-file", log_file_under_a_file,
         "--log_file: cannot write notes.txt/run.log: notes.txt is a file, not a folder"),
    # names that are one folder on macOS or Windows
    Case("case-folding", names("Chat", "chat"), "adapter names 'Chat' and 'chat' would be one "
         "folder on a case-insensitive or normalizing file system (macOS, Windows)"),
    Case("normalization", names("caf\u00e9", "cafe\u0301"),
         "adapter names 'caf\\xe9' and 'cafe\\u0301' would be one folder"),
]  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("edges")
    scratches, jobs, before = {}, [], {}
    for case in CASES:
        scratch = scratches[case.id] = Scratch.make(root / case.id, tiny_model_dir)
        extra = case.make(scratch)
        before[case.id] = scratch.snapshot()
        jobs.append(scratch.job(*extra))
    codes = run_forked(jobs)
    return {
        case.id: (code, (scratches[case.id].folder / "stderr").read_text(), scratches[case.id],
                  before[case.id])
        for case, code in zip(CASES, codes, strict=True)
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_an_edge_is_one_line_naming_the_file_and_loses_nothing(case: Case, outcomes) -> None:
    code, stderr, scratch, before = outcomes[case.id]
    line = failure_line(code, stderr, case.warnings)
    assert code == 2
    assert case.expect in line, line
    for warning in case.warnings:
        assert warning in stderr
    assert scratch.snapshot() == before


def test_a_file_where_an_adapter_folder_belongs_survives_overwrite(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--overwrite replaces adapter folders, never a user's file that sits where one belongs."""
    scratch = Scratch.make(tmp_path / "s", tiny_model_dir)
    (scratch.folder / "out" / "chat").write_text("a user's notes")
    (code,) = run_forked([scratch.job("--overwrite")])
    line = failure_line(code, (scratch.folder / "stderr").read_text())
    assert "out/chat is a file, not a folder" in line
    assert (scratch.folder / "out" / "chat").read_text() == "a user's notes"


def test_undamaged_the_meteora_and_load_adapter_folders_pass(tiny_model_dir: Path, tmp_path):
    """The cases' folders differ from a working setup only in the damage."""
    from mlora.config.schema import parse_config
    from mlora.training.preflight import check_adapter_folders, own_targets

    scratch = Scratch.make(tmp_path / "s", tiny_model_dir)
    raw = scratch.meteora_config()
    raw["lora"][0]["adapters"] = [str(scratch.folder / "lora")]
    assert own_targets(parse_config(raw, "c.json")) == {"chat": ["q_proj"]}
    shutil.copytree(scratch.folder / "lora", scratch.folder / "out" / "chat")
    check_adapter_folders(parse_config(scratch.config(), "c.json"), scratch.folder / "out")
