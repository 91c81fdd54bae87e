"""Property: every kind of file mlora reads, mutated (nesting, encodings, truncation, types,
huge values), makes the real ``mlora.py`` exit non-zero with one line on stderr, no traceback,
and every earlier file byte for byte unchanged.

The kinds: the config, data in each format (json, jsonl, csv, parquet), the prompt template,
an ``adapter_config.json`` (``--load_adapter``), a MeteoRA folder's embedded adapter config,
a run's manifest and a checkpoint's ``trainer_state.json`` (``--resume``). Hypothesis draws
``EXAMPLES`` mutations of each (derandomized: the same ones on every run) and writes each into
a scratch folder; then all of them run at once as forks of one interpreter that imported mlora
once (tests/forked_cli.py), which keeps some two thousand commands within CI time. Each
mutation is invalid by construction (the module says why next to each), and each kind's
unmutated folder is checked to be valid, so a failure is the property's, not the setup's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlora.config.schema import load_config, parse_config
from mlora.core.jsonfile import MAX_NESTING
from mlora.training.checkpoints import MANIFEST_FIELDS, cut_problem, find_resume_point
from tests.bad_files import Scratch, failure_line, run_forked
from tests.reliability_support import fake_checkpoint, fake_cut, run_identity

EXAMPLES = int(os.environ.get("MLORA_PROPERTY_EXAMPLES", "200"))  # per kind
# Rows whose every value is text (a CSV column of digits would be read as numbers).
ROWS = [{"instruction": f"spell {w}", "input": f"the word {w}", "output": " ".join(w)}
        for w in ("cat", "dog", "bird", "fish", "lion", "bear")]  # fmt: skip
INT_KEYS = ["r", "batch_size", "num_epochs", "warmup_steps", "evaluate_batch_size"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
# Byte sequences that are never UTF-8: lone continuation bytes, overlong and out-of-range
# leads, a lead cut short, an encoded surrogate.
NOT_UTF8 = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1", b"\xe2\x82", b"\xed\xa0\x80", b"\xf5",
            b"\xf8\x88\x80\x80\x80", b"\xfe", b"\xff"]  # fmt: skip


def _wrong_int(value: object) -> bool:
    return not (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _not_str(value: object) -> bool:
    return not isinstance(value, str)


@dataclass(frozen=True)
class Kind:
    """A kind of file: where it lives in a scratch folder, and which of its values have a
    type (the predicate says which values are wrong there)."""

    name: str
    path: str  # in the scratch folder
    setup: Callable[[Scratch], list[str]]  # makes the folder use the file; extra CLI args
    fields: dict[tuple, Callable[[object], bool]]  # JSON path -> "this value is wrong here"
    ops: tuple[str, ...] = ("nest", "encoding", "truncate", "types", "huge")


def _uses_data(fmt: str) -> Callable[[Scratch], list[str]]:
    def setup(s: Scratch) -> list[str]:
        from tests.bad_files import write_data

        write_data(s.folder / f"rows.{fmt}", ROWS)
        s.write_config(s.config(data=f"rows.{fmt}"))
        return []

    return setup


def _load_adapter(s: Scratch) -> list[str]:
    shutil.copytree(s.folder / "lora", s.folder / "out" / "chat")
    return ["--load_adapter"]


def _meteora(s: Scratch) -> list[str]:
    s.write_config(s.meteora_config())
    return []


def _resume(s: Scratch) -> list[str]:
    """A run of the config with one cut, naming a checkpoint folder of adapter chat."""
    identity = run_identity(s.folder / "config.json", s.folder / "model", seed=1)
    out = s.folder / "out"
    fake_checkpoint(out, "chat", "checkpoint-1")
    cut = fake_cut(identity.records(out), identity, 1, {"chat": "checkpoint-1"})
    (s.folder / "cut").symlink_to(cut.relative_to(s.folder), target_is_directory=True)
    return ["--resume"]


ROW_FIELDS = {(i, key): _not_str for i in range(len(ROWS)) for key in ("instruction", "output")}
KINDS = [
    Kind("config", "config.json", lambda s: [],
         {("lora", 0, key): _wrong_int for key in INT_KEYS}),
    Kind("data-json", "rows.json", _uses_data("json"), ROW_FIELDS),
    Kind("data-jsonl", "rows.jsonl", _uses_data("jsonl"), ROW_FIELDS),
    Kind("data-csv", "rows.csv", _uses_data("csv"), {}, ("encoding", "truncate", "types")),
    Kind("data-parquet", "rows.parquet", _uses_data("parquet"), {},
         ("encoding", "truncate", "types", "huge")),
    Kind("template", "template.json", lambda s: [],
         {(key,): _not_str for key in ("prompt_input", "prompt_no_input")}),
    Kind("adapter-config", "out/chat/adapter_config.json", _load_adapter,
         {("r",): lambda v: type(v) is not int}),
    Kind("meteora-folder", "lora/adapter_config.json", _meteora,
         {("r",): lambda v: type(v) is not int,
          ("target_modules",): lambda v: not (isinstance(v, list) and v
                                              and all(isinstance(t, str) for t in v))}),
    Kind("run-manifest", "cut/manifest.json", _resume,
         {(key,): (lambda v, t=t: not isinstance(v, t) or isinstance(v, bool))
          for key, t in MANIFEST_FIELDS.items()}),
    Kind("checkpoint-state", "out/chat/checkpoint-1/trainer_state.json", _resume,
         {("queue",): lambda v: not isinstance(v, dict)}),
]  # fmt: skip


# --- mutations: each gives bytes that the kind cannot accept ----------------------------------


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    """``doc`` with the value at ``path`` set (the last key may be new)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = list(doc) if isinstance(doc, list) else dict(doc)
    copy[head] = _replace(doc[head], rest, value) if rest else value
    return copy


