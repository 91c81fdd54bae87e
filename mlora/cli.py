"""``mlora.py`` / ``mlora``: train the adapters of a config file (thin layer over ``mlora.api``)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from mlora.errors import MloraError
from mlora.interrupt import TrainingInterrupted

logger = logging.getLogger("mlora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlora.py",
        description="Fine-tune many LoRA adapters at once on one frozen base model.",
    )
    parser.add_argument("--base_model", required=True, help="Local model directory or hub id.")
    parser.add_argument("--config", required=True, help="JSON config file (see README).")
    parser.add_argument("--dir", default=".", help="Output folder; adapter NAME goes to DIR/NAME.")
    parser.add_argument(
        "--seed", type=int, default=42, help="Seed for data order and adapter init."
    )
    parser.add_argument(
        "--load_adapter",
        action="store_true",
        help="Continue each adapter from DIR/NAME (ours or any PEFT LoRA).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Allow replacing existing DIR/NAME folders."
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue every adapter from the newest complete checkpoint in DIR.",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="Base model in float16.")
    precision.add_argument("--bf16", action="store_true", help="Base model in bfloat16.")
    parser.add_argument("--tf32", action="store_true", help="Allow TF32 matmuls (CUDA).")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)."
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow the model's own code from the hub."
    )
    parser.add_argument("--log_file", default=None, help="Also write the log to this file.")
    parser.add_argument("--verbose", action="store_true", help="Debug logging.")
    return parser


def setup_logging(verbose: bool, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def run(args: argparse.Namespace) -> int:
    from mlora.api import train
    from mlora.config import load_config

    config = load_config(args.config)  # validate before anything heavy
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    trainer = train(
        config,
        base_model=args.base_model,
        output_dir=Path(args.dir),
        seed=args.seed,
        dtype=dtype,
        device=args.device or default_device(),
        load_adapter=args.load_adapter,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        resume=args.resume,
    )
    failed = [run.failed for run in trainer.runs if run.failed]
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    try:
        return run(args)
    except TrainingInterrupted as exc:
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "mlora.py", *given, *([] if args.resume else ["--resume"])])
        print(f"error: {exc}; resume with: {command}", file=sys.stderr)
        return exc.exit_code
    except MloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
