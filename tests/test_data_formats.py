"""Chat, prompt-completion, text and preference rows tokenize exactly as TRL's trainers do.

The reference is TRL itself: ``SFTTrainer`` (``assistant_only_loss=True`` for conversations,
its default completion-only loss for prompt-completion) and ``DPOTrainer`` build their training
datasets from the same rows with the same tokenizer, and mlora's ids and labels must equal
theirs — on the tiny character tokenizer and on SmolLM2-135M-Instruct's own tokenizer and chat
template. TRL needs ``{% generation %}`` markers to find assistant tokens; mlora also reads
templates without them (the tokens an assistant turn adds after the generation prompt), so the
stock template is compared with TRL given the same template with markers around exactly what
the assistant writes (its content and end of turn).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
from typing import Any

import pytest

from mlora.config.schema import parse_config
from mlora.core.errors import ConfigError, DataError
from mlora.data.dataset import tokenize_dataset
from mlora.data.formats import detect_format
from mlora.data.prompts import load_template
from mlora.model.base_model import SMOLLM2_PACKAGE
from mlora.training.trainer import prepare_data
from tests.conftest import make_model, make_tokenizer
from tests.helpers import write_json

trl = pytest.importorskip("trl")

CUTOFF = 96
# A small chat format for the character tokenizer, with and without TRL's generation markers.
TINY_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' }}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
TINY_MARKED = TINY_TEMPLATE.replace(
    "{{ m['content'] + eos_token + '\n' }}",
    "{% generation %}{{ m['content'] + eos_token + '\n' }}{% endgeneration %}",
)
# The same, opening with the tokenizer's BOS as Llama / Mistral / Gemma templates do (the tiny
# tokenizer also adds a BOS itself: tokenizing the rendered text naively doubles it).
TINY_BOS = "{{ bos_token }}" + TINY_TEMPLATE
TINY_BOS_MARKED = "{{ bos_token }}" + TINY_MARKED
# SmolLM2-135M-Instruct's template with markers around each assistant turn's content + end.
SMOL_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"},
    ],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}],
]
MESSAGES = [{"messages": c} for c in CONVERSATIONS]
SHAREGPT = [
    {"conversations": [{"from": m["role"], "value": m["content"]} for m in c]}
    for c in CONVERSATIONS
]
PROMPT_COMPLETION = [
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": "Two and two make", "completion": " four"},
]
CHAT_PROMPT_COMPLETION = [
    {"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS
]  # fmt: skip
TEXT = [{"text": "Once upon a time there was a cat."}, {"text": "The end"}]
PREFERENCE = [
    {"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Colour of grass:", "chosen": " green", "rejected": " blue, maybe"},
]
CHAT_PREFERENCE = [
    {
        "prompt": [{"role": "user", "content": "1+1?"}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "11"}],
    }
]


@pytest.fixture(autouse=True)
def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)


def tiny_tokenizer(template: str = TINY_TEMPLATE) -> Any:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def trl_sft_rows(tokenizer: Any, rows: list[dict], **options: Any) -> list[tuple[list, list]]:
    """(input_ids, labels) of each row as TRL's SFTTrainer prepares its training dataset."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make_model(vocab_size=len(tokenizer), hidden=16, layers=1)
    with tempfile.TemporaryDirectory() as folder:
        args = SFTConfig(
            output_dir=folder, max_length=CUTOFF, report_to=[], use_cpu=True, **options
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]


def ours(tokenizer: Any, rows: list[dict], train_on_inputs: bool = False) -> list[tuple]:
    _, tokenized = tokenize_dataset(
        rows, tokenizer, load_template("alpaca"), CUTOFF, train_on_inputs=train_on_inputs
    )
    return [(r.input_ids, r.labels) for r in tokenized]