PLACEHOLDER = "\u2063MUTATED\u2063"


def _with_raw(doc: Any, path: tuple, raw: str) -> bytes:
    """``doc`` as JSON with the value at ``path`` written as the raw JSON text ``raw``."""
    text = json.dumps(_replace(doc, path, PLACEHOLDER), indent=1)
    return text.replace(json.dumps(PLACEHOLDER), raw).encode()


@st.composite
def nesting(draw: st.DrawFn) -> str:
    """JSON nested past MAX_NESTING: always refused, whatever it replaces."""
    depth = draw(st.integers(MAX_NESTING + 1, 20 * MAX_NESTING))
    shape = draw(st.sampled_from(["list", "object", "mixed"]))
    if shape == "list":
        return "[" * depth + "]" * depth
    if shape == "object":
        return '{"a": ' * depth + "1" + "}" * depth
    return '[{"a": ' * (depth // 2 + 1) + "1" + "}]" * (depth // 2 + 1)


@st.composite
def huge_number(draw: st.DrawFn) -> str:
    """A number no typed field takes: more digits than Python converts, or past float range."""
    if draw(st.booleans()):
        return draw(st.sampled_from(["", "-"])) + "9" * draw(st.integers(4301, 20_000))
    sign = draw(st.sampled_from(["", "-"]))
    return f"{sign}1e{draw(st.integers(309, 10**6))}"


def _json_doc(kind: Kind, base: bytes) -> Any:
    if kind.name == "data-jsonl":
        return [json.loads(line) for line in base.decode().splitlines()]
    return json.loads(base)


def _dump(kind: Kind, doc: Any, path: tuple, raw: str) -> bytes:
    if kind.name != "data-jsonl":
        return _with_raw(doc, path, raw)
    lines = [json.dumps(row) for row in doc]  # one row per line: the mutated row's line
    lines[path[0]] = _with_raw(doc[path[0]], path[1:], raw).decode().replace("\n", " ")
    return ("\n".join(lines) + "\n").encode()


def _all_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        paths += _all_paths(value, (*prefix, key))
    return paths


def _truncate_points(kind: Kind, base: bytes) -> list[int]:
    """Cuts that always leave an invalid file."""
    if kind.name == "data-jsonl":  # inside a line (a cut between lines leaves valid rows)
        points, start = [], 0
        for line in base.split(b"\n"):
            points += range(start + 1, start + len(line))
            start += len(line) + 1
        return [0, *points]
    if kind.name == "data-csv":  # inside the header, or before the last comma of a row
        points, start = [], 0
        for number, line in enumerate(base.split(b"\n")):
            first = start if number == 0 else start + 1  # (a cut between rows leaves rows)
            points += range(first, start + (len(line) if number == 0 else line.rindex(b",")))
            start += len(line) + 1
            if start >= len(base):
                break
        return points
    return list(range(len(base.rstrip())))  # a JSON document or parquet cut short


def _parquet(columns: dict[str, pa.Array]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _parquet_text_column(index: int) -> pa.Array:
    """The output column with row ``index`` holding a byte that is not UTF-8."""
    values = [row["output"].encode() for row in ROWS]
    values[index] = values[index][:1] + b"\xff" + values[index][1:]
    offsets = [0]
    for value in values:
        offsets.append(offsets[-1] + len(value))
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.array(offsets, pa.int32()).buffers()[1],
                                   pa.py_buffer(b"".join(values))],
    )  # fmt: skip


