"""Evaluation against references: PEFT one adapter at a time (fp32) for loss, perplexity,
choice log-likelihoods and greedy answers; mixed-adapter batches against each adapter alone."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mlora.config.schema import parse_config
from mlora.data.prompts import PromptTemplate
from mlora.data.rows import tokenize_rows
from mlora.inference import test_sets
from mlora.inference.evaluation import accuracy, evaluate_model, prepare_test_sets
from mlora.inference.trained import load_trained
from tests.eval_support import ADAPTERS, TEMPLATE, task_rows, trained  # noqa: F401

PROMPT = PromptTemplate(TEMPLATE["prompt_input"], TEMPLATE["prompt_no_input"])
ARC_ROWS = [
    {
        "id": f"q{i}",
        "question": q,
        "choices": {"text": choices, "label": ["A", "B", "C", "D"][: len(choices)]},
        "answerKey": key,
    }
    for i, (q, choices, key) in enumerate(
        [
            ("rev owl", ["lwo", "owl", "wol"], "A"),
            ("up cat", ["CAT", "cat", "Cat", "TAC"], "A"),
            ("add 1 2", ["3", "12", "21"], "A"),
            ("dup ant", ["antant", "ant", "tnatna", "aant"], "A"),
            ("which is a bird", ["owl", "yak"], "A"),
        ]
    )
]
BOOLQ_ROWS = [
    {"question": "is a cat a pet", "passage": "cats live with people", "answer": True},
    {"question": "is a yak a bird", "passage": "a yak has four legs", "answer": False},
    {"question": "do owls fly", "passage": "owls have wings", "answer": True},
]


@pytest.fixture(scope="module")
def loaded(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    return load_trained(str(tiny_model_dir), {n: out / n for n in ADAPTERS})


@pytest.fixture(scope="module")
def peft_model(trained, tiny_model_dir):  # noqa: F811
    out, _ = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(out / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def choice_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("choice-data")
    arc, boolq = root / "arc.json", root / "boolq.jsonl"
    arc.write_text(json.dumps(ARC_ROWS), encoding="utf-8")
    boolq.write_text("\n".join(json.dumps(r) for r in BOOLQ_ROWS), encoding="utf-8")
    return {"arc": arc, "boolq": boolq}


def mixed_config(raw: dict, files: dict[str, Path], batch_size: int | None = None) -> dict:
    """The trained config with two adapters turned into choice tasks (arc-e, boolq)."""
    raw = json.loads(json.dumps(raw))
    raw["cutoff_len"] = 128  # the choice rows whole (longer rows lose tokens on the left)
    raw["lora"][1].update(task_name="arc-e", test_data=str(files["arc"]))
    raw["lora"][2].update(task_name="boolq", test_data=str(files["boolq"]))
    if batch_size is not None:
        for adapter in raw["lora"]:
            adapter["evaluate_batch_size"] = batch_size
    return raw


def run_eval(loaded, raw: dict, names=None):
    model, tokenizer = loaded
    sets = prepare_test_sets(parse_config(raw, "test"), tokenizer, names)
    return evaluate_model(model, tokenizer, sets)


# --- references --------------------------------------------------------------------------------


@torch.no_grad()
def peft_row_nll(peft_model, adapter: str, input_ids: list[int], labels: list[int]) -> float:
    peft_model.set_adapter(adapter)
    logits = peft_model(input_ids=torch.tensor([input_ids])).logits[0].float()  # (T, V)
    return F.cross_entropy(
        logits[:-1], torch.tensor(labels[1:]), ignore_index=-100, reduction="sum"
    ).item()


@torch.no_grad()
def peft_choice_logprob(peft_model, tokenizer, adapter: str, prompt: str, choice: str) -> float:
    """log p(choice | prompt), summed over the choice's tokens (a direct PEFT computation)."""
    peft_model.set_adapter(adapter)
    ids = tokenizer(prompt + choice)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    logp = torch.log_softmax(peft_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def peft_greedy_text(peft_model, tokenizer, adapter: str, prompt: str, max_new: int) -> str:
    peft_model.set_adapter(adapter)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    seq = peft_model.generate(
        input_ids=ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)


# --- tests -------------------------------------------------------------------------------------


def test_loss_and_perplexity_equal_peft(loaded, peft_model, trained):  # noqa: F811
    _, raw = trained
    _, tokenizer = loaded
    results = run_eval(loaded, raw)
    assert list(results) == list(ADAPTERS)
    for name in ADAPTERS:
        rows = tokenize_rows(task_rows(name), tokenizer, PROMPT, raw["cutoff_len"])
        nll = sum(peft_row_nll(peft_model, name, r.input_ids, r.labels) for r in rows)
        tokens = sum(sum(1 for x in r.labels[1:] if x != -100) for r in rows)
        assert results[name].tokens == tokens
        assert results[name].loss_rows == len(rows) == results[name].rows
        assert results[name].loss == pytest.approx(nll / tokens, rel=1e-5)
        assert results[name].perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert len({round(r.loss, 6) for r in results.values()}) == len(ADAPTERS)


def test_prompt_filling_cutoff_len_skips_loss_only(loaded, peft_model, trained, tmp_path):  # noqa: F811
    _, raw = trained
    _, tokenizer = loaded
    cutoff = 48
    rows = task_rows("add")[:3]
    rows.append({"instruction": "add " * 40, "input": "1 2", "output": "3"})
    data = tmp_path / "add-long.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    raw = json.loads(json.dumps(raw))
    raw["cutoff_len"] = cutoff
    raw["lora"] = [dict(a, test_data=str(data)) for a in raw["lora"] if a["name"] == "add"]
    result = run_eval(loaded, raw, ["add"])["add"]
    kept = tokenize_rows(rows, tokenizer, PROMPT, cutoff)
    assert result.rows == len(result.predictions) == 4 and result.loss_rows == len(kept) == 3
    nll = sum(peft_row_nll(peft_model, "add", r.input_ids, r.labels) for r in kept)
    assert result.loss == pytest.approx(nll / result.tokens, rel=1e-5)
    assert result.to_json()["loss_rows"] == 3


def test_choice_scores_equal_peft_loglikelihood(loaded, peft_model, trained, choice_files):  # noqa: F811
    _, raw = trained
    _, tokenizer = loaded
    results = run_eval(loaded, mixed_config(raw, choice_files), ["rev", "up"])
    cases = {
        "rev": (ARC_ROWS, lambda r: (r["question"], r["choices"]["text"], 0)),
        "up": (
            BOOLQ_ROWS,
            lambda r: (
                f"{r['passage']}\nQuestion: {r['question']}?",
                ["no", "yes"],
                int(r["answer"]),
            ),
        ),
    }
    for name, (rows, schema) in cases.items():
        result = results[name]
        expected, labels = [], []
        for row in rows:
            question, choices, label = schema(row)
            prompt = PROMPT.render(question)
            expected.append(
                [peft_choice_logprob(peft_model, tokenizer, name, prompt, c) for c in choices]
            )
            labels.append(label)
        assert len(result.choice_logprobs) == len(expected)
        for got, want in zip(result.choice_logprobs, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        best = [max(range(len(e)), key=e.__getitem__) for e in expected]
        assert result.accuracy == pytest.approx(
            sum(b == y for b, y in zip(best, labels, strict=True)) / len(labels)
        )
        assert result.predictions == [schema(r)[1][b] for r, b in zip(rows, best, strict=True)]
        gold = sum(-e[y] for e, y in zip(expected, labels, strict=True))
        gold_tokens = sum(
            len(tokenizer(PROMPT.render(schema(r)[0]) + schema(r)[1][y])["input_ids"])
            - len(tokenizer(PROMPT.render(schema(r)[0]))["input_ids"])
            for r, y in zip(rows, labels, strict=True)
        )
        assert result.loss == pytest.approx(gold / gold_tokens, rel=1e-5)
        assert result.exact_match is None
        # accuracy_norm: the highest mean log-likelihood per choice token (PEFT's log-probs
        # over each choice's own token count, from the tokenizer)
        best_norm = []
        for e, row in zip(expected, rows, strict=True):
            question, choices, _ = schema(row)
            counts = [continuation_tokens(tokenizer, PROMPT.render(question), c) for c in choices]
            best_norm.append(max(range(len(e)), key=lambda c, e=e, n=counts: e[c] / n[c]))
        assert result.accuracy_norm == pytest.approx(
            sum(b == y for b, y in zip(best_norm, labels, strict=True)) / len(labels)
        )


def continuation_tokens(tokenizer, prompt: str, text: str) -> int:
    """Tokens ``text`` adds after ``prompt``."""
    return len(tokenizer(prompt + text)["input_ids"]) - len(tokenizer(prompt)["input_ids"])


def test_mixed_batches_equal_each_adapter_alone(loaded, trained, choice_files, monkeypatch):  # noqa: F811
    _, raw = trained
    model, _ = loaded
    layouts: list[tuple] = []
    real = model.token_losses

    def spy(batch):
        layouts.append(tuple(batch.layout.adapters))
        return real(batch)

    monkeypatch.setattr(model, "token_losses", spy)
    together = run_eval(loaded, mixed_config(raw, choice_files, batch_size=5))
    assert any(len(set(adapters)) == len(ADAPTERS) for adapters in layouts)  # side by side
    differently_batched = run_eval(loaded, mixed_config(raw, choice_files, batch_size=16))
    for name in ADAPTERS:
        alone = run_eval(loaded, mixed_config(raw, choice_files, batch_size=7), [name])[name]
        for other in (together[name], differently_batched[name]):
            assert other.loss == pytest.approx(alone.loss, rel=1e-6)
            assert other.tokens == alone.tokens
            assert other.predictions == alone.predictions
            if alone.choice_logprobs is not None:
                for a, b in zip(other.choice_logprobs, alone.choice_logprobs, strict=True):
                    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_exact_match_agrees_with_peft_greedy(loaded, peft_model, trained, tmp_path, monkeypatch):  # noqa: F811
    """Half the references are PEFT's own greedy answers, so matches really happen."""
    _, raw = trained
    _, tokenizer = loaded
    monkeypatch.setattr(test_sets, "ANSWER_SLACK_TOKENS", 0)
    raw = json.loads(json.dumps(raw))
    expected = {}
    for adapter in raw["lora"][:2]:  # add, rev
        name = adapter["name"]
        rows = task_rows(name)
        max_new = max(
            len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows
        )
        prompts = [PROMPT.render(r["instruction"], r["input"]) for r in rows]
        answers = [peft_greedy_text(peft_model, tokenizer, name, p, max_new) for p in prompts]
        longest = max(range(len(rows)), key=lambda i: len(rows[i]["output"]))
        for i in range(0, len(rows), 2):  # keep the longest reference: same max_new_tokens
            if i != longest:
                rows[i]["output"] = answers[i]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        adapter["test_data"] = str(path)
        matches = [a.strip() == r["output"].strip() for a, r in zip(answers, rows, strict=True)]
        expected[name] = (answers, sum(matches) / len(matches))
    results = run_eval(loaded, raw, list(expected))
    for name, (answers, exact) in expected.items():
        assert results[name].predictions == answers
        assert results[name].exact_match == pytest.approx(exact)
        assert results[name].exact_match > 0.3


def test_accuracy_with_and_without_scikit_learn(monkeypatch):
    labels, predicted = [0, 1, 2, 1, 0], [0, 1, 1, 1, 2]
    plain = sum(a == b for a, b in zip(labels, predicted, strict=True)) / len(labels)
    assert accuracy(labels, predicted) == pytest.approx(plain)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # import now fails
    assert accuracy(labels, predicted) == pytest.approx(plain)


def test_every_choice_task_the_config_accepts_has_a_reader() -> None:
    """``config.schema.CHOICE_TASK_NAMES`` (what ``task_name`` accepts) and
    ``data.tasks.CHOICE_TASKS`` (how each task is read) name the same tasks, in the same order."""
    from mlora.config.schema import CHOICE_TASK_NAMES
    from mlora.data.tasks import CHOICE_TASKS

    assert tuple(CHOICE_TASKS) == CHOICE_TASK_NAMES
