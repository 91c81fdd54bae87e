"""lm-evaluation-harness's model ``mlora``: every mlora adapter kind under the harness's own tasks.

``lm_eval --model mlora --model_args pretrained=BASE,adapters=D/a;D/b`` scores the harness's
requests with mlora's ``MultiLoraModel``: LoRA, DoRA, MixLoRA, LoRAMoE, MoLA and MeteoRA
adapters (read from their PEFT-format folders), or the base model alone (no ``adapters``).

The three request kinds follow ``lm_eval.models.huggingface.HFLM`` token for token (the same
tokenization, left truncation, rolling windows and stop-sequence handling, through the harness's
own helpers), so the harness's metrics mean the same thing for both models:

- ``loglikelihood``: ``(context, continuation)`` -> (sum of the continuation's token
  log-probabilities, whether greedy decoding gives the continuation). The rows go through
  ``collate`` and ``MultiLoraModel.supervised_logits``, like mlora's own evaluation.
- ``loglikelihood_rolling``: the harness's disjoint rolling windows, summed.
- ``generate_until``: mlora's ``generate`` (greedy unless the task samples), cut at the stops.

Several adapters: every request is answered by EVERY adapter of the session, the rows of all
adapters side by side in the same batches (one layout segment each), and the answers are kept
per adapter. The harness itself reports one model per run, so the adapter it sees is the
``adapter`` argument (required with several adapters); ``mlora.inference.harness_run`` runs
the harness's evaluation once per adapter over one session, and from the second adapter on
every answer is already there. Importing this module registers the model with the harness.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from mlora.config.adapter_names import adapter_name_problem
from mlora.core.errors import MloraError
from mlora.data.rows import pad_token_id
from mlora.inference.generation import GenerationRequest, SamplingParams, generate
from mlora.inference.harness_scoring import score_labels_like_hf, score_packed
from mlora.model.multi_lora import MultiLoraModel

logger = logging.getLogger("mlora")

MODEL_NAME = "mlora"
BASE_LABEL = "base"  # the label of the base model's answers when no adapter is given
DEFAULT_MAX_LENGTH = 2048  # as HFLM, when neither the config nor the tokenizer gives one
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "auto": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
# generation kwargs a task may set and how they map onto mlora's SamplingParams
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def parse_adapters(value: str | None) -> dict[str, Path]:
    """``adapters=`` as ``{name: folder}``: ``D/a;D/b`` (named after their folders) or
    ``a=D/a;b=D/b``. Empty or None: no adapter (the base model alone).

    Raises:
        MloraError: an unusable or repeated name (naming it).
    """
    found: dict[str, Path] = {}
    for item in (value or "").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, folder = item.partition("=")
        path = Path(folder.strip() if sep else item)
        name = name.strip() if sep else path.name
        problem = adapter_name_problem(name)
        if problem:
            raise MloraError(f"model_args adapters: adapter name {name!r}: {problem}")
        if name in found:
            raise MloraError(f"model_args adapters: adapter {name!r} is given twice")
        found[name] = path
    return found


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise MloraError(f"model_args {key}: expected an integer >= 1, got {value!r}")
    return number


@dataclass
class HarnessSession:
    """A loaded model with its adapters and every answer given so far, per adapter label.

    Attributes:
        model: the base with the adapters attached.
        labels: the adapters' names in order, or ``[BASE_LABEL]`` for the base alone.
        scoring: the labels each new request is answered for (default: all).
        answers: ``{label: {request key: answer}}``.
        info: what ``get_model_info`` reports (base model, adapter folders).
        exact: score log-likelihoods in the hf model's shapes (``harness_exact``), not packed.
    """

    model: MultiLoraModel
    tokenizer: Any
    labels: list[str]
    batch_size: int = 8
    max_length: int = DEFAULT_MAX_LENGTH
    max_gen_toks: int = 256
    add_bos_token: bool | None = None
    exact: bool = False
    scoring: list[str] = field(default_factory=list)
    answers: dict[str, dict[Hashable, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scoring = self.scoring or list(self.labels)
        for label in self.labels:
            self.answers.setdefault(label, {})

    def adapter_of(self, label: str) -> str | None:
        """The adapter a label stands for (None: the base model)."""
        return None if label == BASE_LABEL and label not in self.model.specs else label

    def score(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], rolling: bool = False
    ) -> dict[str, list[tuple[float, bool]]]:
        """``(context, continuation)`` tokens -> (log-likelihood, greedy?) per scoring label:
        packed (``score_packed``), or with ``exact`` in the hf model's shapes."""
        adapters = {label: self.adapter_of(label) for label in self.scoring}
        if not self.exact:
            pad = pad_token_id(self.tokenizer)
            return score_packed(self.model, adapters, pairs, self.batch_size, self.max_length, pad)
        return score_labels_like_hf(
            self.model, adapters, pairs, self.batch_size, self.max_length, rolling
        )