@st.composite
def parquet_mutation(draw: st.DrawFn, op: str, base: bytes) -> tuple[str, bytes]:
    columns = {key: pa.array([row[key] for row in ROWS]) for key in ROWS[0]}
    column = draw(st.sampled_from(["instruction", "output"]))
    if op == "encoding":
        index = draw(st.integers(0, len(ROWS) - 1))
        columns["output"] = _parquet_text_column(index)
        return f"row {index}'s output not UTF-8", _parquet(columns)
    if op == "truncate":
        cut = draw(st.sampled_from(_truncate_points(KINDS_BY_NAME["data-parquet"], base)))
        return f"cut at byte {cut}", base[:cut]
    if op == "huge":  # floats past their range are inf: a number where text belongs
        values = [float("inf") if draw(st.booleans()) else -float("inf") for _ in ROWS]
        columns[column] = pa.array(values)
        return f"{column} = +-inf", _parquet(columns)
    values = draw(st.sampled_from([
        [1] * len(ROWS), [1.5] * len(ROWS), [True] * len(ROWS), [[1, 2]] * len(ROWS),
        [{"a": 1}] * len(ROWS), [None] * len(ROWS), [b"bytes"] * len(ROWS),
    ]))  # fmt: skip
    columns[column] = pa.array(values)
    return f"{column} = {values[0]!r}", _parquet(columns)


@st.composite
def mutation(draw: st.DrawFn, kind: Kind, base: bytes) -> tuple[str, bytes]:
    """(what was done, the mutated file)."""
    op = draw(st.sampled_from(kind.ops))
    if kind.name == "data-parquet":
        return draw(parquet_mutation(op, base))
    if op == "encoding":
        where = draw(st.integers(0, len(base)))
        junk = draw(st.sampled_from(NOT_UTF8))
        return f"{junk!r} at byte {where}", base[:where] + junk + base[where:]
    if op == "truncate":
        cut = draw(st.sampled_from(_truncate_points(kind, base)))
        return f"cut at byte {cut}", base[:cut]
    if kind.name == "data-csv":  # types: a row with more fields than the header
        lines = base.decode().splitlines()
        row = draw(st.integers(1, len(lines) - 1))
        extra = draw(st.lists(st.text("abc ", max_size=3), min_size=1, max_size=3))
        lines[row] += "," + ",".join(extra)
        return f"row {row} with {len(extra)} more fields", ("\n".join(lines) + "\n").encode()
    doc = _json_doc(kind, base)
    if op == "nest":
        path = draw(st.sampled_from(_all_paths(doc)[1:] if kind.name == "data-jsonl"
                                    else _all_paths(doc)))  # fmt: skip
        raw = draw(nesting())
        return f"{path} nested {raw.count('[') + raw.count('{')} levels", _dump(
            kind, doc, path, raw
        )
    path, wrong = draw(st.sampled_from(sorted(kind.fields.items(), key=repr)))
    if op == "huge":
        raw = draw(huge_number())
        return f"{path} = {raw[:12]}... ({len(raw)} characters)", _dump(kind, doc, path, raw)
    value = draw(JSON_VALUES.filter(wrong))
    return f"{path} = {value!r}", _dump(kind, doc, path, json.dumps(value))


