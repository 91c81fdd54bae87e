"""generate.py through its real entry point, compared with the library call it wraps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.cli.generate import main
from mlora.inference.generation import GenerationRequest, SamplingParams, generate
from mlora.inference.trained import load_trained
from tests.eval_support import ADAPTERS, trained  # noqa: F401  (session fixture)
from tests.helpers import read_terminal

ROOT = Path(__file__).resolve().parents[1]


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def loaded(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    return load_trained(str(tiny_model_dir), {n: out / n for n in ADAPTERS})


def test_prompts_file_mixed_adapters_equal_library(trained, tiny_model_dir, loaded, tmp_path):  # noqa: F811
    out, _ = trained
    rows = [
        {"prompt": "rev owl=", "adapter": "rev"},
        {"prompt": "add 3 4=", "adapter": "add"},
        {"prompt": "up bee=", "adapter": None},
        {"prompt": "dup cat=", "adapter": "dup"},
        {"prompt": "rev lion="},  # no adapter: answered by each --use
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run_generate(
        "--base_model", tiny_model_dir, "--dir", out, "--prompts_file", prompts,
        "--use", "up", "--use", "base", "--max_new_tokens", 10, "--repetition_penalty", 1.2,
        "--stop", "P)", "--output", "-", "--batch_size", 3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    requests = [GenerationRequest(r["prompt"], r["adapter"]) for r in rows[:4]]
    requests += [GenerationRequest("rev lion=", "up"), GenerationRequest("rev lion=", None)]
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.2, stop=("P)",))
    expected = generate(*loaded, requests, params)
    assert [(g["prompt"], g["adapter"]) for g in got] == [(r.prompt, r.adapter) for r in requests]
    assert [g["text"] for g in got] == [e.text for e in expected]
    assert [g["finish_reason"] for g in got] == [e.finish_reason for e in expected]


def test_stream_sampled_with_seed_equals_library(trained, tiny_model_dir, loaded):  # noqa: F811
    out, raw = trained
    config = Path(raw["lora"][0]["data"]).parent / "config.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    result = run_generate(
        "--base_model", tiny_model_dir, "--dir", out, "--config", config, "--template", "auto",
        "--use", "rev", "--use", "add", "owl", "3 4", "--stream", "--max_new_tokens", 9,
        "--temperature", 0.9, "--top_p", 0.95, "--top_k", 30, "--seed", 7,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # the config's template renders "owl" as "owl=" (see eval_support.TEMPLATE)
    requests = [GenerationRequest(p + "=", a) for p in ("owl", "3 4") for a in ("rev", "add")]
    params = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.95, top_k=30, seed=7)
    expected = generate(*loaded, requests, params)
    shown = "".join(f"=== [{e.request.adapter}] {e.request.prompt!r}\n{e.text}\n" for e in expected)
    assert result.stdout == shown
    assert result.stderr == ""


def test_unknown_adapter_is_one_line_error(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    result = run_generate("--base_model", tiny_model_dir, "--dir", out, "--use", "nope", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --use: unknown adapter 'nope' (available: add, dup, rev, up, base)"
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "adapter 'a': directory not found"),
        ("empty_file", "prompts file is empty"),
        ("unknown_in_file", "zzz.jsonl:1: unknown adapter 'zzz'"),
        ("no_prompts", "no prompts"),
        ("bad_adapter_arg", "expected NAME=DIR"),
        (
            "dotted_adapter_name",
            "NAME must be usable as a folder name and a module key: without '.'",
        ),
        ("output_under_a_file", "cannot write"),
        ("output_is_a_folder", "it is a directory"),
        ("damaged_adapter", "adapter_model.safetensors: truncated or not a safetensors file"),
        ("prompts_folder", "is a directory, not a prompts file"),
    ],
)
def test_bad_input_fails_before_loading(tmp_path, capsys, case, message):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "zzz.jsonl").write_text('{"prompt": "x", "adapter": "zzz"}\n', encoding="utf-8")
    model = str(tmp_path / "no-model")  # never loaded: every check comes first
    argv = {
        "missing_dir": ["--adapter", f"a={tmp_path / 'gone'}", "x"],
        "empty_file": ["--prompts_file", str(tmp_path / "empty.jsonl")],
        "unknown_in_file": ["--prompts_file", str(tmp_path / "zzz.jsonl")],
        "no_prompts": [],
        "bad_adapter_arg": ["--adapter", "just-a-name", "x"],
        "dotted_adapter_name": ["--adapter", f"math-v1.5={tmp_path}", "x"],
        "output_under_a_file": ["--output", str(tmp_path / "empty.jsonl" / "out.jsonl"), "x"],
        "output_is_a_folder": ["--output", str(tmp_path), "x"],
        "damaged_adapter": ["--adapter", f"a={tmp_path / 'damaged'}", "x"],
        "prompts_folder": ["--prompts_file", str(tmp_path)],
    }[case]
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "adapter_config.json").write_text('{"r": 2}', encoding="utf-8")
    (tmp_path / "damaged" / "adapter_model.safetensors").write_bytes(b"cut short")
    assert main(["--base_model", model, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_load_flags_reach_the_base_model(trained, tiny_model_dir, loaded, capsys):  # noqa: F811
    """``--attn_impl eager`` answers like the library's default load; ``--load_4bit`` without
    CUDA is one line."""
    out, _ = trained
    argv = ["--base_model", str(tiny_model_dir), "--dir", str(out), "--use", "rev", "owl"]
    assert main([*argv, "--attn_impl", "eager", "--max_new_tokens", "8", "--output", "-"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = generate(
        *loaded, [GenerationRequest("owl", "rev")], SamplingParams(max_new_tokens=8)
    )
    assert [g["text"] for g in got] == [e.text for e in expected]
    assert main([*argv, "--load_4bit", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "4" in err[0]


def test_console_script_points_at_main() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["mlora-generate"].partition(":")
    assert getattr(__import__(module, fromlist=[func]), func) is main


def test_output_into_a_missing_folder_creates_it(trained, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    """``--output`` under folders that do not exist yet: created up front, the JSONL lands there
    (it used to fail after every answer was generated)."""
    out, _ = trained
    argv = ["--base_model", str(tiny_model_dir), "--dir", str(out), "--use", "rev", "owl"]
    assert main([*argv, "--max_new_tokens", "6", "--output", "-"]) == 0
    expected = capsys.readouterr().out
    target = tmp_path / "new" / "deeper" / "answers.jsonl"
    assert main([*argv, "--max_new_tokens", "6", "--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == expected


def test_a_terminal_is_told_what_generate_is_doing(trained, tiny_model_dir):  # noqa: F811
    """Loading takes a while and answers come after it: at a terminal, stderr says so (the
    streamed test above shows that a pipe gets nothing of it)."""
    import pty

    out, _ = trained
    terminal, stderr = pty.openpty()
    done = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--base_model", str(tiny_model_dir),
         "--dir", str(out), "--use", "rev", "owl", "--max_new_tokens", "2"],
        stdout=subprocess.PIPE, stderr=stderr, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    os.close(stderr)
    shown = read_terminal(terminal)
    os.close(terminal)
    assert done.returncode == 0, shown
    lines = shown.decode().splitlines()
    assert lines == [
        f"loading {tiny_model_dir} with {len(ADAPTERS)} adapter(s) (--verbose shows how)",
        "answering 1 prompt(s)",
    ], lines
