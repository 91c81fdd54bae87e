"""Evaluating 4 adapters together vs 4 separate evaluations (loss + greedy exact match).

Setup (not timed): a small random LLaMA (built here, no download) and 4 adapters trained for a
few steps with ``mlora.train`` on 4 synthetic tasks, each with its own test file.

Measured, all in one run:

1. whole process: one ``mlora.py --evaluate`` process evaluating the 4 adapters together vs
   4 ``mlora.py --evaluate --adapters NAME`` processes run one after another (what a user does
   without multi-adapter batching; each pays Python, model loading and its own batches);
2. same process, model already loaded: ``evaluate_model`` over the 4 adapters together (their
   rows side by side in each batch) vs 4 ``evaluate_model`` calls with one adapter each.

Prints wall and CPU time of each, and the ratios.

    python benchmarks/bench_evaluate.py [--hidden 256 --layers 4 --vocab 32000 --rows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.toy_tasks import TASKS, build_model  # noqa: E402


def build_config(folder: Path, rows: int, batch_size: int) -> Path:
    adapters = []
    for name, make_row in TASKS.items():
        train, test = folder / f"{name}.json", folder / f"{name}-test.json"
        train.write_text(json.dumps([make_row(i) for i in range(rows)]))
        test.write_text(json.dumps([make_row(i) for i in range(rows, 2 * rows)]))
        adapters.append({
            "name": name, "data": str(train), "test_data": str(test), "r": 8, "lora_alpha": 16,
            "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "batch_size": 8, "num_epochs": 1, "lr": 1e-3, "evaluate_batch_size": batch_size,
        })  # fmt: skip
    path = folder / "bench.json"
    path.write_text(json.dumps({"cutoff_len": 256, "log_step": 1000, "lora": adapters}))
    return path


def timed(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process (CPU: user + system, less sensitive than wall time
    to other jobs on a busy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def in_process(
    model_dir: Path, config_path: Path, out: Path
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(together, separately) (wall, CPU) seconds of ``evaluate_model`` on one loaded model."""
    from mlora.config.schema import load_config
    from mlora.inference.evaluation import evaluate_model, prepare_test_sets
    from mlora.inference.trained import load_trained

    config = load_config(config_path)
    names = list(TASKS)
    model, tokenizer = load_trained(str(model_dir), {n: out / n for n in names})
    sets = prepare_test_sets(config, tokenizer)
    evaluate_model(model, tokenizer, sets[:1])  # warm-up (first generate call, allocator)
    start = clock()
    together = evaluate_model(model, tokenizer, sets)
    together_s = since(start)
    start = clock()
    alone = {ts.adapter: evaluate_model(model, tokenizer, [ts])[ts.adapter] for ts in sets}
    alone_s = since(start)
    for name in names:  # the same answers either way
        assert together[name].predictions == alone[name].predictions, name
    return together_s, alone_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=32, help="test rows per adapter")
    parser.add_argument("--batch", type=int, default=8, help="evaluate_batch_size per adapter")
    args = parser.parse_args()
    from mlora.api import train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, out = folder / "model", folder / "out"
        build_model(model_dir, args.hidden, args.layers, args.vocab)
        config = build_config(folder, args.rows, args.batch)
        train(config, base_model=str(model_dir), output_dir=out, seed=1)
        command = [sys.executable, "mlora.py", "--base_model", str(model_dir), "--config",
                   str(config), "--dir", str(out), "--evaluate", "--device", "cpu"]  # fmt: skip
        together_proc = timed(command)
        runs = [timed([*command, "--adapters", name]) for name in TASKS]
        separate_proc = (sum(w for w, _ in runs), sum(c for _, c in runs))
        together_eval, separate_eval = in_process(model_dir, config, out)
    print(
        f"model: random LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
        f"4 adapters x {args.rows} test rows, evaluate_batch_size {args.batch} "
        "(loss + greedy exact match)"
    )
    for title, together_s, separate_s, labels in (
        (
            "whole process (python mlora.py --evaluate)",
            together_proc,
            separate_proc,
            ("4 adapters together, 1 process", "4 separate processes, one after another"),
        ),
        (
            "same process, model loaded once (evaluate_model)",
            together_eval,
            separate_eval,
            ("4 adapters together", "4 separate calls"),
        ),
    ):
        print(f"{title}: wall s, CPU s")
        print(f"  {labels[0]:<40}: {together_s[0]:8.2f} {together_s[1]:8.2f}")
        print(f"  {labels[1]:<40}: {separate_s[0]:8.2f} {separate_s[1]:8.2f}")
        wall_ratio, cpu_ratio = separate_s[0] / together_s[0], separate_s[1] / together_s[1]
        print(f"  {'ratio (separate / together)':<40}: {wall_ratio:7.2f}x {cpu_ratio:7.2f}x")


if __name__ == "__main__":
    main()
