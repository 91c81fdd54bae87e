"""``generate.py`` / ``mlora-generate``: answer prompts with trained adapters, batched together.

Everything the command needs (adapter folders, prompts, sampling flags) is checked before the
base model loads; the work itself is one call to ``mlora.generation.generate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mlora.atomic import atomic_write_text
from mlora.cli import BASE_MODEL_HELP, add_base_model_options, program_name, quantize_choice
from mlora.dispatcher import shard_bounds
from mlora.distributed import local_device, process_group
from mlora.errors import MloraError, exit_code_of
from mlora.generation import GenerationOutput, GenerationRequest, SamplingParams, generate
from mlora.preflight import check_output_file
from mlora.prompts import PromptTemplate, load_template

BASE = "base"  # --use value (and JSONL "adapter": null) for the base model without adapter


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


def adapter_sources(
    args: argparse.Namespace, require_all: bool = True
) -> tuple[dict[str, Path], dict[str, PromptTemplate]]:
    """The adapter folders to load by name, and the config's templates (empty without one).

    Raises:
        MloraError: a bad --adapter value, a missing folder, a name given twice.
    """
    from mlora.config import load_config
    from mlora.trained import (
        config_adapter_dirs,
        config_templates,
        find_adapters,
        parse_adapter_arg,
    )

    folders: dict[str, Path] = {}
    templates: dict[str, PromptTemplate] = {}
    if args.config and not args.dir:
        raise MloraError("--config needs --dir (the folder the adapters were trained into)")
    if args.config:
        config = load_config(args.config)
        folders.update(config_adapter_dirs(config, args.dir, require_all))
        templates = config_templates(config)
    elif args.dir:
        folders.update(find_adapters(args.dir))
        if not folders:
            raise MloraError(f"no trained adapter found in {args.dir}")
    for value in getattr(args, "adapter", []):  # mlora.py --inference has no --adapter
        name, folder = parse_adapter_arg(value)
        if name in folders:
            raise MloraError(f"adapter {name!r} given twice")
        if not folder.is_dir():
            raise MloraError(f"adapter {name!r}: directory not found: {folder}")
        folders[name] = folder
    return folders, templates


def load_model(args: argparse.Namespace, folders: dict[str, Path]):
    """Load the base model with the adapters attached; returns (model, tokenizer)."""
    from mlora.backends import get_backend
    from mlora.base_model import with_gguf_file
    from mlora.precision import base_model_load_options, resolve_dtype
    from mlora.trained import load_trained

    backend = get_backend(args.device)  # --device, else $MLORA_BACKEND_TYPE, else the best
    backend = get_backend(str(local_device(backend.device)))  # torchrun: a GPU per local rank
    dtype = resolve_dtype(args.fp16, args.bf16, backend)
    options = base_model_load_options(backend, dtype, quantize_choice(args), args.attn_impl)
    return load_trained(
        with_gguf_file(args.base_model, args.gguf_file),
        folders,
        dtype=dtype,
        device=str(backend.device),
        trust_remote_code=args.trust_remote_code,
        **options,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("generate.py", "mlora-generate", "mlora.generate_cli"),
        description="Answer prompts with trained adapters; rows of different adapters share "
        "each batch.",
    )
    add_model_arguments(parser)
    parser.add_argument("prompts", nargs="*", help="Prompts (answered by each --use adapter).")
    parser.add_argument(
        "--prompts_file",
        default=None,
        help='JSONL, one {"prompt": ..., "adapter": NAME or null} per line (adapter optional).',
    )
    parser.add_argument(
        "--use",
        action="append",
        default=[],
        metavar="NAME",
        help=f"Adapter for prompts that name none (repeatable: each answers; '{BASE}': base "
        "model). Default: the base model.",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="Render each prompt as the instruction of this template; 'auto' (needs --config): "
        "each adapter's own template. Default: prompts are used as given.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Rows per generate call.")
    parser.add_argument(
        "--stream", action="store_true", help="Print text as it is generated (in prompt order)."
    )
    parser.add_argument(
        "--output", default=None, help="Write JSONL results here ('-': to stdout, not the text)."
    )
    add_sampling_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="Log model loading.")
    return parser


def read_prompts_file(path: str) -> list[tuple[str, str | None, bool, str]]:
    """``(prompt, adapter, adapter_given, "FILE:LINE")`` per JSONL line.

    Raises:
        MloraError: a missing or empty file, a bad line (naming file and line).
    """
    file = Path(path)
    if not file.is_file():
        if file.is_dir():
            raise MloraError(f"{path} is a directory, not a prompts file")
        raise MloraError(f"prompts file not found: {path}")
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise MloraError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MloraError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MloraError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise MloraError(f'{path}:{number}: expected an object with a string "prompt"')
        adapter = row.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise MloraError(f'{path}:{number}: "adapter" must be a name or null')
        rows.append((row["prompt"], adapter, "adapter" in row, f"{path}:{number}"))
    if not rows:
        raise MloraError(f"prompts file is empty: {path}")
    return rows


def build_requests(
    args: argparse.Namespace, known: Sequence[str], templates: dict[str, PromptTemplate]
) -> list[GenerationRequest]:
    """The requests in output order: each prompt once per adapter that answers it.

    Raises:
        MloraError: no prompts, an unknown adapter name, --template auto without --config.
    """

    def resolve(name: str | None, where: str) -> str | None:
        if name is None or (name == BASE and name not in known):
            return None
        if name not in known:
            available = ", ".join([*known, BASE])
            raise MloraError(f"{where}: unknown adapter {name!r} (available: {available})")
        return name

    default = [resolve(name, "--use") for name in args.use] or [None]
    rows = [(p, None, False, "") for p in args.prompts]
    if args.prompts_file:
        rows += read_prompts_file(args.prompts_file)
    if not rows:
        raise MloraError("no prompts: give them as arguments or with --prompts_file")
    if args.template == "auto" and not templates:
        raise MloraError("--template auto needs --config (it holds each adapter's template)")
    fixed = load_template(args.template) if args.template not in (None, "auto") else None
    requests = []
    for prompt, adapter, given, where in rows:
        for name in [resolve(adapter, where)] if given else default:
            template = fixed
            if args.template == "auto" and name is not None:
                template = templates.get(name)
            text = template.render(prompt) if template else prompt
            requests.append(GenerationRequest(text, name))
    return requests


class OrderedStreamPrinter:
    """Prints streamed answers in request order while all rows of a batch decode together.

    The earliest unfinished request is printed live; the text of later ones is buffered until
    every request before them has finished.
    """

    def __init__(self, requests: Sequence[GenerationRequest], out: TextIO) -> None:
        self.requests = requests
        self.out = out
        self.buffers = [""] * len(requests)
        self.finished = [False] * len(requests)
        self.current = -1
        self._advance()

    def on_text(self, index: int, text: str) -> None:
        if index == self.current:
            self.out.write(text)
            self.out.flush()
        else:
            self.buffers[index] += text

    def on_finish(self, index: int, output: GenerationOutput) -> None:
        self.finished[index] = True
        if index == self.current:
            self.out.write("\n")
            self._advance()

    def _advance(self) -> None:
        while self.current + 1 < len(self.requests):
            self.current += 1
            if len(self.requests) > 1:
                self.out.write(header(self.requests[self.current]))
            self.out.write(self.buffers[self.current])
            self.out.flush()
            if not self.finished[self.current]:
                return
            self.out.write("\n")


def header(request: GenerationRequest) -> str:
    return f"=== [{request.adapter or BASE}] {request.prompt!r}\n"


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if args.batch_size < 1:
        raise MloraError(f"--batch_size must be >= 1, got {args.batch_size}")
    folders, templates = adapter_sources(args)
    requests = build_requests(args, list(folders), templates)  # all checked before loading
    to_stdout = args.output == "-"
    if args.output and not to_stdout:  # a bad --output found after generating loses the answers
        check_output_file(Path(args.output).resolve())
    model, tokenizer = load_model(args, folders)
    with process_group(model.device) as dist:  # torchrun: each rank answers a share, rank 0
        start, end = shard_bounds(len(requests), dist.rank, dist.world_size)  # writes them all
        stream = args.stream and not to_stdout and not dist.enabled
        printer = OrderedStreamPrinter(requests, sys.stdout) if stream else None
        mine = generate(
            model,
            tokenizer,
            requests[start:end],
            params,
            on_text=printer.on_text if printer else None,
            batch_size=args.batch_size,
            on_finish=printer.on_finish if printer else None,
        )
        outputs = [output for share in dist.gather(mine) for output in share]
    if not dist.is_main:
        return 0
    if args.output:
        lines = "".join(json.dumps(result_row(o)) + "\n" for o in outputs)
        if to_stdout:
            sys.stdout.write(lines)
        else:
            atomic_write_text(args.output, lines)
    if printer is None and not to_stdout:
        for output in outputs:
            prefix = header(output.request) if len(outputs) > 1 else ""
            sys.stdout.write(f"{prefix}{output.text}\n")
    return 0


def result_row(output: GenerationOutput) -> dict:
    return {
        "prompt": output.request.prompt,
        "adapter": output.request.adapter,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "num_tokens": len(output.token_ids),
    }


def quiet_loading() -> None:
    """No loading logs or progress bars on the terminal (they would mix with the answers)."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("mlora").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    from mlora.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, None)
    if not args.verbose:  # stdout carries the answers; keep stderr to warnings and errors
        quiet_loading()
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":  # python -m mlora.generate_cli
    sys.exit(main())
