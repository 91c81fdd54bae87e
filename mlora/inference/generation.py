"""Batched text generation where every row may use a different adapter (or the base model).

Requests are grouped by adapter (stably) into the segments of one ``BatchLayout``, left-padded,
and decoded by transformers' own ``generate`` on the wrapped model with that layout set on the
model's context for the whole call. Each decoding step feeds ``(B, 1)`` tokens, so the row
segments stay valid at every step; rows are never reordered inside ``generate`` (no beam
search), and the outputs are returned in request order. Sampling, repetition penalty and the
KV cache are transformers' own; stop strings are a ``StoppingCriteria`` that searches only the
generated text; streaming goes through a ``BaseStreamer`` that calls the user's callback with
each row's new text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mlora.batching.layout import BatchLayout
from mlora.core.errors import MloraError
from mlora.data.chat import encode_texts
from mlora.data.rows import pad_token_id
from mlora.model.multi_lora import MultiLoraModel

# on_text(request_index, new_text): called as each row's visible text grows.
TextCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and the adapter that answers it (``None``: the base model alone).

    ``prompt_ids``: the prompt's tokens when the caller has already tokenized (and perhaps
    truncated) it, e.g. by lm-evaluation-harness's rules; None: ``tokenizer(prompt)``.
    """

    prompt: str
    adapter: str | None = None
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` is greedy decoding (the other sampling knobs unused).

    Attributes:
        max_new_tokens: tokens generated at most per row.
        temperature: softmax temperature; 0 = greedy.
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: sample among the k most likely tokens (0 disables it).
        repetition_penalty: CTRL-style penalty on tokens already present (1.0 disables it).
        stop: strings that end a row when they appear in its generated text (the prompt is not
            searched); the returned text stops before the first one.
        seed: seeds sampling for reproducible output (``None``: the global RNG as it is).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, "a number >= 0"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, must in problems:
            if not ok:
                raise MloraError(
                    f"sampling parameter {name!r} must be {must}, got {getattr(self, name)!r}"
                )


@dataclass(frozen=True)
class GenerationOutput:
    """The answer to one request.

    Attributes:
        text: the generated text, without the prompt, EOS or the stop string.
        token_ids: the generated tokens up to and including EOS / the stop string's last token.
        finish_reason: ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (max_new_tokens).
    """

    request: GenerationRequest
    text: str
    token_ids: list[int]
    finish_reason: str


# on_finish(request_index, output): called once per request as soon as its row has finished.
FinishCallback = Callable[[int, GenerationOutput], None]


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class _RowDecoder:
    """Turns one row's generated tokens into visible text: cut at EOS and at stop strings.

    The same rules serve streaming (text that may still become a stop string is held back) and
    the final output, so the streamed pieces always add up to ``GenerationOutput.text``.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int], stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stops = tuple(stops)

    def decode(self, tokens: list[int], final: bool) -> tuple[str, int, str | None]:
        """(visible text, tokens consumed, finish reason or None while the row is running)."""
        reason = None
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, reason = tokens[: i + 1], "eos"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            # keep the tokens up to the one that completes the stop string
            end = next(
                n
                for n in range(1, len(tokens) + 1)
                if any(
                    s in self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
                    for s in self.stops
                )
            )
            return text[:cut], end, "stop"
        if reason is None and not final:
            held = _stop_prefix_len(text, self.stops)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                held = max(held, 1)
            return text[: len(text) - held], len(tokens), None
        return text, len(tokens), reason or "length"


class _StopStrings(StoppingCriteria):
    """Ends each row whose generated text contains a stop string.

    Unlike transformers' ``stop_strings`` (matched against prompt + answer, so a prompt ending
    in "=" and a stop string "=x" would stop at the first "x"), only the answer is searched.
    Each step decodes a short tail of every row: enough tokens for the longest stop string
    even if every token were a single byte.
    """

    def __init__(self, decoder: _RowDecoder, prompt_width: int) -> None:
        self.decoder = decoder
        self.prompt_width = prompt_width
        self.tail = 4 * max(len(s) for s in decoder.stops) + 4

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        # input_ids: (B, prompt_width + generated so far)
        start = max(self.prompt_width, input_ids.shape[1] - self.tail)
        tails = input_ids[:, start:].tolist()
        decode = self.decoder.tokenizer.decode
        done = [
            any(s in decode(row, skip_special_tokens=True) for s in self.decoder.stops)
            for row in tails
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)


class _RowStreamer(BaseStreamer):
    """A ``generate`` streamer that reports each row's new visible text to a callback.

    ``generate`` first puts the prompt ids ``(B, T)``, then the new token of every row ``(B,)``
    at each step (finished rows receive padding, which is ignored here).
    """

    def __init__(
        self,
        decoder: _RowDecoder,
        requests: Sequence[GenerationRequest],
        request_index: list[int],
        on_text: TextCallback | None,
        on_finish: FinishCallback | None,
    ) -> None:
        self.decoder = decoder
        self.requests = requests
        self.request_index = request_index
        self.on_text = on_text
        self.on_finish = on_finish
        self.tokens: list[list[int]] = [[] for _ in request_index]
        self.sent = [0] * len(request_index)
        self.done = [False] * len(request_index)
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.tokens[row].append(token)
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self.tokens)):
            if not self.done[row]:
                self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text, used, reason = self.decoder.decode(self.tokens[row], final)
        if len(text) > self.sent[row]:
            if self.on_text is not None:
                self.on_text(self.request_index[row], text[self.sent[row] :])
            self.sent[row] = len(text)
        self.done[row] = reason is not None
        if reason is not None and self.on_finish is not None:
            tokens = self.tokens[row][:used]
            output = GenerationOutput(self.requests[row], text, tokens, reason)
            self.on_finish(self.request_index[row], output)


def _eos_ids(model: MultiLoraModel, tokenizer: Any) -> set[int]:
    configured = getattr(model.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def check_adapters(model: MultiLoraModel, names: Sequence[str | None]) -> None:
    """Raises MloraError naming the first adapter the model does not have."""
    for name in names:
        if name is not None and name not in model.specs:
            known = ", ".join(sorted(model.specs)) or "none loaded"
            raise MloraError(f"unknown adapter {name!r} (available: {known})")


def generate_batch(
    model: MultiLoraModel,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    on_text: TextCallback | None = None,
    request_index: Sequence[int] | None = None,
    on_finish: FinishCallback | None = None,
) -> list[GenerationOutput]:
    """Answer ``requests`` in ONE ``generate`` call; rows must already be grouped by adapter.

    Args:
        requests: the rows in batch order; equal adapters must be adjacent (see ``generate``).
        on_text: streaming callback ``(request_index[row], new_text)``.
        request_index: the index reported to the callbacks for each row (default: the row).
        on_finish: called with ``(request_index[row], output)`` as soon as a row has finished.

    Returns:
        One output per request, in the given order.
    """
    layout = BatchLayout.from_row_adapters([r.adapter for r in requests])
    if len(set(layout.adapters)) != len(layout.adapters):
        raise ValueError("requests must be grouped by adapter (equal adapters adjacent)")
    texts = [r.prompt for r in requests if r.prompt_ids is None]
    fresh = iter(encode_texts(tokenizer, texts))  # chat-rendered prompts: no second BOS
    encoded = [next(fresh) if r.prompt_ids is None else list(r.prompt_ids) for r in requests]
    if any(not ids for ids in encoded):
        raise MloraError("empty prompt: the tokenizer produced no tokens")
    pad_id = pad_token_id(tokenizer)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.empty((len(encoded), width), dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: every row's last prompt token at the end
        # Masked pads repeat the row's first token: the repetition penalty (which reads every
        # input id, masked or not) then sees only tokens the row really has — a pad id equal to
        # EOS would otherwise penalise EOS in padded rows only.
        input_ids[row, : width - len(ids)] = ids[0]
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    eos_ids = _eos_ids(model, tokenizer)
    decoder = _RowDecoder(tokenizer, eos_ids, params.stop)
    streamer = None
    if on_text is not None or on_finish is not None:
        index = list(request_index or range(len(requests)))
        streamer = _RowStreamer(decoder, requests, index, on_text, on_finish)
    sample = params.temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": sample,
        "num_beams": 1,
        "repetition_penalty": params.repetition_penalty,
        "pad_token_id": pad_id,
        "eos_token_id": sorted(eos_ids),
        "use_cache": True,
    }
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:  # override sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(decoder, width)])
    device = model.device
    was_training = model.training
    model.eval()
    try:
        # a seed must not disturb the caller's RNG; without one, sampling draws from it as usual
        with torch.random.fork_rng(
            devices=[] if device.type == "cpu" else [device],
            enabled=params.seed is not None,
            device_type=device.type,
        ):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with model.context.use(layout), torch.inference_mode():
                sequences = model.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    streamer=streamer,
                    **kwargs,
                )  # (B, width + new)
    finally:
        model.train(was_training)
    outputs = []
    # one device-to-host copy for the batch, not one per row
    for request, new_tokens in zip(requests, sequences[:, width:].tolist(), strict=True):
        text, used, reason = decoder.decode(new_tokens, final=True)
        outputs.append(GenerationOutput(request, text, new_tokens[:used], reason or "length"))
    return outputs


def generate(
    model: MultiLoraModel,
    tokenizer: Any,
    requests: Sequence[GenerationRequest | tuple[str, str | None]],
    params: SamplingParams | None = None,
    on_text: TextCallback | None = None,
    batch_size: int | None = None,
    on_finish: FinishCallback | None = None,
) -> list[GenerationOutput]:
    """Answer prompts with their adapters, several adapters side by side in each batch.

    Requests are grouped by adapter (stable) into layout segments, cut into batches of
    ``batch_size`` rows (``None``: one batch), and the outputs come back in request order.

    Args:
        requests: ``GenerationRequest``s or ``(prompt, adapter_or_None)`` pairs.
        on_text: streaming callback ``(request index, new text)``; the pieces of one request
            add up to its ``GenerationOutput.text``.
        on_finish: called with ``(request index, output)`` as soon as a request has finished
            (before the rest of its batch), e.g. to print streamed answers in request order.

    Raises:
        MloraError: an unknown adapter name, an empty prompt or an invalid sampling parameter.
    """
    params = params or SamplingParams()
    reqs = [r if isinstance(r, GenerationRequest) else GenerationRequest(*r) for r in requests]
    check_adapters(model, [r.adapter for r in reqs])
    first_seen: dict[str | None, int] = {}
    for r in reqs:
        first_seen.setdefault(r.adapter, len(first_seen))
    order = sorted(range(len(reqs)), key=lambda i: first_seen[reqs[i].adapter])
    size = batch_size or max(len(reqs), 1)
    results: list[GenerationOutput | None] = [None] * len(reqs)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = [reqs[i] for i in chunk]
        outs = generate_batch(model, tokenizer, batch, params, on_text, chunk, on_finish)
        for i, out in zip(chunk, outs, strict=True):
            results[i] = out
    return [r for r in results if r is not None]