CASES = {
    "messages": (MESSAGES, TINY_MARKED, {"assistant_only_loss": True}),
    "sharegpt": (SHAREGPT, TINY_MARKED, {"assistant_only_loss": True}),
    "prompt_completion": (PROMPT_COMPLETION, TINY_TEMPLATE, {}),
    "chat_prompt_completion": (CHAT_PROMPT_COMPLETION, TINY_TEMPLATE, {}),
    "messages_bos_template": (MESSAGES, TINY_BOS_MARKED, {"assistant_only_loss": True}),
    "chat_prompt_completion_bos_template": (CHAT_PROMPT_COMPLETION, TINY_BOS, {}),
    "text": (TEXT, TINY_TEMPLATE, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_tokenizer_rows_equal_trl_sft(case: str) -> None:
    rows, template, options = CASES[case]
    tokenizer = tiny_tokenizer(template)
    # ShareGPT rows: TRL's own conversion to messages first (its trainer checks the raw keys)
    converted = [trl.maybe_convert_to_chatml(copy.deepcopy(r)) for r in rows]
    expected = trl_sft_rows(tokenizer, converted, **options)
    assert ours(tokenizer, rows) == expected
    assert any(label == -100 for _, labels in expected for label in labels) or case == "text"


@pytest.mark.parametrize("template", [TINY_TEMPLATE, TINY_BOS], ids=["no_bos", "bos"])
def test_chat_prompts_are_tokenized_as_the_chat_template_tokenizes_them(template: str) -> None:
    """A prompt rendered by the chat template (generation, evaluation) gets no second BOS from
    the tokenizer: its ids are ``apply_chat_template(tokenize=True)``'s, the ids TRL trains on
    (the tiny tokenizer adds a BOS to plain text; one template writes one itself)."""
    from mlora.data.chat import ChatPrompt, encode_texts
    from mlora.inference.test_sets import choice_rows

    tokenizer = tiny_tokenizer(template)
    turn = [{"role": "user", "content": "Opposite of up?"}]
    expected = tokenizer.apply_chat_template(
        turn, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    prompt = ChatPrompt(tokenizer).render("Opposite of up?")
    assert expected.count(tokenizer.bos_token_id) == template.count("bos_token")
    ids, plain = encode_texts(tokenizer, [prompt, "plain text"])
    assert ids == expected
    assert plain == tokenizer("plain text")["input_ids"]  # other text: the tokenizer's own rule
    (row,) = choice_rows(tokenizer, prompt, ["down"], 200, "row 0")
    assert row.input_ids[: len(expected)] == expected
    assert row.labels == [-100] * len(expected) + row.input_ids[len(expected) :]


def test_template_without_markers_masks_what_the_assistant_writes() -> None:
    """The stock template (no markers) gives TRL's mask under the marked one, and the full
    conversation with train_on_inputs gives TRL's default (every token)."""
    expected = trl_sft_rows(tiny_tokenizer(TINY_MARKED), MESSAGES, assistant_only_loss=True)
    assert ours(tiny_tokenizer(), MESSAGES) == expected
    everything = trl_sft_rows(tiny_tokenizer(), MESSAGES)
    assert ours(tiny_tokenizer(), MESSAGES, train_on_inputs=True) == everything


def test_preference_pairs_equal_trl_dpo() -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    for rows in (PREFERENCE, CHAT_PREFERENCE):
        tokenizer = tiny_tokenizer()
        model = make_model(vocab_size=len(tokenizer), hidden=16, layers=1)
        with tempfile.TemporaryDirectory() as folder:
            args = DPOConfig(output_dir=folder, max_length=CUTOFF, report_to=[], use_cpu=True)
            trainer = DPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model),
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
            )
            theirs = list(trainer.train_dataset)
        fmt, tokenized = tokenize_dataset(rows, tokenizer, load_template("alpaca"), CUTOFF)
        assert fmt == "preference" and len(tokenized) == 2 * len(rows)
        for pair, example in enumerate(theirs):
            prompt = example["prompt_ids"]
            pair_rows = tokenized[2 * pair : 2 * pair + 2]
            for row, key in zip(pair_rows, ("chosen_ids", "rejected_ids"), strict=True):
                assert row.input_ids == prompt + example[key]
                assert row.labels == [-100] * len(prompt) + example[key]


@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_PACKAGE) is None, reason="no SmolLM2")
def test_smollm2_chat_template_equals_trl() -> None:
    from mlora.model.loading import load_tokenizer

    stock = load_tokenizer("smollm2")
    marked = load_tokenizer("smollm2")
    marked.chat_template = SMOL_MARKED
    for conversation in CONVERSATIONS:  # the markers mark; they change no text
        assert stock.apply_chat_template(conversation, tokenize=False) == (
            marked.apply_chat_template(conversation, tokenize=False)
        )
    expected = trl_sft_rows(marked, MESSAGES, assistant_only_loss=True)
    assert ours(stock, MESSAGES) == expected
    assert ours(stock, SHAREGPT) == expected  # ShareGPT: TRL's conversion gives MESSAGES
    for rows in (CHAT_PROMPT_COMPLETION, PROMPT_COMPLETION, TEXT):
        assert ours(stock, rows) == trl_sft_rows(stock, rows)


def test_formats_are_detected_from_the_first_row() -> None:
    from mlora.config import schema
    from mlora.data import formats

    assert schema.DATA_FORMATS == formats.DATA_FORMATS  # the config accepts what data reads
    found = [
        detect_format(rows, "x")
        for rows in (MESSAGES, SHAREGPT, PROMPT_COMPLETION, TEXT, PREFERENCE)
    ]
    assert found == ["messages", "messages", "prompt_completion", "text", "preference"]
    assert detect_format([{"instruction": "a", "output": "b"}], "x") == "alpaca"


