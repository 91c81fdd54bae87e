"""``generate.py`` / ``mlora-generate``: answer prompts with trained adapters, batched together.

Everything the command needs (adapter folders, prompts, sampling flags) is checked before the
base model loads; the work itself is one call to ``mlora.inference.generation.generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mlora.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    model_from_args,
    sampling_params,
    setup_logging,
    sources_from_args,
)
from mlora.cli.program import program_name
from mlora.core.atomic import atomic_write_text
from mlora.core.errors import MloraError, exit_code_of
from mlora.core.jsonfile import TextProblem, parse_json, read_text
from mlora.data.chat import ChatPrompt, bind_templates
from mlora.data.prompts import PromptTemplate, load_template

if TYPE_CHECKING:  # torch loads after the arguments parse: --help answers at once
    from mlora.inference.generation import GenerationOutput, GenerationRequest

BASE = "base"  # --use value (and JSONL "adapter": null) for the base model without adapter
CHAT = "chat"  # --template value: the tokenizer's chat template


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("generate.py", "mlora-generate", "mlora.cli.generate"),
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
        help="Render each prompt as the instruction of this template; 'chat': as a user turn of "
        "the tokenizer's chat template; 'auto' (needs --config): each adapter's own (the chat "
        "template for adapters trained on conversations). Default: prompts are used as given.",
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
        text = read_text(file)
    except OSError as exc:
        raise MloraError(f"cannot read {path}: {exc.strerror or exc}") from None
    except TextProblem as exc:
        raise MloraError(f"{path}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except TextProblem as exc:
            raise MloraError(f"{path}:{number}: {exc}") from None
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
    args: argparse.Namespace,
    known: Sequence[str],
    templates: dict[str, PromptTemplate | ChatPrompt],
    tokenizer: Any = None,
) -> list[GenerationRequest]:
    """The requests in output order: each prompt once per adapter that answers it.

    Args:
        tokenizer: renders chat prompts (``--template chat``, chat adapters under ``auto``).

    Raises:
        MloraError: no prompts, an unknown adapter name, --template auto without --config.
    """
    from mlora.inference.generation import GenerationRequest

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
    fixed: PromptTemplate | ChatPrompt | None = None
    if args.template == CHAT:
        fixed = ChatPrompt(tokenizer)
    elif args.template not in (None, "auto"):
        fixed = load_template(args.template)
    templates = bind_templates(templates, tokenizer)
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


def announce(message: str) -> None:
    """A status line for a person at a terminal (loading a model takes a while and prints
    nothing otherwise); pipes and logs get only the answers, warnings and errors."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from mlora.batching.dispatcher import shard_bounds
    from mlora.inference.generation import generate
    from mlora.training.distributed import process_group
    from mlora.training.preflight import check_output_file

    params = sampling_params(args)
    if args.batch_size < 1:
        raise MloraError(f"--batch_size must be >= 1, got {args.batch_size}")
    folders, templates = sources_from_args(args)
    tokenizer = None  # chat prompts are rendered by the tokenizer, loaded first (cheap)
    if args.template == CHAT or (
        args.template == "auto" and any(isinstance(t, ChatPrompt) for t in templates.values())
    ):
        from mlora.model.base_model import with_gguf_file
        from mlora.model.loading import load_tokenizer

        base = with_gguf_file(args.base_model, args.gguf_file)
        tokenizer = load_tokenizer(base, args.trust_remote_code)
    requests = build_requests(args, list(folders), templates, tokenizer)  # checked before loading
    to_stdout = args.output == "-"
    if args.output and not to_stdout:  # a bad --output found after generating loses the answers
        check_output_file(Path(args.output).resolve())
    announce(f"loading {args.base_model} with {len(folders)} adapter(s) (--verbose shows how)")
    model, tokenizer = model_from_args(args, folders)
    announce(f"answering {len(requests)} prompt(s)")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, None)
    if not args.verbose:  # stdout carries the answers; keep stderr to warnings and errors
        from mlora.inference.startup import quiet_loading

        quiet_loading()
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":  # python -m mlora.cli.generate
    sys.exit(main())
