"""Property: whatever is wrong with the input, ``mlora.py`` ends with exactly one line on stderr,
a non-zero exit code, no traceback, and every file saved before is byte-for-byte unchanged.

Hypothesis generates bad configs (wrong JSON, unknown keys, values of the wrong type or out of
range, unusable adapter names), bad data rows, bad prompt templates, and damaged files (adapter
weights for ``--load_adapter``, base weights). Each example calls the real command line
(``mlora.cli.train.main``) in this process with stderr captured, so a few hundred examples fit the
CI budget; the subprocess tests in test_reliability_input.py show the same messages reach a user.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from mlora.cli.train import main
from mlora.config.adapter_names import adapter_name_problem
from mlora.config.schema import AdapterConfig, TrainConfig
from tests.helpers import SHORT_TEMPLATE, addition_rows

SETTINGS = settings(
    max_examples=50,  # x 4 properties: 200 examples
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never flakes on a new one
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ROWS = addition_rows(6)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
INT_KEYS = ["r", "batch_size", "num_epochs", "warmup_steps", "evaluate_batch_size"]
KNOWN_KEYS = {f.name for f in AdapterConfig.__dataclass_fields__.values()} | {
    f.name for f in TrainConfig.__dataclass_fields__.values()
}


class Scratch:
    """A folder with a base model, valid inputs and earlier work (``out/``) to protect."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model = root, model_dir
        self.out = root / "out"
        self.counter = itertools.count()
        adapter = self.out / "earlier"  # a finished adapter of another config: must survive
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        (adapter / "adapter_model.safetensors").write_bytes(save({"w": torch.ones(2, 2)}))
        self.saved = self.snapshot()

    def snapshot(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.out)): p.read_bytes()
            for p in self.out.rglob("*")
            if p.is_file() and p.name != ".mlora-lock"
        }

    def example(self) -> Path:
        folder = self.root / f"example-{next(self.counter)}"
        folder.mkdir()
        (folder / "data.json").write_text(json.dumps(ROWS))
        (folder / "template.json").write_text(json.dumps(SHORT_TEMPLATE))
        return folder

    def config(self, folder: Path, **adapter: object) -> dict:
        lora = {"name": "chat", "data": str(folder / "data.json"), "batch_size": 2,
                "prompt": str(folder / "template.json"), "r": 2, **adapter}  # fmt: skip
        return {"cutoff_len": 32, "lora": [lora]}

    def run(self, folder: Path, config: dict | str, *extra: str, base: Path | None = None) -> None:
        """Run mlora.py on ``config``; assert the property."""
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text, encoding="utf-8")
        argv = ["--base_model", str(base or self.model), "--config", str(folder / "config.json"),
                "--dir", str(self.out), "--device", "cpu", *extra]  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        lines = err.getvalue().splitlines()
        assert code != 0, err.getvalue()
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
        assert "Traceback" not in err.getvalue()
        assert self.snapshot() == self.saved


@pytest.fixture(scope="module")
def scratch(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("property"), tiny_model_dir)


def _wrong_int(value: object) -> bool:
    return not (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


BAD_NAMES = st.one_of(
    st.tuples(st.text(max_size=5), st.sampled_from('<>:"/\\|?*.\t\n'), st.text(max_size=5)).map(
        "".join
    ),
    st.sampled_from(["CON", "nul", "Com1", "LPT9", "forward", "training", " chat", "chat "]),
    st.text(min_size=65, max_size=80),
    JSON_VALUES.filter(lambda v: not isinstance(v, str)),
).filter(lambda name: adapter_name_problem(name) is not None)


@st.composite
def bad_configs(draw: st.DrawFn) -> tuple[str, object]:
    """(kind, value): how the otherwise valid config is broken."""
    kind = draw(st.sampled_from(["truncated", "top", "unknown", "int", "name", "adapters"]))
    if kind == "truncated":
        return kind, draw(st.integers(min_value=0, max_value=1000))
    if kind == "top":
        return kind, draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    if kind == "unknown":
        return kind, draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_KEYS))
    if kind == "int":
        return kind, (draw(st.sampled_from(INT_KEYS)), draw(JSON_VALUES.filter(_wrong_int)))
    if kind == "name":
        return kind, draw(BAD_NAMES)
    return kind, draw(JSON_VALUES.filter(lambda v: not (isinstance(v, list) and v)))


