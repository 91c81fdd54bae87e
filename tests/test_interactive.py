"""``mlora.py --inference``: stdin piped into the real entry point, answers vs the library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlora.inference.generation import SamplingParams, generate
from mlora.inference.trained import load_trained
from tests.eval_support import ADAPTERS, trained  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_loop_answers_like_generate(trained, tiny_model_dir, tmp_path):  # noqa: F811
    trained_dir, raw = trained
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    loaded = [n for n in ADAPTERS if n != "up"]  # "up" not trained yet: skipped, not fatal
    out = tmp_path / "out"
    for name in loaded:
        shutil.copytree(trained_dir / name, out / name)
    session = "\n".join(
        [
            "/set max_new_tokens 10",
            "/list",
            "rev owl",  # the first adapter (add), rendered with its template: "rev owl="
            "/adapter rev",
            "rev owl",
            "/adapter up",  # not loaded
            "/base",
            "rev owl=",
            "/raw",
            "/adapter dup",
            "dup cat=",
            "/quit",
            "never answered",
        ]
    )
    entry = [sys.executable, ROOT / "mlora.py", "--inference", "--base_model", tiny_model_dir]
    result = subprocess.run(
        [*entry, "--config", config, "--dir", out],
        input=session + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "adapter up: not trained yet" in result.stderr
    model, tokenizer = load_trained(str(tiny_model_dir), {n: out / n for n in loaded})
    requests = [("rev owl=", "add"), ("rev owl=", "rev"), ("rev owl=", None), ("dup cat=", "dup")]
    answers = [o.text for o in generate(model, tokenizer, requests, SamplingParams(10))]
    expected = (
        f"adapters: {', '.join(loaded)}; /help for commands\n"
        "[add]> max_new_tokens = 10\n"
        "[add]> "
        + "".join(f"{'*' if n == 'add' else ' '} {n}\n" for n in loaded)
        + f"[add]> {answers[0]}\n"
        "[add]> "
        f"[rev]> {answers[1]}\n"
        f"[rev]> error: unknown adapter 'up' (available: {', '.join(loaded)})\n"
        "[rev]> "
        f"[base]> {answers[2]}\n"
        "[base]> prompt template off\n"
        "[base]> "
        f"[dup]> {answers[3]}\n"
        "[dup]> "
    )
    assert result.stdout == expected


def test_nothing_trained_is_one_line_error(trained, tmp_path, capsys):  # noqa: F811
    from mlora.cli.train import main

    _, raw = trained
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    argv = ["--base_model", str(tmp_path / "never-loaded"), "--config", str(config)]
    assert main([*argv, "--dir", str(tmp_path / "empty"), "--inference"]) == 2
    assert capsys.readouterr().err == (
        f"error: no trained adapter of {config} found in {tmp_path / 'empty'}\n"
    )
