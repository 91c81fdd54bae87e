"""``mlora.py --evaluate`` and ``launch.py evaluate`` through their real entry points: the
result file and table, the built-in choice task schemas, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.cli import launch
from mlora.cli import train as cli
from mlora.core.errors import DataError
from mlora.data.tasks import CHOICE_TASKS, ChoiceQuestion, load_choice_questions
from tests.eval_support import ADAPTERS, trained  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

# One row of each built-in task in its hub schema, and the question it must become.
SCHEMA_CASES = {
    "arc-e": (
        {"id": "1", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
         "answerKey": "B"},
        ChoiceQuestion("Q?", ("a", "b"), 1),
    ),
    "arc-c": (
        {"id": "2", "question": "Q2",
         "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"},
        ChoiceQuestion("Q2", ("x", "y", "z"), 2),
    ),
    "boolq": (
        {"question": "is it", "passage": "P.", "answer": False},
        ChoiceQuestion("P.\nQuestion: is it?", ("no", "yes"), 0),
    ),
    "obqa": (
        {"id": "3", "question_stem": "Stem", "choices": {"text": ["a", "b", "c", "d"],
         "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        ChoiceQuestion("Stem", ("a", "b", "c", "d"), 2),
    ),
    "piqa": (
        {"goal": "G", "sol1": "s1", "sol2": "s2", "label": 1},
        ChoiceQuestion("G", ("s1", "s2"), 1),
    ),
    "siqa": (
        {"context": "C.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c",
         "label": "1"},
        ChoiceQuestion("C. Why?", ("a", "b", "c"), 0),
    ),
    "hellaswag": (
        {"ind": 4, "activity_label": "Act", "ctx_a": "A", "ctx_b": "b", "ctx": "A b",
         "endings": ["e0", "e1", "e2", "e3"], "source_id": "s", "split": "val",
         "split_type": "indomain", "label": "3"},
        ChoiceQuestion("Act: A b", ("e0", "e1", "e2", "e3"), 3),
    ),
    "winogrande": (
        {"sentence": "The _ flew.", "option1": "owl", "option2": "yak", "answer": "1"},
        ChoiceQuestion("The _ flew.", ("owl", "yak"), 0),
    ),
}  # fmt: skip


def test_every_task_has_a_schema_case():
    assert set(SCHEMA_CASES) == set(CHOICE_TASKS)


@pytest.mark.parametrize("task", sorted(SCHEMA_CASES))
def test_local_file_in_hub_schema(task: str, tmp_path: Path):
    row, expected = SCHEMA_CASES[task]
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    assert load_choice_questions(task, str(path), "a") == [expected, expected]
    broken = {k: v for k, v in row.items() if k != CHOICE_TASKS[task].fields[0]}
    path.write_text(json.dumps([broken]), encoding="utf-8")
    with pytest.raises(DataError, match=f"row 0 is missing the field .*task {task}"):
        load_choice_questions(task, str(path), "a")


def write_config(path: Path, raw: dict, **changes) -> Path:
    raw = json.loads(json.dumps(raw))
    for name, values in changes.items():
        adapter = next(a for a in raw["lora"] if a["name"] == name)
        for key, value in values.items():
            if value is None:
                adapter.pop(key, None)
            else:
                adapter[key] = value
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_cli_evaluate_writes_results_and_table(trained, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    out, raw = trained
    arc = tmp_path / "arc.json"
    arc.write_text(json.dumps([SCHEMA_CASES["arc-e"][0]] * 3), encoding="utf-8")
    result = tmp_path / "sub" / "result.json"
    raw = {**raw, "evaluate_result": str(result)}
    config = write_config(
        tmp_path / "c.json", raw, up={"task_name": "arc-e", "test_data": str(arc)}
    )
    code = cli.main(
        ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out),
         "--evaluate", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    data = json.loads(result.read_text())
    assert list(data) == list(ADAPTERS)
    for name in ADAPTERS:
        entry = data[name]
        assert entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
        if name == "up":  # arc-e: the right choice of each of the 3 copies is "b"
            score, answers = "accuracy", ["b"] * 3
        else:  # the rows' outputs, compared after strip()
            rows = json.loads((out.parent / f"{name}.json").read_text())
            score, answers = "exact_match", [row["output"] for row in rows]
        assert len(entry["predictions"]) == entry["rows"] == len(answers)
        hits = [p.strip() == a.strip() for p, a in zip(entry["predictions"], answers, strict=True)]
        assert entry[score] == pytest.approx(sum(hits) / len(hits))  # the score of what it wrote
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["adapter", "task", "rows", "loss", "perplexity", "exact_match",
                                "accuracy"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == list(ADAPTERS)


def test_launch_evaluate_selected_adapters(trained, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    out, raw = trained
    config = write_config(tmp_path / "c.json", raw)
    code = launch.main(
        ["evaluate", "--base_model", str(tiny_model_dir), "--config", str(config),
         "--dir", str(out), "--adapters", "rev,dup", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    data = json.loads((out / "evaluate_result.json").read_text())
    assert list(data) == ["rev", "dup"]
    assert "rev" in capsys.readouterr().out


BAD_INPUT = {
    "unknown adapter": ({}, ["--adapters", "add,nope"], "unknown adapter 'nope'"),
    "named adapter without test_data": (
        {"rev": {"test_data": None}},
        ["--adapters", "rev"],
        "adapter 'rev' has no test_data",
    ),
    "no test_data at all": (
        {n: {"test_data": None} for n in ADAPTERS},
        [],
        "no adapter has test_data",
    ),
    "missing test file": (
        {"add": {"test_data": "MISSING.json"}},
        [],
        "test_data file not found: .*MISSING.json",
    ),
    "empty test file": ({"add": {"test_data": "EMPTY"}}, [], "test_data .*empty.json is empty"),
    "missing trained adapter": (
        {},
        ["--dir", "NOWHERE"],
        "adapter 'add': no trained adapter at .*NOWHERE",
    ),
    "unknown task_name": (
        {"up": {"task_name": "arc-x"}},
        [],
        "adapter 'up': key 'task_name' must be one of",
    ),
    "choice file of the wrong schema": (
        {"up": {"task_name": "piqa"}},
        [],
        "up.json: row 0 is missing the field 'goal'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line(case, trained, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    out, raw = trained
    changes, extra, message = BAD_INPUT[case]
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n", encoding="utf-8")
    for values in changes.values():
        if values.get("test_data") == "EMPTY":
            values["test_data"] = str(empty)
    config = write_config(tmp_path / "c.json", raw, **changes)
    folder = tmp_path / "NOWHERE" if extra[:1] == ["--dir"] else out
    argv = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(folder)]
    argv += ["--evaluate", "--device", "cpu", *(extra if extra[:1] != ["--dir"] else [])]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_unwritable_result_is_found_before_evaluating(trained, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """evaluate_result naming a folder: one line before the model loads, not after the work."""
    out, raw = trained
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**raw, "evaluate_result": str(tmp_path)}), encoding="utf-8")
    argv = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out)]
    assert cli.main([*argv, "--evaluate", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {tmp_path}: it is a directory"]


def test_hub_task_offline_is_one_line(trained, tiny_model_dir, tmp_path):  # noqa: F811
    out, raw = trained
    config = write_config(
        tmp_path / "c.json", raw, up={"task_name": "arc-c", "data": "allenai/ai2_arc",
                                      "test_data": None},
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "mlora.py"), "--base_model", str(tiny_model_dir),
         "--config", str(config), "--dir", str(out), "--evaluate", "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "task 'arc-c' needs a local data file" in errors[0]
    assert "allenai/ai2_arc (ARC-Challenge)" in errors[0]


def test_choice_task_trains_on_question_then_right_choice(tmp_path):
    from mlora.config.schema import parse_config
    from mlora.data.prompts import load_template
    from mlora.data.rows import tokenize_rows
    from mlora.training.trainer import prepare_data
    from tests.conftest import make_tokenizer

    row, question = SCHEMA_CASES["siqa"]
    path = tmp_path / "siqa.json"
    path.write_text(json.dumps([row, {**row, "label": "3"}]), encoding="utf-8")
    config = parse_config({"lora": [{"name": "s", "data": str(path), "task_name": "siqa"}]})
    tokenizer = make_tokenizer()
    expected = [
        {"instruction": question.question, "input": "", "output": answer} for answer in ("a", "c")
    ]
    want = tokenize_rows(expected, tokenizer, load_template("alpaca"), config.cutoff_len)
    assert prepare_data(config, tokenizer)["s"] == want


def test_evaluate_takes_the_attention_and_quantization_flags(
    trained,  # noqa: F811
    tiny_model_dir,
    tmp_path,
    capsys,
):
    """``--attn_impl eager`` evaluates like the default sdpa; ``--load_4bit`` without CUDA is a
    one-line error (the flags reach evaluation as they reach training)."""
    out, raw = trained
    results = {}
    for attn in ("sdpa", "eager"):
        target = tmp_path / f"{attn}.json"
        config = write_config(
            tmp_path / f"{attn}-config.json", {**raw, "evaluate_result": str(target)}
        )
        argv = ["--base_model", str(tiny_model_dir), "--config", str(config), "--dir", str(out)]
        assert cli.main([*argv, "--evaluate", "--device", "cpu", "--attn_impl", attn]) == 0
        results[attn] = json.loads(target.read_text())
    for name in ADAPTERS:
        assert results["eager"][name]["loss"] == pytest.approx(
            results["sdpa"][name]["loss"], rel=1e-5
        )
        assert results["eager"][name]["predictions"] == results["sdpa"][name]["predictions"]
    capsys.readouterr()
    assert cli.main([*argv, "--evaluate", "--device", "cpu", "--load_4bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "4" in err[0]
