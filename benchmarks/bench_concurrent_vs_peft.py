"""Whole-process time: mlora training 4 adapters at once vs PEFT training them one after another.

Both sides train the same 4 adapters on the same data for the same steps on the same small
random LLaMA (built here, no download) with a LLaMA-sized vocabulary, since the vocabulary
projection is the largest matmul of small models. mlora is one `python mlora.py` process; the
baseline is the usual one-job-per-adapter workflow: 4 `peft_train_one.py` processes run one
after another.
Prints each time and the ratio.

    python benchmarks/bench_concurrent_vs_peft.py [--hidden 256 --layers 4 --rows 64 --epochs 2]
                                                  [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tokenizer  # noqa: E402  (the test suite's offline tokenizer)

TASKS = {
    "add": lambda i: {
        "instruction": "Add.",
        "input": f"{i % 13} {i % 7}",
        "output": str(i % 13 + i % 7),
    },
    "rev": lambda i: {"instruction": "Reverse.", "input": f"w{i}x", "output": f"x{i}w"[::-1]},
    "len": lambda i: {
        "instruction": "Length?",
        "input": "a" * (i % 9 + 1),
        "output": str(i % 9 + 1),
    },
    "cap": lambda i: {"instruction": "Upper.", "input": f"word{i}", "output": f"WORD{i}"},
}


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_config(folder: Path, rows: int, epochs: int) -> Path:
    adapters = []
    for name, make_row in TASKS.items():
        data = folder / f"{name}.json"
        data.write_text(json.dumps([make_row(i) for i in range(rows)]))
        adapters.append({
            "name": name, "data": str(data), "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "batch_size": 8, "num_epochs": epochs, "lr": 1e-4, "shuffle": True,
        })  # fmt: skip
    path = folder / "bench.json"
    path.write_text(json.dumps({"cutoff_len": 256, "log_step": 1000, "lora": adapters}))
    return path


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--vocab", type=int, default=32000, help="model vocabulary (LLaMA-2 size by default)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder / "model", args.hidden, args.layers, args.vocab)
        config = build_config(folder, args.rows, args.epochs)
        mlora_s = timed([
            sys.executable, "mlora.py", "--base_model", str(folder / "model"),
            "--config", str(config), "--dir", str(folder / "mlora-out"),
        ])  # fmt: skip
        peft_s = sum(
            timed(
                [
                    sys.executable,
                    "benchmarks/peft_train_one.py",
                    str(folder / "model"),
                    str(config),
                    name,
                    str(folder / "peft-out"),
                ]
            )
            for name in TASKS
        )
    steps = args.rows // 8 * args.epochs
    print(
        f"model: random LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
        f"4 adapters x {steps} steps of 8 rows"
    )
    print(f"mlora, 4 adapters in one process : {mlora_s:8.2f} s")
    print(f"PEFT, 4 processes one after another: {peft_s:8.2f} s")
    print(f"speed-up (PEFT / mlora)            : {peft_s / mlora_s:8.2f}x")


if __name__ == "__main__":
    main()
