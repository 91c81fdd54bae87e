"""Fixed costs of a small run: where the wall time of ``python mlora.py --config ...`` goes.

Builds a tiny random LLaMA and a config of 4 adapters x ``--steps`` steps x 8 rows (the small
job of issue 29), then runs the real command in a fresh process twice: once plain (its wall
time), once under ``cProfile``, whose cumulative times split the run into phases:

- imports: ``mlora.api`` and everything it pulls in (torch, transformers, datasets);
- preflight, data (read + tokenize), model load, trainer setup (adapters, packing probe);
- training loop (the steps, first-step warm-up included), plots at the end, the rest
  (saving, writer joins, exit).

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --steps 12 --keep /tmp/startup   # keep the files

Profiling slows Python-heavy phases more than tensor code, so the phase shares are a guide and
the plain wall time is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (phase, pattern of the profiled function whose cumulative time it is)
PHASES = (
    ("imports (mlora.api)", "mlora/api.py", "<module>"),
    ("preflight checks", "mlora/training/preflight.py", "preflight"),
    ("data: read + tokenize", "mlora/training/trainer.py", "prepare_data"),
    ("model load", "mlora/inference/loading.py", "load"),
    ("trainer setup", "mlora/training/trainer.py", "__init__"),
    ("  of it: packing probe", "mlora/model/multi_lora.py", "set_packing"),
    ("training loop", "mlora/training/trainer.py", "_loop"),
    ("plots at the end", "mlora/training/metrics/plots.py", "plot_run"),
)


def write_job(folder: Path, steps: int) -> list[str]:
    """The tiny model, data and config; returns the command's arguments after ``mlora.py``."""
    from tests.conftest import make_model, make_tokenizer
    from tests.helpers import addition_rows, write_json, write_template

    tokenizer = make_tokenizer()
    make_model(vocab_size=len(tokenizer)).save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    template, data = (
        write_template(folder),
        write_json(folder / "add.json", addition_rows(steps * 8)),
    )
    adapters = [
        {"name": f"a{i}", "data": data, "prompt": template, "r": 4, "batch_size": 8,
         "num_epochs": 1, "target_modules": ["q_proj", "v_proj"]}
        for i in range(4)
    ]  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"cutoff_len": 64, "lora": adapters}))
    return [
        "--base_model", str(folder / "tiny"), "--config", str(folder / "config.json"),
        "--dir", str(folder / "out"), "--overwrite",
    ]  # fmt: skip


def cumulative(stats: pstats.Stats, path: str, name: str) -> float:
    """Cumulative seconds of the profiled function ``name`` defined in a file ending ``path``."""
    total = 0.0
    for (filename, _, function), row in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.endswith(path):
            total += row[3]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per adapter")
    parser.add_argument("--keep", type=Path, help="write the job here and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="mlora-startup-"))
    folder.mkdir(parents=True, exist_ok=True)
    command = write_job(folder, args.steps)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    script = str(ROOT / "mlora.py")
    start = time.perf_counter()
    subprocess.run([sys.executable, script, *command], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    profile = folder / "run.prof"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), script, *command],
        env=env,
        check=True,
        capture_output=True,
    )
    profiled = time.perf_counter() - start
    stats = pstats.Stats(str(profile))
    total = cumulative(stats, "mlora/cli/train.py", "main")
    print(f"4 adapters x {args.steps} steps x 8 rows, tiny LLaMA; plain run {wall:.2f} s wall")
    print(f"profiled run {profiled:.2f} s wall, {total:.2f} s in mlora.cli.train.main")
    print(f"{'phase':<26} {'seconds':>8} {'share':>6}")
    accounted = 0.0
    for label, path, name in PHASES:
        seconds = cumulative(stats, path, name)
        if not label.startswith(" "):
            accounted += seconds
        print(f"{label:<26} {seconds:>8.2f} {seconds / total:>6.1%}")
    rest = total - accounted
    print(f"{'the rest (save, exit)':<26} {rest:>8.2f} {rest / total:>6.1%}")


if __name__ == "__main__":
    main()