KINDS_BY_NAME = {kind.name: kind for kind in KINDS}
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never flakes on a new one
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


@dataclass
class Example:
    kind: str
    what: str
    scratch: Scratch
    before: dict[str, bytes]


def _prepared(root: Path, model_dir: Path, kind: Kind, label: str) -> tuple[Scratch, list[str]]:
    scratch = Scratch.make(root / label, model_dir)
    return scratch, kind.setup(scratch)


def _collector(
    kind: Kind, base: bytes, root: Path, model_dir: Path, examples: list, jobs: list
) -> Callable[[], None]:
    """A Hypothesis test that writes each mutation of ``kind`` into a scratch folder and
    queues its command (the commands run together afterwards)."""

    @SETTINGS
    @given(change=mutation(kind, base))
    def collect(change: tuple[str, bytes]) -> None:
        what, data = change
        scratch, extra = _prepared(root, model_dir, kind, f"{kind.name}-{len(jobs)}")
        (scratch.folder / kind.path).write_bytes(data)
        examples.append(Example(kind.name, what, scratch, scratch.snapshot()))
        jobs.append(scratch.job(*extra))

    return collect


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every kind's mutated examples, run together: {kind: [(example, exit code, stderr)]}."""
    root = tmp_path_factory.mktemp("files-property")
    examples: list[Example] = []
    jobs: list[dict] = []
    for kind in KINDS:
        scratch, _ = _prepared(root, tiny_model_dir, kind, f"{kind.name}-base")
        base = (scratch.folder / kind.path).read_bytes()
        _collector(kind, base, root, tiny_model_dir, examples, jobs)()
    codes = run_forked(jobs)
    found: dict[str, list] = {kind.name: [] for kind in KINDS}
    for example, code in zip(examples, codes, strict=True):
        found[example.kind].append((example, code, (example.scratch.folder / "stderr").read_text()))
    return found


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_mutated_file_is_one_line_and_loses_nothing(kind: Kind, outcomes) -> None:
    results = outcomes[kind.name]
    assert len(results) >= EXAMPLES
    for example, code, stderr in results:
        context = f"{kind.name}: {example.what} ({example.scratch.folder})"
        try:
            failure_line(code, stderr, allowed_warnings=("skipping checkpoint",))
            assert code == 2
            assert example.scratch.snapshot() == example.before
        except AssertionError as exc:
            raise AssertionError(f"{context}\n{exc}") from None


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_each_kind_unmutated_passes_every_check(
    kind: Kind, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The property's folders are valid but for the mutation: the config, template, data rows
    and adapter folders pass their readers; the run's cut is intact and resumable."""
    from mlora.data.prompts import load_template
    from mlora.data.rows import load_rows, row_problem
    from mlora.training.preflight import check_adapter_folders, own_targets

    scratch, _ = _prepared(tmp_path, tiny_model_dir, kind, "base")
    monkeypatch.chdir(scratch.folder)  # the config names files relative to it, as the CLI runs
    config = load_config("config.json")
    load_template(config.lora[0].prompt)
    if kind.name.startswith("data-"):
        rows = load_rows(config.lora[0].data)
        assert rows == ROWS and all(row_problem(row) is None for row in rows)
    if kind.name == "adapter-config":
        check_adapter_folders(config, Path("out"))
    if kind.name == "meteora-folder":
        assert own_targets(config) == {"chat": ["q_proj"]}
    if kind.name.startswith(("run-", "checkpoint-")):
        identity = run_identity(Path("config.json"), scratch.folder / "model", seed=1)
        assert cut_problem(Path("out"), Path("cut").resolve()) is None
        assert find_resume_point(Path("out"), identity).global_step == 1
    parse_config(json.loads(Path("config.json").read_text()), "config.json")