def load_session(
    pretrained: str,
    adapters: dict[str, Path],
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    **settings: Any,
) -> HarnessSession:
    """Load ``pretrained`` with ``{name: folder}`` adapters (the base alone when empty).

    ``settings``: ``HarnessSession`` fields (batch_size, max_length, max_gen_toks, add_bos_token).

    Raises:
        MloraError: a missing adapter folder or base model, a bad device or dtype (one line).
    """
    from mlora.inference.trained import load_trained
    from mlora.model.base_model import resolve_base_model
    from mlora.model.loading import check_base_model_path, plan_base_load

    plan = plan_base_load(device, dtype, quantize, attn_implementation)
    base = resolve_base_model(pretrained)
    check_base_model_path(base)
    model, tokenizer = load_trained(base, adapters, trust_remote_code=trust_remote_code, plan=plan)
    return session_for(
        model,
        tokenizer,
        list(adapters),
        info={"base_model": str(pretrained), "adapters": {k: str(v) for k, v in adapters.items()}},
        **settings,
    )


def session_for(
    model: MultiLoraModel,
    tokenizer: Any,
    labels: Sequence[str],
    max_length: int | None = None,
    **settings: Any,
) -> HarnessSession:
    """A session over an already loaded model; ``labels``: its adapters to answer with (none:
    the base model). ``max_length`` None: the harness's rule (config, tokenizer, 2048)."""
    if max_length is None:
        max_length = resolve_max_length(model.model.config, tokenizer, default=DEFAULT_MAX_LENGTH)
    return HarnessSession(
        model.eval(), tokenizer, list(labels) or [BASE_LABEL], max_length=max_length, **settings
    )


# --- the harness's model ----------------------------------------------------------------------

# ``share_sessions`` fills this: one session per model arguments (all but ``adapter``), so a
# harness run per adapter loads the model once and reuses the answers of the first run.
_SHARED: dict[str, HarnessSession] | None = None


@contextmanager
def share_sessions() -> Iterator[None]:
    """While active, ``MloraLM``s built from equal model arguments share one session."""
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


