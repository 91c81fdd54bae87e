"""``mlora.py`` / ``mlora``: train the adapters of a config file (thin layer over ``mlora.api``)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from mlora.cli.common import (
    BASE_MODEL_HELP,
    add_base_model_options,
    quantize_choice,
    setup_logging,
)
from mlora.cli.harness_options import add_harness_options, check_harness_options
from mlora.cli.program import program_name
from mlora.core.errors import exit_code_of
from mlora.core.interrupt import TrainingInterrupted

logger = logging.getLogger("mlora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("mlora.py", "mlora", "mlora.cli.train"),
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
    add_harness_options(parser)
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
    parser.add_argument(
        "--report_to",
        nargs="+",
        default=None,
        metavar="TRACKER",
        help="Trackers that also get the metrics: tensorboard, mlflow, trackio, wandb (several "
        "allowed, space- or comma-separated) or none; overrides the config's report_to. "
        "DIR/metrics.jsonl is always written.",
    )
    parser.add_argument("--log_file", default=None, help="Also write the log to this file.")
    parser.add_argument("--verbose", action="store_true", help="Debug logging.")
    return parser


def run(args: argparse.Namespace) -> int:
    from mlora.config.schema import load_config

    if args.inference:
        from mlora.cli.chat import run_inference

        return run_inference(args)
    config = load_config(args.config)  # validate before torch and transformers even import
    check_harness_options(args)  # and lm-eval is there when asked for, before the model loads
    from mlora.api import train
    from mlora.hardware.backends import get_backend
    from mlora.hardware.precision import resolve_dtype
    from mlora.model.base_model import with_gguf_file

    backend = get_backend(args.device)  # --device, else MLORA_BACKEND_TYPE, before any device use
    dtype = resolve_dtype(args.fp16, args.bf16, backend)
    args.base_model = with_gguf_file(args.base_model, args.gguf_file)
    if config.sweep is not None:
        return run_sweep_command(args, config, backend, dtype)
    if args.evaluate and args.harness is not None:
        from mlora.inference.harness_run import evaluate_harness

        evaluate_harness(
            config,
            args.base_model,
            args.dir,
            args.harness,
            adapters=args.adapters.split(",") if args.adapters else None,
            include_path=args.harness_include or (),
            limit=args.harness_limit,
            num_fewshot=args.harness_fewshot,
            dtype=dtype,
            device=backend.device,
            trust_remote_code=args.trust_remote_code,
            quantize=quantize_choice(args),
            attn_implementation=args.attn_impl,
        )
        return 0
    if args.evaluate:
        from mlora.inference.evaluation import evaluate

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
        report_to=split_names(args.report_to),
    )
    failed = [run.failed for run in trainer.runs if run.failed]
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


def split_names(values: list[str] | None) -> list[str] | None:
    """``--report_to a b,c`` -> ``["a", "b", "c"]`` (None when the flag is not given)."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def run_sweep_command(args: argparse.Namespace, config, backend, dtype) -> int:
    """A config with a ``sweep`` block: the trials trained in this process (README "Sweeps")."""
    from mlora.core.errors import ConfigError
    from mlora.core.launcher_env import env_world_size
    from mlora.sweep.runner import run_sweep

    for flag, given in (("--evaluate", args.evaluate), ("--load_adapter", args.load_adapter),
                        ("--fsdp", args.fsdp), ("torchrun", env_world_size() > 1)):  # fmt: skip
        if given:
            raise ConfigError(f"{config.source}: a sweep runs in one process, without {flag}")
    run_sweep(
        config,
        args.base_model,
        Path(args.dir),
        seed=args.seed,
        dtype=dtype,
        device=str(backend.device),
        overwrite=args.overwrite,
        resume=args.resume,
        trust_remote_code=args.trust_remote_code,
        quantize=quantize_choice(args),
        attn_implementation=args.attn_impl,
    )
    return 0


def launcher_words() -> list[str]:
    """How to start ``mlora.py`` again as this run was started: ``python``, or torchrun with
    this machine's process count (``...`` stands for the multi-node options of torchrun)."""
    from mlora.core.launcher_env import env_world_size

    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if env_world_size() <= 1:
        return ["python"]
    nodes = [] if str(env_world_size()) == local else ["..."]
    return ["torchrun", *nodes, "--nproc_per_node", local]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    args = build_parser().parse_args(argv)

    def train_or_report_resume() -> int:
        setup_logging(args.verbose, args.log_file)  # an unwritable log file: one line too
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


if __name__ == "__main__":  # python -m mlora.cli.train
    from mlora.core.process_exit import exit_now

    exit_now(main())  # as mlora.py: without the interpreter's slow teardown
