"""Mixed-adapter batched generation against PEFT's generate (one adapter at a time, no padding)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mlora.core.errors import MloraError
from mlora.inference.generation import GenerationRequest, SamplingParams, generate
from mlora.inference.trained import load_trained
from tests.eval_support import ADAPTERS, trained  # noqa: F401  (session fixture)
from tests.helpers import peft_greedy

PROMPTS = ["add 3 4=", "rev owl=", "up bee=", "dup cat=", "add 12 1=", "rev lion=", "hello"]


@pytest.fixture(scope="module")
def loaded(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    model, tokenizer = load_trained(str(tiny_model_dir), {n: out / n for n in ADAPTERS})
    return model, tokenizer


@pytest.fixture(scope="module")
def peft_model(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(out / name, adapter_name=name)
    return model.eval()


def mixed_requests() -> list[GenerationRequest]:
    """Adapters interleaved (not grouped) plus base-model rows; prompts of different lengths."""
    names = [*ADAPTERS, None]
    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(12)]


def test_adapters_are_trained(loaded):
    model, _ = loaded
    for name in ADAPTERS:
        assert all(m.lora_B.weight.abs().max() > 0 for _, m in model.adapter_modules(name))


@pytest.mark.parametrize(("penalty", "pad_is_eos"), [(1.0, False), (1.3, False), (2.0, True)])
def test_mixed_batch_greedy_equals_peft(loaded, peft_model, penalty, pad_is_eos):
    model, tokenizer = loaded
    if pad_is_eos:  # tokenizers without a pad token (LLaMA) pad with EOS
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    requests = mixed_requests()
    params = SamplingParams(max_new_tokens=12, repetition_penalty=penalty)
    outputs = generate(model, tokenizer, requests, params)
    assert [o.request for o in outputs] == requests
    for out in outputs:
        expected = peft_greedy(
            peft_model, tokenizer, out.request.prompt, out.request.adapter,
            repetition_penalty=penalty,
        )  # fmt: skip
        eos = tokenizer.eos_token_id
        assert out.token_ids == expected[: len(out.token_ids)]
        assert len(out.token_ids) == len(expected) or expected[len(out.token_ids) - 1] == eos
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    # the adapters really change the answers (otherwise the comparison above proves little)
    answers = {o.request.adapter: o.token_ids for o in outputs if o.request.prompt == PROMPTS[0]}
    assert len({tuple(v) for v in answers.values()}) > 1 or len(answers) == 1


def test_adapters_answer_differently_on_one_prompt(loaded):
    model, tokenizer = loaded
    requests = [("rev owl=", n) for n in [*ADAPTERS, None]]
    outs = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=12))
    assert len({tuple(o.token_ids) for o in outs}) >= 3


def test_batch_size_and_order_do_not_change_outputs(loaded):
    model, tokenizer = loaded
    requests = mixed_requests()
    params = SamplingParams(max_new_tokens=8)
    whole = generate(model, tokenizer, requests, params)
    chunked = generate(model, tokenizer, requests, params, batch_size=5)
    reversed_ = generate(model, tokenizer, requests[::-1], params)[::-1]
    assert [o.token_ids for o in whole] == [o.token_ids for o in chunked]
    assert [o.token_ids for o in whole] == [o.token_ids for o in reversed_]


def test_stop_strings_and_streaming(loaded):
    model, tokenizer = loaded
    requests = mixed_requests()
    free = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=12))
    stop = next(o.text[2:4] for o in free if len(o.text) >= 6)
    pieces: dict[int, str] = {}

    def on_text(index: int, text: str) -> None:
        pieces[index] = pieces.get(index, "") + text

    params = SamplingParams(max_new_tokens=12, stop=(stop,))
    stopped = generate(model, tokenizer, requests, params, on_text=on_text)
    for i, (f, s) in enumerate(zip(free, stopped, strict=True)):
        cut = f.text.find(stop)
        if cut >= 0:
            assert s.text == f.text[:cut] and s.finish_reason == "stop"
            assert f.token_ids[: len(s.token_ids)] == s.token_ids
        else:
            assert s.text == f.text and s.finish_reason == f.finish_reason
        assert pieces.get(i, "") == s.text
    assert any(s.finish_reason == "stop" for s in stopped)


def test_sampling_is_seeded_and_top_k_1_is_greedy(loaded):
    model, tokenizer = loaded
    requests = mixed_requests()
    greedy = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=8))
    top1 = generate(
        model, tokenizer, requests, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1)
    )
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    hot = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=5)
    a = generate(model, tokenizer, requests, hot)
    b = generate(model, tokenizer, requests, hot)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_bad_input_is_one_line(loaded):
    model, tokenizer = loaded
    with pytest.raises(MloraError, match="unknown adapter 'nope'") as info:
        generate(model, tokenizer, [("x", "add"), ("y", "nope")])
    assert "\n" not in str(info.value)
    with pytest.raises(MloraError, match="top_p"):
        SamplingParams(top_p=0)


def test_missing_adapter_folder(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(MloraError, match="adapter 'ghost'"):
        load_trained(str(tiny_model_dir), {"ghost": tmp_path / "ghost"})


def test_unseeded_sampling_draws_from_the_global_rng(loaded):
    model, tokenizer = loaded
    requests = mixed_requests()
    hot = SamplingParams(max_new_tokens=8, temperature=1.5)
    torch.manual_seed(11)
    unseeded = generate(model, tokenizer, requests, hot)
    after = torch.rand(1)
    seeded = generate(model, tokenizer, requests, replace(hot, seed=11))
    assert [o.token_ids for o in unseeded] == [o.token_ids for o in seeded]
    torch.manual_seed(11)
    assert not torch.equal(torch.rand(1), after)  # the unseeded call advanced the global RNG


def grouped_requests() -> list[GenerationRequest]:
    """mixed_requests() in the row order ``generate`` uses (grouped by adapter, stable)."""
    requests = mixed_requests()
    first = {r.adapter: i for i, r in reversed(list(enumerate(requests)))}
    return sorted(requests, key=lambda r: first[r.adapter])


def test_seeded_sampling_equals_peft_mixed_batch(loaded, peft_model):
    """Same seed, same rows, same knobs: PEFT's mixed-adapter batch (adapter_names) as reference.

    PEFT refuses DoRA adapters in a mixed batch, so the DoRA adapter is checked on its own.
    """
    model, tokenizer = loaded
    requests = [r for r in grouped_requests() if r.adapter != "dup"]
    knobs = dict(temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1)
    params = SamplingParams(max_new_tokens=10, seed=123, **knobs)
    ours = generate(model, tokenizer, requests, params)
    batch = tokenizer(
        [r.prompt for r in requests], return_tensors="pt", padding=True, padding_side="left"
    )
    # the same inputs as ours: masked left pads repeat each row's first token (see generate_batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch["input_ids"] = torch.where(mask.bool(), ids, ids.gather(1, mask.argmax(1, keepdim=True)))
    torch.manual_seed(123)
    sequences = peft_model.generate(
        **batch, do_sample=True, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
        adapter_names=[r.adapter or "__base__" for r in requests], **knobs,
    )  # fmt: skip
    width = batch["input_ids"].shape[1]
    for out, row in zip(ours, sequences[:, width:].tolist(), strict=True):
        assert out.token_ids == row[: len(out.token_ids)]
        assert out.finish_reason == "length" or out.token_ids[-1] == tokenizer.eos_token_id
    assert len({tuple(o.token_ids) for o in ours}) > len(requests) // 2  # really sampled
    (dora,) = generate(model, tokenizer, [("dup cat=", "dup")], params)
    peft_model.set_adapter("dup")
    ids = tokenizer("dup cat=", return_tensors="pt")["input_ids"]
    torch.manual_seed(123)
    row = peft_model.generate(
        input_ids=ids, do_sample=True, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
        **knobs,
    )[0, ids.shape[1] :].tolist()  # fmt: skip
    assert dora.token_ids == row[: len(dora.token_ids)]


def test_stop_strings_equal_peft(loaded, peft_model):
    """PEFT's greedy answer cut after the token that completes a stop string (in the answer only:
    transformers' own stop_strings also match across the prompt, e.g. prompt "...=" + "U" for
    the stop string "=U")."""
    model, tokenizer = loaded
    requests = mixed_requests()
    free = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=12))
    stops = (next(o.text[3:5] for o in free if len(o.text) >= 8), "=", "=U")
    ours = generate(model, tokenizer, requests, SamplingParams(max_new_tokens=12, stop=stops))
    for out in ours:
        expected = peft_greedy(peft_model, tokenizer, out.request.prompt, out.request.adapter)
        text = tokenizer.decode(expected, skip_special_tokens=True)
        if any(s in text for s in stops):
            n = next(
                n
                for n in range(1, len(expected) + 1)
                if any(s in tokenizer.decode(expected[:n], skip_special_tokens=True) for s in stops)
            )
            assert out.token_ids == expected[:n] and out.finish_reason == "stop"
            assert out.text == text[: min(i for i in map(text.find, stops) if i >= 0)]
        else:
            assert out.token_ids == expected[: len(out.token_ids)]
            assert out.text == text and out.finish_reason != "stop"
    assert sum(o.finish_reason == "stop" for o in ours) >= 2


def test_streaming_events_per_request(loaded):
    """Pieces add up to each answer; on_finish fires once per request, early rows first."""
    model, tokenizer = loaded
    requests = mixed_requests()
    params = SamplingParams(max_new_tokens=12, stop=("=",))
    events: list[tuple[str, int, object]] = []
    outputs = generate(
        model,
        tokenizer,
        requests,
        params,
        on_text=lambda i, piece: events.append(("text", i, piece)),
        batch_size=7,
        on_finish=lambda i, out: events.append(("finish", i, out)),
    )
    finished = [(i, out) for kind, i, out in events if kind == "finish"]
    assert sorted(i for i, _ in finished) == list(range(len(requests)))
    assert all(out == outputs[i] for i, out in finished)
    for i, out in enumerate(outputs):
        pieces = [p for kind, j, p in events if kind == "text" and j == i]
        assert "".join(pieces) == out.text
        assert len(pieces) == len(out.text) or out.finish_reason == "stop"  # one char per token
        last_text = max(
            (n for n, (kind, j, _) in enumerate(events) if j == i and kind == "text"), default=-1
        )
        assert last_text < events.index(("finish", i, out))
    early = [i for i, out in finished if out.finish_reason != "length"]
    assert early and events.index(("finish", early[0], outputs[early[0]])) < len(events) - 1


@pytest.mark.gpu
def test_mixed_batch_greedy_on_cuda_equals_peft(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    model, tokenizer = load_trained(
        str(tiny_model_dir), {n: out / n for n in ADAPTERS}, device="cuda"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to("cuda")
    reference = PeftModel.from_pretrained(base.eval(), out / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        reference.load_adapter(out / name, adapter_name=name)
    outputs = generate(
        model, tokenizer, mixed_requests(), SamplingParams(max_new_tokens=12, seed=0)
    )
    for o in outputs:
        ids = tokenizer(o.request.prompt, return_tensors="pt")["input_ids"].to("cuda")
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if o.request.adapter is None:
            with reference.disable_adapter():
                seq = reference.generate(input_ids=ids, **kw)
        else:
            reference.set_adapter(o.request.adapter)
            seq = reference.generate(input_ids=ids, **kw)
        assert o.token_ids == seq[0, ids.shape[1] :].tolist()[: len(o.token_ids)]
