"""Data parallel training: training tokens/s with 1 process against N processes (torchrun).

The same config (``--adapters`` LoRA adapters, ``--rows`` rows each, ``--epochs``) is trained
by ``mlora.py`` in one process and by ``torchrun --nproc_per_node N mlora.py`` for each N of
``--nprocs``, each in a fresh output folder; every run trains the same global batches, so the
saved adapters are the same (the script prints the max relative difference to the first run:
about 1e-6 at equal thread counts; different thread counts per process change the order of
float sums, so expect up to ~1e-4 there) and only the speed differs. Reported per run:
training time (from the log line after the model loads to the end of
training, so process start, imports and model loading are left out), real tokens trained
(every row's tokens times the epochs), tokens/s, and the speed-up over one process.

CPU: the machine's cores are shared out, ``OMP_NUM_THREADS = cores // N`` per process, so one
process gets every core too (an honest comparison on a small machine: 2 cores give 1 x 2 threads
against 2 x 1 thread). GPU: one GPU per process (``cuda:LOCAL_RANK``).

    python benchmarks/bench_distributed.py --dry-run                     # a few seconds, CPU
    python benchmarks/bench_distributed.py --nprocs 1,2                  # CPU, tiny LLaMA
    python benchmarks/bench_distributed.py --device cuda --dtype bf16 --nprocs 1,2,4,8 \\
        --model path/to/model --rows 512 --batch 32 --cutoff-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--model", default=None, help="base model folder (default: a tiny LLaMA)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rows", type=int, default=64, help="training rows per adapter")
    p.add_argument("--batch", type=int, default=8, help="batch_size of every adapter")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256, help="tiny LLaMA hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny LLaMA layers")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: check the script works")
    args = p.parse_args(argv)
    if args.dry_run:
        args.adapters, args.rows, args.batch, args.hidden, args.layers = 2, 8, 4, 64, 2
        args.cutoff_len = 256
    return args


def tiny_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random LLaMA with a character-level tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(folder: Path, args: argparse.Namespace) -> Path:
    """``--adapters`` LoRA adapters (dropout on) on long-tailed synthetic rows."""
    import random

    rng = random.Random(0)
    adapters = []
    for a in range(args.adapters):
        rows = []
        for _ in range(args.rows):
            words = rng.choice([1, 2, 4] if args.dry_run else [2, 2, 4, 4, 8, 16, 32])
            text = " ".join(f"w{rng.randrange(1000)}" for _ in range(words))
            rows.append({"instruction": f"task {a}", "input": text, "output": text[::-1]})
        data = folder / f"data{a}.json"
        data.write_text(json.dumps(rows), encoding="utf-8")
        adapters.append(
            {"name": f"adapter{a}", "data": str(data), "r": 8, "lora_dropout": 0.05,
             "batch_size": args.batch, "num_epochs": args.epochs, "lr": 1e-4}
        )  # fmt: skip
    config = {"cutoff_len": args.cutoff_len, "log_step": 1000, "lora": adapters}
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def trained_tokens(config: Path, model: Path) -> int:
    """Real tokens of one pass over every adapter's rows, times its epochs."""
    from mlora.config.schema import load_config
    from mlora.model.loading import load_tokenizer
    from mlora.training.trainer import prepare_data

    parsed = load_config(config)
    data = prepare_data(parsed, load_tokenizer(str(model)))
    epochs = {a.name: a.num_epochs for a in parsed.lora}
    return sum(len(row) * epochs[name] for name, rows in data.items() for row in rows)


def train_seconds(log: str) -> float:
    """From the log line after the model loaded (``backend ...``) to the end of training
    (``peak memory ...``), by the log's own timestamps."""
    start = end = None
    for line in log.splitlines():
        match = STAMP.match(line)
        if not match:
            continue
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if " INFO backend " in line and start is None:
            start = when
        if " INFO peak memory " in line:
            end = when
    if start is None or end is None:
        raise SystemExit(f"could not find the training span in the log:\n{log[-2000:]}")
    return (end - start).total_seconds()


def run(nproc: int, args: argparse.Namespace, model: Path, config: Path, out: Path) -> str:
    """Train with ``nproc`` processes (1: plain ``mlora.py``); returns the log (rank 0's)."""
    dtype = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[args.dtype]
    flags = [
        "--base_model", str(model), "--config", str(config), "--dir", str(out), "--seed", "1",
        "--device", args.device, *dtype,
    ]  # fmt: skip
    if nproc == 1:
        command = [sys.executable, str(ROOT / "mlora.py"), *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(nproc), str(ROOT / "mlora.py"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for folder in sorted(p for p in a.iterdir() if (p / "adapter_model.safetensors").is_file()):
        x = load_file(folder / "adapter_model.safetensors")
        y = load_file(b / folder.name / "adapter_model.safetensors")
        for key, ref in x.items():
            diff = (y[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            worst = max(worst, diff.item())
    return worst


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = (
            Path(args.model)
            if args.model
            else tiny_model(folder / "model", args.hidden, args.layers)
        )
        config = write_config(folder, args)
        tokens = trained_tokens(config, model)
        print(f"{args.adapters} adapters x {args.rows} rows, {tokens} tokens, device {args.device}")
        print(
            f"{'processes':>9} {'train s':>8} {'tokens/s':>9} {'speed-up':>8} {'max rel diff':>12}"
        )
        base = None
        for n in nprocs:
            out = folder / f"out{n}"
            seconds = train_seconds(run(n, args, model, config, out))
            speed = tokens / seconds
            base = base or (speed, out)
            diff = max_difference(base[1], out)
            print(f"{n:>9} {seconds:>8.2f} {speed:>9.0f} {speed / base[0]:>7.2f}x {diff:>12.1e}")


if __name__ == "__main__":
    main()