BAD_ROWS = {
    "unknown role": (
        [{"messages": [{"role": "robot", "content": "x"}]}],
        "row 0: field 'messages' message 0 has an unknown role 'robot'",
    ),
    "no assistant": (
        [{"messages": [{"role": "user", "content": "x"}]}],
        "row 0 has no assistant turn",
    ),
    "no rejected": (
        [*PREFERENCE, {"prompt": "p", "chosen": "c"}],
        "row 2 is missing the field 'rejected'",
    ),
    "mixed kinds": (
        [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}],
        "row 0: field 'prompt' must be a non-empty list of messages, not a string",
    ),
    "no known field": ([{"question": "x"}], "row 0 has none of the fields"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_file_and_row(case: str) -> None:
    rows, message = BAD_ROWS[case]
    with pytest.raises(DataError, match=r"^data\.json: " + message.replace("+", r"\+")):
        tokenize_dataset(
            rows, tiny_tokenizer(), load_template("alpaca"), CUTOFF, source="data.json"
        )


def test_conversations_need_a_chat_template() -> None:
    with pytest.raises(DataError, match=r"^data\.json: conversational rows need a tokenizer with"):
        tokenize_dataset(
            MESSAGES, make_tokenizer(), load_template("alpaca"), 64, source="data.json"
        )


def test_data_format_and_objective_must_fit_the_data(tmp_path) -> None:
    data = write_json(tmp_path / "pairs.json", PREFERENCE)
    chat = write_json(tmp_path / "chat.json", MESSAGES)

    def prepare(**adapter: Any) -> Any:
        raw = {"cutoff_len": 64, "lora": [{"name": "a", "data": data, **adapter}]}
        return prepare_data(parse_config(raw), tiny_tokenizer())

    with pytest.raises(ConfigError, match=r"preference rows .* need key 'objective'"):
        prepare()
    with pytest.raises(ConfigError, match="key 'objective' 'dpo' needs preference rows"):
        prepare(data=chat, objective="dpo")
    with pytest.raises(DataError, match="row 0 is missing the field 'messages'"):
        prepare(data_format="messages")
    with pytest.raises(ConfigError, match="key 'objective' 'dpo' needs preference rows"):
        prepare(data_format="text", objective="dpo")
    with pytest.raises(ConfigError, match="key 'gamma' does not apply to objective 'dpo'"):
        prepare(objective="dpo", gamma=1.0)
    with pytest.raises(ConfigError, match="key 'label_smoothing' applies to loss_type 'sigmoid'"):
        prepare(objective="dpo", loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="key 'data_format' must be one of"):
        prepare(data_format="chatml")
    assert len(prepare(objective="dpo")["a"]) == 2 * len(PREFERENCE)


def test_chat_adapters_are_asked_through_the_chat_template(tmp_path) -> None:
    """generate.py --template auto / chat, and evaluation, render a chat adapter's prompts
    with the tokenizer's chat template (the generation prompt after the user turn)."""
    import argparse

    from mlora.cli.generate import build_requests
    from mlora.data.chat import ChatPrompt
    from mlora.data.prompts import PromptTemplate
    from mlora.inference.test_sets import prepare_test_sets
    from mlora.inference.trained import config_templates

    tokenizer = tiny_tokenizer()
    chat = write_json(tmp_path / "chat.json", MESSAGES)
    alpaca = write_json(tmp_path / "alpaca.json", [{"instruction": "hi", "output": "yo"}])
    config = parse_config(
        {
            "lora": [
                {"name": "chat", "data": chat, "test_data": chat},
                {"name": "plain", "data": alpaca},
            ]
        }
    )
    templates = config_templates(config)
    assert isinstance(templates["chat"], ChatPrompt)
    assert isinstance(templates["plain"], PromptTemplate)
    args = argparse.Namespace(
        prompts=["Opposite of up?"], prompts_file=None, use=["chat", "plain"], template="auto"
    )
    requests = build_requests(args, ["chat", "plain"], templates, tokenizer)
    user_turn = [{"role": "user", "content": "Opposite of up?"}]
    expected = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    assert [r.prompt for r in requests] == [
        expected,
        templates["plain"].render("Opposite of up?"),
    ]
    args.template, args.use = "chat", ["plain"]
    assert build_requests(args, ["chat", "plain"], templates, tokenizer)[0].prompt == expected

    (test_set,) = prepare_test_sets(config, tokenizer, ["chat"])
    assert test_set.references == ["6, of course", "hi there"]
    assert test_set.prompts[1] == tokenizer.apply_chat_template(
        CONVERSATIONS[1][:1], tokenize=False, add_generation_prompt=True
    )
