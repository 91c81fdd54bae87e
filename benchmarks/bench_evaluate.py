"""Evaluating 4 adapters together vs 4 separate evaluations (loss + greedy exact match).

Setup (not timed): a small random LLaMA (built here, no download) and 4 adapters trained for a
few steps with ``mlora.train`` on 4 synthetic tasks, each with its own test file.

Measured, all in one run:

1. whole process: one ``mlora.py --evaluate`` process evaluating the 4 adapters together vs
   4 ``mlora.py --evaluate --adapters NAME`` processes run one after another (what a user does
   without multi-adapter batching; each pays Python, model loading and its own batches);
2. same process, model already loaded: ``evaluate_model`` over the 4 adapters together (their
   rows side by side in each batch) vs 4 ``evaluate_model`` calls with one adapter each.

Prints each time and the ratios.

    python benchmarks/bench_evaluate.py [--hidden 256 --layers 4 --vocab 32000 --rows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_concurrent_vs_peft import TASKS, build_model  # noqa: E402


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


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - start


def in_process(model_dir: Path, config_path: Path, out: Path) -> tuple[float, float]:
    """(together, separately) seconds of ``evaluate_model`` on one loaded model."""
    from mlora.config import load_config
    from mlora.evaluation import evaluate_model, prepare_test_sets
    from mlora.trained import load_trained

    config = load_config(config_path)
    names = list(TASKS)
    model, tokenizer = load_trained(str(model_dir), {n: out / n for n in names})
    sets = prepare_test_sets(config, tokenizer)
    evaluate_model(model, tokenizer, sets[:1])  # warm-up (first generate call, allocator)
    start = time.perf_counter()
    together = evaluate_model(model, tokenizer, sets)
    together_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = {ts.adapter: evaluate_model(model, tokenizer, [ts])[ts.adapter] for ts in sets}
    alone_s = time.perf_counter() - start
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
        separate_proc = sum(timed([*command, "--adapters", name]) for name in TASKS)
        together_eval, separate_eval = in_process(model_dir, config, out)
    print(
        f"model: random LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
        f"4 adapters x {args.rows} test rows, evaluate_batch_size {args.batch} "
        "(loss + greedy exact match)"
    )
    print("whole process (python mlora.py --evaluate):")
    print(f"  4 adapters together, 1 process          : {together_proc:8.2f} s")
    print(f"  4 separate processes, one after another : {separate_proc:8.2f} s")
    print(f"  ratio (separate / together)             : {separate_proc / together_proc:8.2f}x")
    print("same process, model loaded once (evaluate_model):")
    print(f"  4 adapters together                     : {together_eval:8.2f} s")
    print(f"  4 separate calls                        : {separate_eval:8.2f} s")
    print(f"  ratio (separate / together)             : {separate_eval / together_eval:8.2f}x")


if __name__ == "__main__":
    main()
