"""``mlora.py --inference``: an interactive prompt loop over a config's trained adapters.

Each line is answered by the current adapter, rendered with that adapter's prompt template
(as in training) and streamed as it is generated. Lines starting with ``/`` are commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, TextIO

from mlora.core.errors import MloraError
from mlora.data.prompts import PromptTemplate
from mlora.inference.generation import SamplingParams, generate
from mlora.model.multi_lora import MultiLoraModel

HELP = """commands:
  /adapter NAME   answer with adapter NAME
  /base           answer with the base model alone (prompt used as typed)
  /list           the loaded adapters (* = current)
  /raw            toggle the prompt template (on: rendered as in training; off: as typed)
  /set KEY VALUE  sampling: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed
  /help           this text
  /quit           leave (also Ctrl-D)"""

_SETTABLE = {
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "seed": int,
}


class PromptLoop:
    """The state of one session: current adapter, template switch, sampling parameters."""

    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer: Any,
        templates: dict[str, PromptTemplate],
        params: SamplingParams,
        out: TextIO,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.templates = templates
        self.params = params
        self.out = out
        self.names = list(model.specs)  # config order
        self.adapter: str | None = self.names[0] if self.names else None
        self.use_template = True

    @property
    def prompt(self) -> str:
        return f"[{self.adapter or 'base'}]> "

    def command(self, line: str) -> bool:
        """Run one ``/command``; returns False when the session should end."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "adapter" and rest in self.names:
            self.adapter = rest
        elif name == "adapter":
            self.say(f"error: unknown adapter {rest!r} (available: {', '.join(self.names)})")
        elif name == "base":
            self.adapter = None
        elif name == "list":
            self.say("\n".join(f"{'*' if n == self.adapter else ' '} {n}" for n in self.names))
        elif name == "raw":
            self.use_template = not self.use_template
            self.say(f"prompt template {'on' if self.use_template else 'off'}")
        elif name == "set":
            self.set(rest)
        else:
            self.say(HELP)
        return True

    def set(self, text: str) -> None:
        key, _, value = text.partition(" ")
        if key not in _SETTABLE:
            self.say(f"error: /set KEY VALUE with KEY one of {', '.join(_SETTABLE)}")
            return
        try:
            self.params = dataclasses.replace(self.params, **{key: _SETTABLE[key](value)})
        except (ValueError, MloraError) as exc:
            self.say(f"error: {key}: {exc}")
            return
        self.say(f"{key} = {getattr(self.params, key)}")

    def answer(self, text: str) -> None:
        """Stream the current adapter's answer to ``text``."""
        template = self.templates.get(self.adapter or "") if self.use_template else None
        prompt = template.render(text) if template else text

        def on_text(_: int, piece: str) -> None:
            self.out.write(piece)
            self.out.flush()

        generate(self.model, self.tokenizer, [(prompt, self.adapter)], self.params, on_text)
        self.out.write("\n")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def read(self, lines: TextIO | None) -> str | None:
        """The next input line without its newline; None at end of input."""
        if lines is None:  # a terminal: input() gives line editing and history (readline)
            try:
                return input(self.prompt)
            except EOFError:
                return None
        self.out.write(self.prompt)
        self.out.flush()
        line = lines.readline()
        return line.rstrip("\n") if line else None

    def run(self, lines: TextIO | None = None) -> None:
        """Answer lines from ``lines`` (None: the terminal) until /quit or end of input."""
        self.say(f"adapters: {', '.join(self.names)}; /help for commands")
        while True:
            line = self.read(lines)
            if line is None:
                self.out.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.answer(line)
            except KeyboardInterrupt:
                self.say("\n(interrupted)")
            except MloraError as exc:
                self.say(f"error: {exc}")


def run_inference(args: argparse.Namespace) -> int:
    """Load the base model with the config's trained adapters (``--dir``) and start the loop.

    Raises:
        MloraError: none of the config's adapters has been trained into ``--dir``.
    """
    from mlora.cli.common import model_from_args, sources_from_args
    from mlora.data.chat import bind_templates
    from mlora.inference.startup import quiet_loading

    if not args.verbose:
        quiet_loading()
    folders, templates = sources_from_args(args, require_all=False)
    model, tokenizer = model_from_args(args, folders)
    templates = bind_templates(templates, tokenizer)  # chat adapters: the chat template
    loop = PromptLoop(model, tokenizer, templates, SamplingParams(), sys.stdout)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

        loop.run()
    else:
        loop.run(sys.stdin)
    return 0
