"""Conversations rendered with the tokenizer's own chat template, and which tokens carry loss.

A conversation is a list of ``{"role", "content"}`` messages (ShareGPT's ``{"from", "value"}``
is accepted, with its ``human`` / ``gpt`` role names). It is rendered by
``tokenizer.apply_chat_template`` (the model's own format, never ours) and the loss is taken on
the assistant turns only:

- a template with ``{% generation %}`` markers gives the mask itself
  (``return_assistant_tokens_mask``), exactly as TRL's ``SFTTrainer(assistant_only_loss=True)``;
- any other template: an assistant turn's tokens are those it adds after the generation prompt
  (``render(turns before it, add_generation_prompt=True)``), i.e. its content and end-of-turn:
  exactly the tokens the model produces when it answers at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlora.core.errors import DataError
from mlora.core.integrity import json_type

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
GENERATION_MARKER = "{% generation %}"

Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, where: str) -> None:
    """Raises:
    DataError: the tokenizer has no chat template (``where`` names the data file)."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{where}: conversational rows need a tokenizer with a chat template, and the "
            f"tokenizer of {name} has none (use a chat model, or alpaca / prompt-completion rows)"
        )


def normalize_messages(messages: Any, where: str) -> list[Message]:
    """``messages`` as ``[{"role", "content"}]``, ShareGPT's ``from`` / ``value`` translated.

    Raises:
        DataError: not a non-empty list of messages, an unknown role, a content that is not a
            string (``where`` names file, row and field).
    """
    if not isinstance(messages, list) or not messages:
        return _bad(where, f"must be a non-empty list of messages, not {json_type(messages)}")
    out = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            _bad(where, f"message {turn} is {json_type(message)}, not an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            _bad(where, f"message {turn} has an unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            _bad(where, f"message {turn} has no string 'content' (got {json_type(content)})")
        out.append({"role": role, "content": content})
    return out


def _bad(where: str, problem: str) -> Any:
    raise DataError(f"{where} {problem}")


def is_conversation(value: Any) -> bool:
    """A field holding messages (TRL's conversational formats) rather than plain text."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def chat_ids(tokenizer: Any, messages: Sequence[Message], **kwargs: Any) -> dict[str, Any]:
    """``apply_chat_template`` tokenized, as a dict with ``input_ids`` (TRL's ``_tokenize``)."""
    return dict(
        tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **kwargs)
    )


class ChatText(str):
    """Text rendered by a chat template. The template already wrote every special token it
    wants (a BOS, if any), so it is tokenized without the tokenizer adding its own, as
    ``apply_chat_template(tokenize=True)`` and TRL tokenize it: adding them would double a
    BOS the template emits, or put one the model never saw in training (``encode_texts``)."""


def chat_text(tokenizer: Any, messages: Sequence[Message]) -> ChatText:
    """The prompt text of ``messages`` with the assistant's generation prompt after it."""
    return ChatText(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )


def special_tokens_for(text: str) -> dict[str, bool]:
    """``tokenizer(text, **special_tokens_for(text))``: none added to ``ChatText``."""
    return {"add_special_tokens": False} if isinstance(text, ChatText) else {}


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids: ``tokenizer(texts)``, except that ``ChatText`` gets no special tokens
    added (its template wrote them), so a chat prompt's ids equal ``apply_chat_template``'s."""
    out: list[list[int]] = [[] for _ in texts]
    for chat in (False, True):
        picked = [i for i, t in enumerate(texts) if isinstance(t, ChatText) == chat]
        if picked:
            special = {"add_special_tokens": False} if chat else {}
            ids = tokenizer([str(texts[i]) for i in picked], **special)["input_ids"]
            for i, row in zip(picked, ids, strict=True):
                out[i] = list(row)
    return out


@dataclass(frozen=True)
class TokenizedConversation:
    """A rendered conversation: ``input_ids`` and ``mask`` (1 where the loss is taken)."""

    input_ids: list[int]
    mask: list[int]


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Message], where: str, assistant_only: bool = True
) -> TokenizedConversation:
    """Render ``messages`` with the chat template; the mask covers the assistant turns.

    Args:
        assistant_only: False: every token carries loss (TRL's default for ``messages``).

    Raises:
        DataError: no assistant turn, or a template that does not render the conversation
            prefix by prefix and has no generation markers.
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where} has no assistant turn (nothing to learn)")
    if not assistant_only:
        ids = chat_ids(tokenizer, messages)["input_ids"]
        return TokenizedConversation(ids, [1] * len(ids))
    if GENERATION_MARKER in str(tokenizer.chat_template):
        out = chat_ids(tokenizer, messages, return_assistant_tokens_mask=True)
        return TokenizedConversation(out["input_ids"], list(out["assistant_masks"]))
    ids = chat_ids(tokenizer, messages)["input_ids"]
    mask = [0] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, messages[:turn], ids, where, generation=True))
        end = len(_prefix(tokenizer, messages[: turn + 1], ids, where, generation=False))
        mask[start:end] = [1] * (end - start)
    return TokenizedConversation(ids, mask)


def _prefix(
    tokenizer: Any, messages: Sequence[Message], full: list[int], where: str, generation: bool
) -> list[int]:
    """The ids of the first turns of a conversation, checked to be a prefix of the whole."""
    if not messages:
        return []
    ids = chat_ids(tokenizer, messages, add_generation_prompt=generation)["input_ids"]
    if full[: len(ids)] != ids:
        raise DataError(
            f"{where}: the chat template does not render this conversation turn by turn (an "
            "earlier turn changes when later ones follow), so the assistant tokens cannot be "
            "found; give the template {% generation %} markers"
        )
    return ids


@dataclass(frozen=True)
class ChatPrompt:
    """Renders a prompt as one user turn of the tokenizer's chat template, with the generation
    prompt after it: how an adapter trained on conversations is asked (``PromptTemplate``'s
    ``render``). ``tokenizer`` is bound once it is loaded (``bind``).

    Raises:
        DataError: rendering with a tokenizer that has no chat template.
    """

    tokenizer: Any = None

    def bind(self, tokenizer: Any) -> ChatPrompt:
        return ChatPrompt(tokenizer)

    def render(self, instruction: str, input: str = "") -> str:
        if self.tokenizer is None:
            raise ValueError("ChatPrompt.render before bind(tokenizer)")
        require_chat_template(self.tokenizer, "the chat prompt")
        content = f"{instruction}\n\n{input}" if input else instruction
        return chat_text(self.tokenizer, [{"role": "user", "content": content}])


def bind_templates(templates: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``templates`` (prompt templates by adapter) with every ``ChatPrompt`` bound to
    ``tokenizer``; the others as they are."""
    return {
        name: t.bind(tokenizer) if isinstance(t, ChatPrompt) else t for name, t in templates.items()
    }
