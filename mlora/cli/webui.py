"""``inference.py``: a Gradio page to chat with trained adapters (optional extra ``webui``).

One base model is loaded with every adapter attached; the page's dropdown picks which one
answers (or the base model alone). Each message is answered on its own (the adapters were
trained on single prompts, not conversations), rendered with the adapter's prompt template
when a config is given, and streamed into the chat as it is generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlora.cli.training_tab import add_training_tab
from mlora.core.errors import MloraError, exit_code_of
from mlora.data.prompts import PromptTemplate

if TYPE_CHECKING:  # torch loads after the arguments parse: --help answers at once
    from mlora.inference.generation import SamplingParams
    from mlora.model.multi_lora import MultiLoraModel

BASE_CHOICE = "(base model)"


def build_parser() -> argparse.ArgumentParser:
    from mlora.cli.common import add_model_arguments, add_sampling_arguments

    parser = argparse.ArgumentParser(
        prog="inference.py",
        description="A web page to chat with trained adapters (needs: pip install 'mlora[webui]').",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on.")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    add_sampling_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="Log model loading.")
    return parser


class ChatBackend:
    """Answers one message with one adapter, streaming; the model runs one request at a time."""

    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer: Any,
        templates: dict[str, PromptTemplate],
        params: SamplingParams,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.templates = templates
        self.params = params
        self.lock = threading.Lock()

    @property
    def choices(self) -> list[str]:
        return [*self.model.specs, BASE_CHOICE]

    def stream(
        self, message: str, choice: str, params: SamplingParams, use_template: bool
    ) -> Iterator[str]:
        """The answer so far, once per new piece of text (the last one is the whole answer)."""
        adapter = None if choice == BASE_CHOICE else choice
        template = self.templates.get(adapter or "") if use_template else None
        prompt = template.render(message) if template else message
        pieces: queue.Queue[str | BaseException | None] = queue.Queue()

        from mlora.inference.generation import generate

        def work() -> None:
            try:
                with self.lock:
                    generate(
                        self.model,
                        self.tokenizer,
                        [(prompt, adapter)],
                        params,
                        on_text=lambda _, piece: pieces.put(piece),
                    )
            except BaseException as exc:  # handed to the page's thread, re-raised there
                pieces.put(exc)
            pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            text += piece
            yield text


def build_app(backend: ChatBackend, training_dir: str | Path | None = None) -> Any:
    """The Gradio ``Blocks`` page: a Chat tab (elements with stable ids: adapter, chat, prompt,
    send) and a Training tab following ``training_dir/metrics.jsonl`` (see training_tab.py)."""
    import gradio as gr

    defaults = backend.params
    with gr.Blocks(title="mlora chat") as app:
        with gr.Tab("Chat", elem_id="chat-tab"):
            gr.Markdown(
                "### mlora: chat with trained adapters\n"
                "Each message is answered on its own by the adapter picked below."
            )
            adapter = gr.Dropdown(
                backend.choices, value=backend.choices[0], label="Adapter", elem_id="adapter"
            )
            chat = gr.Chatbot(label="Chat", elem_id="chat", render_markdown=False, height=360)
            prompt = gr.Textbox(
                label="Message", elem_id="prompt", placeholder="Type and press Enter"
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                clear = gr.Button("Clear", elem_id="clear")
            with gr.Accordion("Sampling", open=False):
                max_new_tokens = gr.Slider(
                    1, 1024, defaults.max_new_tokens, step=1, label="Max new"
                )
                temperature = gr.Slider(0, 2, defaults.temperature, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.01, 1, defaults.top_p, label="Top p")
                top_k = gr.Slider(0, 200, defaults.top_k, step=1, label="Top k (0: off)")
                penalty = gr.Slider(0.5, 2, defaults.repetition_penalty, label="Repetition penalty")
                use_template = gr.Checkbox(
                    bool(backend.templates), label="Render with the adapter's prompt template"
                )

            def respond(message, history, choice, max_new, temp, p, k, rep, templ):
                if not message.strip():
                    yield "", history
                    return
                params = dataclasses.replace(
                    defaults,
                    max_new_tokens=int(max_new),
                    temperature=float(temp),
                    top_p=float(p),
                    top_k=int(k),
                    repetition_penalty=float(rep),
                )
                history = [*history, {"role": "user", "content": message}]
                answer = {"role": "assistant", "content": ""}
                try:
                    for text in backend.stream(message, choice, params, templ):
                        answer["content"] = text
                        yield "", [*history, answer]
                except MloraError as exc:
                    raise gr.Error(str(exc)) from None
                yield "", [*history, answer]

            inputs = [prompt, chat, adapter, max_new_tokens, temperature, top_p, top_k, penalty]
            inputs.append(use_template)
            send.click(respond, inputs, [prompt, chat])
            prompt.submit(respond, inputs, [prompt, chat])
            clear.click(lambda: [], None, chat)
        add_training_tab(training_dir)
    return app


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MloraError("inference.py needs gradio: pip install 'mlora[webui]'") from None
    from mlora.cli.common import model_from_args, sampling_params, sources_from_args
    from mlora.data.chat import bind_templates
    from mlora.inference.startup import quiet_loading
    from mlora.inference.trained import find_adapters

    if not args.verbose:
        quiet_loading()
    params = sampling_params(args)
    if args.dir and not args.config and not args.adapter and not find_adapters(args.dir):
        folders, templates = {}, {}  # a run still training: chat with the base, follow the run
    else:
        folders, templates = sources_from_args(args, require_all=False)
    model, tokenizer = model_from_args(args, folders)
    templates = bind_templates(templates, tokenizer)  # chat adapters: the chat template
    app = build_app(ChatBackend(model, tokenizer, templates, params), args.dir)
    print(f"mlora chat: http://{args.host}:{args.port}", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, quiet=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    from mlora.cli.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, None)
    return exit_code_of(lambda: run(args), interrupted_code=0)