@register_model(MODEL_NAME)
class MloraLM(TemplateLM):
    """The harness's view of a session: the answers of one adapter label.

    Args (``--model_args``, all strings on the command line):
        pretrained: the base model (folder, hub id, GGUF file or ``smollm2``).
        adapters: ``D/a;D/b`` or ``a=D/a;b=D/b``; none: the base model alone.
        adapter: whose answers the harness gets; required with several adapters (else an
            error naming ``mlora-lm-eval``, which runs the harness once per adapter).
        dtype: float32 (default), bfloat16, float16. device: cpu, cuda, mps (default: best).
        batch_size: requests per pass; each pass holds them once per adapter.
        max_length, max_gen_toks, add_bos_token: as the harness's ``hf`` model.
        exact: log-likelihoods in the ``hf`` model's batch shapes (``harness_exact``).
        quantize (4bit/8bit), attn_implementation, trust_remote_code: as mlora's loading.

    Raises:
        MloraError: an unknown argument or a bad value (naming it).
    """

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        try:
            self._open(**model_args)
        except MloraError as exc:
            _exit_under_lm_eval_cli(exc)
            raise

    def _open(
        self,
        pretrained: str | None = None,
        adapters: str | None = None,
        adapter: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        trust_remote_code: bool | str = False,
        quantize: str | None = None,
        attn_implementation: str | None = None,
        exact: bool | str = False,
        session: HarnessSession | None = None,
        max_batch_size: Any = None,  # the harness passes it; sizes are not searched here
        **unknown: Any,
    ) -> None:
        if unknown:
            raise MloraError(
                f"model_args {sorted(unknown)[0]!r} is not an argument of --model {MODEL_NAME}"
            )
        if session is None:
            if not pretrained:
                raise MloraError(f"--model {MODEL_NAME} needs model_args pretrained=BASE_MODEL")
            if str(dtype).lower() not in DTYPES:
                raise MloraError(f"model_args dtype: expected one of {', '.join(DTYPES)}")
            names = parse_adapters(adapters)
            if len(names) > 1 and not adapter:
                raise MloraError(
                    f"model_args adapters gives {len(names)} adapters ({', '.join(names)}) and "
                    "the harness reports one model per run: add adapter=NAME to model_args, or "
                    "run mlora-lm-eval, which runs lm-eval once per adapter over one model load"
                )
            if str(batch_size).startswith("auto"):
                batch_size = 8
            settings = {
                "batch_size": _positive_int("batch_size", batch_size),
                "max_length": None
                if max_length is None
                else _positive_int("max_length", max_length),
                "max_gen_toks": _positive_int("max_gen_toks", max_gen_toks),
                "add_bos_token": None
                if add_bos_token is None
                else _truthy(add_bos_token, "add_bos_token"),
                "exact": _truthy(exact, "exact"),
            }
            load = {
                "pretrained": str(pretrained), "adapters": names,
                "dtype": DTYPES[str(dtype).lower()], "device": device,
                "trust_remote_code": _truthy(trust_remote_code, "trust_remote_code"),
                "quantize": quantize,
                "attn_implementation": attn_implementation,
            }  # fmt: skip
            session = _shared_session(load, settings)
        self.session = session
        self.tokenizer = session.tokenizer
        self.active = adapter or session.labels[0]
        if self.active not in session.labels:
            raise MloraError(
                f"model_args adapter {self.active!r} is not among the adapters "
                f"({', '.join(session.labels)})"
            )
        self._device = session.model.device

    # --- what the harness reads -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS: what an empty context is conditioned on (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.session.max_length

    @property
    def max_gen_toks(self) -> int:
        return self.session.max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.session.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        return {**self.session.info, "adapter": self.active}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """HFLM's rule: ``add_bos_token`` decides special tokens unless told; a string that
        already starts with BOS gets none."""
        if add_special_tokens is None:
            add_special_tokens = self.session.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    # --- the three request kinds ------------------------------------------------------------

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        return self._answered("loglikelihood", pairs, self._score_pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        strings = [(r.args[0],) for r in requests]
        return self._answered("loglikelihood_rolling", strings, self._score_rolling)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        items = [(r.args[0], r.args[1]) for r in requests]
        return self._answered("generate_until", items, self._generate)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """The harness's token-level entry: the active adapter's answers to token pairs."""
        scored = self.session.score([(ctx, cont) for _, ctx, cont in requests])
        return scored[self.active]

    def _answered(
        self,
        kind: str,
        args: list[tuple[Any, ...]],
        compute: Callable[[list[tuple[Any, ...]]], dict[str, list[Any]]],
    ) -> list[Any]:
        """The active adapter's answers to ``args``; those not given yet are computed first,
        for every scoring label at once, and kept."""
        keys = [(kind, *_hashable(a)) for a in args]
        mine = self.session.answers[self.active]
        missing: dict[Hashable, tuple[Any, ...]] = {}
        for key, arg in zip(keys, args, strict=True):
            if key not in mine:
                missing.setdefault(key, arg)
        if missing:
            labels = list(dict.fromkeys([self.active, *self.session.scoring]))
            computed = compute_for(self.session, labels, lambda: compute(list(missing.values())))
            for label, answers in computed.items():
                self.session.answers[label].update(zip(missing, answers, strict=True))
        out = [mine[key] for key in keys]
        for arg, answer in zip(args, out, strict=True):
            self.cache_hook.add_partial(kind, arg, answer)
        return out

    def _score_pairs(self, pairs: list[tuple[Any, ...]]) -> dict[str, list[tuple[float, bool]]]:
        """``(context, continuation)`` strings tokenized as ``TemplateLM.loglikelihood`` does."""
        tokens = []
        for context, continuation in pairs:
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                first = self.prefix_token_id
                tokens.append(([first], cont) if first != cont[0] else (cont[:1], cont[1:]))
            else:
                tokens.append(self._encode_pair(context, continuation))
        return self.session.score(tokens)

    def _score_rolling(self, strings: list[tuple[Any, ...]]) -> dict[str, list[float]]:
        """Each string's log-likelihood over the harness's disjoint rolling windows."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(strings):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        scored = self.session.score(windows, rolling=True)
        out: dict[str, list[float]] = {}
        for label, answers in scored.items():
            totals = [0.0] * len(strings)
            for owner, (logprob, _) in zip(owners, answers, strict=True):
                totals[owner] += logprob
            out[label] = totals
        return out

    def _generate(self, items: list[tuple[Any, ...]]) -> dict[str, list[str]]:
        """Greedy (or sampled, as the task asks) continuations, grouped by generation kwargs."""
        session = self.session
        out: dict[str, list[str]] = {label: [""] * len(items) for label in session.scoring}
        by_kwargs: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(items):
            by_kwargs.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(
                index
            )
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for indices in by_kwargs.values():
            kwargs = dict(normalize_gen_kwargs(items[indices[0]][1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise MloraError(
                    f"max_gen_toks {max_new} must be less than the model's max_length "
                    f"{self.max_length}"
                )
            params = sampling_params(kwargs, max_new, until)
            prompts = {i: self._prompt_ids(items[i][0], self.max_length - max_new) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), session.batch_size):
                chunk = order[start : start + session.batch_size]
                requests = [
                    GenerationRequest(items[i][0], session.adapter_of(label), prompts[i])
                    for label in session.scoring
                    for i in chunk
                ]
                outputs = iter(generate(session.model, self.tokenizer, requests, params))
                for label in session.scoring:
                    for i in chunk:
                        text = next(outputs).text
                        out[label][i] = postprocess_generated_text(text, until, None)
        return out

    def _prompt_ids(self, context: str, max_tokens: int) -> tuple[int, ...]:
        """A generation prompt's tokens as HFLM's ``tok_batch_encode`` makes them, cut from the
        left to ``max_tokens``."""
        special: dict[str, bool] = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.session.add_bos_token is not None:
            special = {"add_special_tokens": self.session.add_bos_token}
        return tuple(self.tokenizer(context, **special)["input_ids"][-max_tokens:])


def compute_for(
    session: HarnessSession, labels: list[str], compute: Callable[[], dict[str, list[Any]]]
) -> dict[str, list[Any]]:
    """Run ``compute`` with ``session.scoring`` set to ``labels`` (restored afterwards)."""
    before = session.scoring
    session.scoring = labels
    try:
        return compute()
    finally:
        session.scoring = before


def sampling_params(
    kwargs: dict[str, Any], max_new_tokens: int, until: list[str]
) -> SamplingParams:
    """A task's normalized generation kwargs as mlora's ``SamplingParams``.

    Raises:
        MloraError: a generation kwarg mlora's generation does not have (naming it).
    """
    extra = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if extra:
        raise MloraError(
            f"generation kwarg {extra[0]!r} is not supported by --model {MODEL_NAME} "
            f"(supported: {', '.join(SAMPLING_KEYS)}, until, max_gen_toks)"
        )
    sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
        top_p=float(kwargs.get("top_p") or 1.0),
        top_k=int(kwargs.get("top_k") or 0),
        repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
        stop=tuple(s for s in until if s),
    )


def _exit_under_lm_eval_cli(exc: MloraError) -> None:
    """Under lm-eval's own command line (``lm_eval --model mlora``, which lets exceptions out as
    tracebacks), a bad model argument ends the process with its one line, as mlora's commands
    do; anywhere else (Python, ``mlora-lm-eval``) the error is raised to the caller."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("lm_eval", "lm-eval") or sys.argv[0].endswith("lm_eval/__main__.py"):
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _hashable(value: Any) -> tuple[Any, ...]:
    """A request's arguments as a dictionary key (generation kwargs as sorted JSON)."""
    return tuple(
        json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict | list) else v
        for v in value
    )


def _truthy(value: bool | str, key: str) -> bool:
    """A boolean model_arg; a word that is neither true nor false is one line naming the key
    (not a silent false)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "true", "yes"):
        return True
    if word in ("0", "false", "no"):
        return False
    raise MloraError(f"model_args {key}: expected true or false, got {value!r}")


def _shared_session(load: dict[str, Any], settings: dict[str, Any]) -> HarnessSession:
    """A new session, or under ``share_sessions`` the one built from equal arguments."""
    key = json.dumps({**load, **settings}, sort_keys=True, default=str)
    if _SHARED is not None and key in _SHARED:
        return _SHARED[key]
    session = load_session(**load, **settings)
    if _SHARED is not None:
        _SHARED[key] = session
    return session
