"""Evaluate several adapters in the same batches: loss, perplexity, exact match, choice accuracy.

Every selected adapter of a config with test data (read by ``mlora.inference.test_sets``) is
evaluated on its trained weights:

- ``casual`` tasks: the mean next-token cross-entropy over the supervised tokens of its test rows
  (the training contract of ``mlora.data.rows``: output tokens + EOS, the prompt too with
  ``train_on_inputs``), ``perplexity = exp(loss)``, and each row's answer generated greedily and
  scored by exact match after ``strip()``.
- choice tasks (``mlora.data.tasks``): each choice is scored by its log-likelihood after the
  prompt, ``log p(choice | prompt) = -sum of its tokens' cross-entropy``; the prediction is the
  choice with the highest SUM (``accuracy``), and, reported beside it, with the highest mean per
  token (``accuracy_norm``). ``loss`` / ``perplexity`` are over the right choices' tokens.

Batching: each step takes the next ``evaluate_batch_size`` rows (questions, with all their
choices) of every adapter that has rows left and scores them in ONE forward pass, one layout
segment per adapter; generation likewise answers the step's rows of all adapters in one
``generate`` call. Segments never mix, so an adapter's figures do not depend on its neighbours.

Under ``torchrun`` / ``accelerate launch`` with several processes each rank scores and answers a
contiguous share of every adapter's test rows; rank 0 gathers them in order, computes the
figures and writes the result file.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mlora.batching.collate import collate
from mlora.batching.dispatcher import shard_bounds
from mlora.config.schema import TrainConfig
from mlora.core.errors import MloraError
from mlora.data.rows import pad_token_id
from mlora.inference.preference_eval import (
    fill_references,
    has_references,
    preference_metrics,
)
from mlora.inference.test_sets import TestSet, prepare_test_sets, select_adapters, token_count
from mlora.model.multi_lora import MultiLoraModel
from mlora.training.distributed import Distributed, process_group

logger = logging.getLogger("mlora")

RESULT_NAME = "evaluate_result.json"


@dataclass
class AdapterResult:
    """What evaluation found for one adapter (``to_json`` is its entry in the result file)."""

    adapter: str
    task: str
    rows: int
    tokens: int
    loss: float
    perplexity: float
    predictions: list[str]
    exact_match: float | None = None
    accuracy: float | None = None
    accuracy_norm: float | None = None
    choice_logprobs: list[list[float]] | None = None
    # casual: rows the loss covers (rows whose prompt fills cutoff_len have no supervised
    # token, as in training); exact_match covers all ``rows``
    loss_rows: int | None = None
    # preference adapters (``mlora.inference.preference_eval``)
    preference: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "rows": self.rows,
            "tokens": self.tokens,
            **({} if self.loss_rows is None else {"loss_rows": self.loss_rows}),
            "loss": self.loss,
            "perplexity": self.perplexity,
        }
        if self.exact_match is not None:
            out["exact_match"] = self.exact_match
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
            out["accuracy_norm"] = self.accuracy_norm
        if self.preference is not None:
            out.update(self.preference)
            return out
        out["predictions"] = self.predictions
        return out


# --- scoring and generation (the model) -------------------------------------------------------


def _units(ts: TestSet) -> int:
    return len(ts.units)


def _prompts(ts: TestSet) -> int:
    return len(ts.prompts)


def _take(
    test_sets: Sequence[TestSet], step: int, count: Callable[[TestSet], int] = _units
) -> list[tuple[TestSet, range]]:
    """The indices each test set contributes to batch ``step`` (exhausted sets left out).

    ``count`` is how many items a set has: scoring units, or ``_prompts`` for generation
    (``casual`` units can be fewer: ``tokenize_rows`` drops rows whose prompt fills cutoff_len).
    """
    picked = []
    for ts in test_sets:
        start, total = step * ts.batch_size, count(ts)
        if start < total:
            picked.append((ts, range(start, min(start + ts.batch_size, total))))
    return picked


@torch.inference_mode()
def score_rows(
    model: MultiLoraModel, pad_id: int, test_sets: Sequence[TestSet]
) -> dict[str, list[list[float]]]:
    """Negative log-likelihood summed over each scoring row's supervised tokens.

    Returns:
        ``{adapter: [[nll of each row of unit 0], [unit 1], ...]}``.
    """
    out: dict[str, list[list[float]]] = {ts.adapter: [] for ts in test_sets}
    step = 0
    while picked := _take(test_sets, step):
        groups = [(ts.adapter, [row for i in idx for row in ts.units[i]]) for ts, idx in picked]
        stream = model.packing_form == "stream"
        batch = collate(groups, pad_id, model.device, packed=model.packing, stream=stream)
        token_nll = model.token_losses(batch)  # (N,)
        num_rows = sum(len(rows) for _, rows in groups)
        row_nll = token_nll.new_zeros(num_rows).index_add(0, batch.position_rows, token_nll)
        flat = row_nll.tolist()  # one sync per batch, after the pass
        offset = 0
        for ts, idx in picked:
            for i in idx:
                size = len(ts.units[i])
                out[ts.adapter].append(flat[offset : offset + size])
                offset += size
        step += 1
    return out


def generate_answers(
    model: MultiLoraModel, tokenizer: Any, test_sets: Sequence[TestSet]
) -> dict[str, list[str]]:
    """Greedy answers to every ``casual`` test row, the step's rows of all adapters in one call.

    Each adapter's answers are cut to its own ``max_new_tokens`` (greedy tokens do not depend on
    how many more are generated), so they do not depend on which adapters share the batch.
    """
    from mlora.inference.generation import GenerationRequest, SamplingParams, generate

    casual = [ts for ts in test_sets if not ts.is_choice]
    out: dict[str, list[str]] = {ts.adapter: [] for ts in casual}
    step = 0
    while picked := _take(casual, step, _prompts):
        requests = [GenerationRequest(ts.prompts[i], ts.adapter) for ts, idx in picked for i in idx]
        limit = max(ts.max_new_tokens for ts, _ in picked)
        outputs = iter(generate(model, tokenizer, requests, SamplingParams(max_new_tokens=limit)))
        for ts, idx in picked:
            for _ in idx:
                tokens = next(outputs).token_ids[: ts.max_new_tokens]
                out[ts.adapter].append(tokenizer.decode(tokens, skip_special_tokens=True))
        step += 1
    return out


def accuracy(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """Fraction of right predictions: scikit-learn's ``accuracy_score`` when installed (the
    ``eval`` extra), else the same fraction computed here."""
    try:
        from sklearn.metrics import accuracy_score
    except ImportError:
        return sum(a == b for a, b in zip(labels, predicted, strict=True)) / len(labels)
    return float(accuracy_score(list(labels), list(predicted)))


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _result(ts: TestSet, nll: list[list[float]], answers: list[str] | None) -> AdapterResult:
    if ts.is_choice:
        lengths = [[token_count(row) for row in unit] for unit in ts.units]
        gold_nll = sum(n[label] for n, label in zip(nll, ts.labels, strict=True))
        tokens = sum(lens[label] for lens, label in zip(lengths, ts.labels, strict=True))
        best = [max(range(len(n)), key=lambda c, n=n: -n[c]) for n in nll]
        best_norm = [
            max(range(len(n)), key=lambda c, n=n, lens=lens: -n[c] / lens[c])
            for n, lens in zip(nll, lengths, strict=True)
        ]
        loss = gold_nll / tokens
        return AdapterResult(
            adapter=ts.adapter,
            task=ts.task,
            rows=len(ts.units),
            tokens=tokens,
            loss=loss,
            perplexity=_perplexity(loss),
            predictions=[choices[b] for choices, b in zip(ts.choices, best, strict=True)],
            accuracy=accuracy(ts.labels, best),
            accuracy_norm=accuracy(ts.labels, best_norm),
            choice_logprobs=[[-x for x in n] for n in nll],
        )
    if ts.objective is not None:
        figures = preference_metrics(ts.objective, ts.units, nll)
        return AdapterResult(
            adapter=ts.adapter,
            task=ts.objective.name,
            rows=len(ts.units),
            tokens=figures.pop("tokens"),
            loss=figures.pop("loss"),
            perplexity=figures.pop("perplexity"),
            predictions=[],
            accuracy=None,
            preference=figures,
        )
    assert answers is not None
    tokens = sum(token_count(unit[0]) for unit in ts.units)
    loss = sum(n[0] for n in nll) / tokens
    matches = [a.strip() == r.strip() for a, r in zip(answers, ts.references, strict=True)]
    return AdapterResult(
        adapter=ts.adapter,
        task=ts.task,
        rows=len(ts.references) or len(ts.units),  # text rows: no generation
        tokens=tokens,
        loss=loss,
        perplexity=_perplexity(loss),
        predictions=answers,
        exact_match=sum(matches) / len(matches) if matches else None,  # text rows: none
        loss_rows=len(ts.units),
    )


def shard_test_set(ts: TestSet, rank: int, world_size: int) -> TestSet:
    """Rank ``rank``'s contiguous share of a test set's scoring units and prompts."""
    units = slice(*shard_bounds(len(ts.units), rank, world_size))
    prompts = slice(*shard_bounds(len(ts.prompts), rank, world_size))
    return TestSet(
        ts.adapter, ts.task, ts.batch_size, ts.units[units], ts.prompts[prompts],
        max_new_tokens=ts.max_new_tokens, objective=ts.objective,
    )  # fmt: skip


def evaluate_model(
    model: MultiLoraModel,
    tokenizer: Any,
    test_sets: Sequence[TestSet],
    dist: Distributed | None = None,
) -> dict[str, AdapterResult]:
    """Evaluate the adapters of ``test_sets`` (already attached to ``model``) together.

    Args:
        dist: with several processes, each scores its share of the rows and every rank gets
            the results of all (gathered in row order).

    Raises:
        MloraError: a test set names an adapter the model does not have.
    """
    dist = dist or Distributed()
    pad_id = pad_token_id(tokenizer)
    test_sets = [  # DPO: the reference log-probs of every pair, before the rows are shared out
        replace(ts, units=fill_references(model, pad_id, ts.units, ts.batch_size))
        if ts.objective is not None
        and ts.objective.needs_reference
        and not has_references(ts.units)
        else ts
        for ts in test_sets
    ]
    if dist.enabled:
        shares = [shard_test_set(ts, dist.rank, dist.world_size) for ts in test_sets]
        nll, answers = _score_and_answer(model, tokenizer, shares)
        gathered = dist.gather((nll, answers))
        nll = {
            ts.adapter: [n for part, _ in gathered for n in part[ts.adapter]] for ts in test_sets
        }
        answers = {name: [a for _, part in gathered for a in part[name]] for name in gathered[0][1]}
    else:
        nll, answers = _score_and_answer(model, tokenizer, test_sets)
    return {ts.adapter: _result(ts, nll[ts.adapter], answers.get(ts.adapter)) for ts in test_sets}


def _score_and_answer(
    model: MultiLoraModel, tokenizer: Any, test_sets: Sequence[TestSet]
) -> tuple[dict[str, list[list[float]]], dict[str, list[str]]]:
    """Every test row's negative log-likelihoods and every ``casual`` row's greedy answer."""
    missing = [ts.adapter for ts in test_sets if ts.adapter not in model.specs]
    if missing:
        raise MloraError(f"adapter {missing[0]!r} is not loaded in the model")
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        return score_rows(model, pad_id, test_sets), generate_answers(model, tokenizer, test_sets)
    finally:
        model.train(was_training)


# --- results ----------------------------------------------------------------------------------


def result_path(config: TrainConfig, output_dir: str | Path) -> Path:
    """``evaluate_result`` from the config, else ``DIR/evaluate_result.json``."""
    return Path(config.evaluate_result or Path(output_dir) / RESULT_NAME)


def write_results(path: str | Path, results: dict[str, AdapterResult]) -> None:
    """Write ``{adapter: {...}}`` as JSON atomically (the old file stays whole on failure)."""
    import json

    from mlora.core.atomic import atomic_write_text

    payload = {name: result.to_json() for name, result in results.items()}
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def format_table(results: dict[str, AdapterResult]) -> str:
    """A plain-text table: one line per adapter."""
    header = ("adapter", "task", "rows", "loss", "perplexity", "exact_match", "accuracy")
    lines = [header]
    for r in results.values():
        lines.append(
            (
                r.adapter,
                r.task,
                str(r.rows),
                f"{r.loss:.4f}",
                f"{r.perplexity:.3f}",
                "-" if r.exact_match is None else f"{r.exact_match:.4f}",
                f"{r.accuracy:.4f}"
                if r.accuracy is not None
                else "-"
                if r.preference is None
                else f"{r.preference['reward_accuracy']:.4f}",  # preference: reward accuracy
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


# --- the whole job ----------------------------------------------------------------------------


def evaluate(
    config: TrainConfig | str | Path,
    base_model: str,
    output_dir: str | Path = ".",
    adapters: Sequence[str] | None = None,
    result_file: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    show: bool = True,
    quantize: str | None = None,
    attn_implementation: str | None = None,
) -> dict[str, AdapterResult]:
    """Evaluate the trained adapters ``output_dir/NAME`` of ``config`` and write the results.

    Args:
        config: a TrainConfig or the path of a JSON config.
        base_model: the base model the adapters were trained on (a folder, a hub id, a GGUF
            file or ``"smollm2"``, as for training).
        output_dir: where the trained adapters are (``DIR/NAME``).
        adapters: evaluate only these (default: every adapter with test data).
        result_file: where to write the JSON (default: ``evaluate_result`` from the config, else
            ``output_dir/evaluate_result.json``).
        device: ``cpu``, ``cuda``, ``mps`` (``None``: the best available).
        show: print the result table to stdout.
        quantize: ``"4bit"`` or ``"8bit"`` base through bitsandbytes (CUDA only).
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attn`` (``None``: as for training).

    Under ``torchrun`` with several processes the rows are shared out and rank 0 writes and
    prints the results (every rank returns them).

    Returns:
        ``{adapter: AdapterResult}`` in evaluation order.

    Raises:
        MloraError: unknown adapter, missing test data / trained adapter / base model, a bad
            file (one line each, all checked before the model loads).
    """
    from mlora.config.schema import load_config
    from mlora.inference.trained import check_trained, load_trained
    from mlora.model.base_model import resolve_base_model
    from mlora.model.loading import check_base_model_path, plan_base_load
    from mlora.training.preflight import check_output_file

    if not isinstance(config, TrainConfig):
        config = load_config(config)
    plan = plan_base_load(device, dtype, quantize, attn_implementation)
    output_dir = Path(output_dir)
    selected = select_adapters(config, adapters)
    folders = {a.name: output_dir / a.name for a in selected}
    check_trained(folders, hint=" (train it first, or pass --dir)")
    base_model = resolve_base_model(base_model)  # a GGUF file: its converted folder
    check_base_model_path(base_model)
    target = Path(result_file) if result_file is not None else result_path(config, output_dir)
    check_output_file(target)  # before the work: the results must not be lost after it
    tokenizer = plan.load_tokenizer(base_model, trust_remote_code)
    test_sets = prepare_test_sets(config, tokenizer, [a.name for a in selected])
    model, tokenizer = load_trained(
        base_model, folders, trust_remote_code=trust_remote_code, tokenizer=tokenizer, plan=plan
    )
    model.set_packing(config.packing)
    start = time.perf_counter()
    with process_group(plan.device) as dist:
        results = evaluate_model(model, tokenizer, test_sets, dist)
    if not dist.is_main:
        return results
    logger.info(
        "evaluated %d adapter(s) in %.1fs; results in %s",
        len(results),
        time.perf_counter() - start,
        target,
    )
    if show:  # first: should the write fail after all, the table is still on screen
        print(format_table(results))
    write_results(target, results)
    return results