@SETTINGS
@given(broken=bad_configs())
def test_a_bad_config_is_one_line_and_loses_nothing(scratch: Scratch, broken) -> None:
    kind, value = broken
    folder = scratch.example()
    config = scratch.config(folder)
    if kind == "truncated":
        text = json.dumps(config, indent=1)
        scratch.run(folder, text[: value % len(text)])
        return
    if kind == "top":
        config = value
    elif kind == "unknown":
        config["lora"][0][value] = 1
    elif kind == "int":
        config["lora"][0][value[0]] = value[1]
    elif kind == "name":
        config["lora"][0]["name"] = value
    else:
        config["lora"] = value
    scratch.run(folder, config)


@st.composite
def bad_rows(draw: st.DrawFn) -> list:
    """The valid rows with one broken row inserted somewhere."""
    row = dict(draw(st.sampled_from(ROWS)))
    key = draw(st.sampled_from(["instruction", "output", "input"]))
    how = draw(st.sampled_from(["missing", "type"] if key != "input" else ["type"]))
    if how == "missing":
        del row[key]
    else:
        row[key] = draw(JSON_VALUES.filter(lambda v: v is not None and not isinstance(v, str)))
    rows = list(ROWS)
    rows.insert(draw(st.integers(0, len(rows))), row)
    return draw(st.sampled_from([rows, row, rows[:0]]))  # a bad row, a lone object, none


@SETTINGS
@given(rows=bad_rows(), as_jsonl=st.booleans())
def test_bad_data_rows_are_one_line_and_lose_nothing(scratch: Scratch, rows, as_jsonl) -> None:
    folder = scratch.example()
    path = folder / ("data.jsonl" if as_jsonl else "data.json")
    if as_jsonl and isinstance(rows, list):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    scratch.run(folder, scratch.config(folder, data=str(path)))


PLACEHOLDER = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def bad_templates(draw: st.DrawFn) -> object:
    template = dict(SHORT_TEMPLATE)
    key = draw(st.sampled_from(["prompt_input", "prompt_no_input"]))
    kind = draw(st.sampled_from(["placeholder", "brace", "type", "missing", "shape"]))
    if kind == "placeholder":
        known = {"instruction", "input"} if key == "prompt_input" else {"instruction"}
        name = draw(PLACEHOLDER.filter(lambda n: n not in known))
        template[key] += "{" + name + "}"
    elif kind == "brace":
        template[key] += draw(st.sampled_from(["{", "}", "{instruction", "{0", "{}"]))
    elif kind == "type":
        template[key] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
    elif kind == "missing":
        del template[key]
    else:
        return draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    return template


@SETTINGS
@given(template=bad_templates())
def test_bad_templates_are_one_line_and_lose_nothing(scratch: Scratch, template) -> None:
    folder = scratch.example()
    (folder / "template.json").write_text(json.dumps(template))
    scratch.run(folder, scratch.config(folder))


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, int, bytes]:
    """(how, where, what): cut the file at ``where``, or overwrite its start with ``what``."""
    how = draw(st.sampled_from(["cut", "prefix"]))
    return how, draw(st.integers(min_value=0, max_value=10**6)), draw(st.binary(min_size=1))


def _damaged(data: bytes, how: str, where: int, junk: bytes) -> bytes:
    if how == "cut":
        return data[: where % len(data)]
    return junk + data[len(junk) :] if junk != data[: len(junk)] else b"\0" + data


@SETTINGS
@given(hurt=damage(), target=st.sampled_from(["adapter", "adapter_config", "base"]))
def test_damaged_files_are_one_line_and_lose_nothing(scratch: Scratch, hurt, target) -> None:
    folder = scratch.example()
    config = scratch.config(folder, name=f"load{folder.name.split('-')[1]}")
    if target == "base":
        base = folder / "model"
        shutil.copytree(scratch.model, base)
        weights = base / "model.safetensors"
        weights.write_bytes(_damaged(weights.read_bytes(), *hurt))
        scratch.run(folder, config, base=base)
        return
    adapter = scratch.out / config["lora"][0]["name"]  # earlier work, damaged by the disk
    adapter.mkdir()
    config_json = json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    weights = save({"base_model.model.x.lora_A.weight": torch.ones(2, 64)})
    if target == "adapter":
        weights = _damaged(weights, *hurt)
    else:
        config_json = _damaged(config_json.encode(), *hurt).decode("utf-8", "replace")
    (adapter / "adapter_config.json").write_text(config_json)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    scratch.saved = scratch.snapshot()
    scratch.run(folder, config, "--load_adapter")
