"""How ``--model mlora`` computes log-likelihoods: packed (default), or in the harness's shapes.

Packed (``score_packed``): every adapter's rows in the same passes, ``lm_head`` at the scored
positions only, as mlora's own evaluation.

In the shapes of the harness's own ``hf`` model (``exact=true``, ``score_like_hf``): in fp32 a
log-likelihood depends on the shapes it is computed in: a CPU or GPU attention or
matmul kernel rounds differently for a 40-token row alone, the same row right-padded to 60 in a
batch of 8, or packed in a bin beside other rows. mlora's default scoring packs rows (and every
adapter's rows) into as few passes as it can, which agrees with ``--model hf ... peft=`` within
a few 1e-5 on a 30-layer model. This module reproduces, per adapter, exactly what
``lm_eval.models.huggingface.HFLM._loglikelihood_tokens`` runs: the harness's own ``Collator``
(its order, its one-token-continuation grouping), batches of ``batch_size`` right-padded with 0
and no attention mask, full-vocabulary ``log_softmax`` over the logits, the continuation's slice
summed in the logits' dtype. With the same ``batch_size`` on both sides, the answers of a PEFT
LoRA are then the hf model's own, bit for bit (measured by ``benchmarks/bench_harness.py
--exact``). The price: one pass per adapter per batch, and logits for every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat

from mlora.batching.collate import collate
from mlora.batching.layout import BatchLayout
from mlora.data.rows import IGNORE_INDEX, TokenizedRow


@dataclass(frozen=True)
class _ScoredRow:
    """One input sequence and the requests it answers (those whose input is that sequence).

    Attributes:
        row: the tokens, supervised on the last ``scored`` positions' next tokens.
        requests: ``(request index, continuation tokens)``; each reads the last
            ``len(continuation)`` of the row's scored positions.
    """

    row: TokenizedRow
    scored: int
    requests: list[tuple[int, list[int]]]


def _scored_rows(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int
) -> list[_ScoredRow]:
    """HFLM's rows, ``(context + continuation)[-(max_length + 1):]``, one per distinct input:
    requests whose input is the same (a question's one-token choices) share its logits, as
    the harness's own logits cache does."""
    rows: dict[tuple[int, ...], tuple[list[int], list[tuple[int, list[int]]]]] = {}
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError("a scored pair needs context and continuation tokens")
        whole = (list(context) + list(continuation))[-(max_length + 1) :]
        _, requests = rows.setdefault(tuple(whole[:-1]), (whole, []))
        requests.append((index, whole[len(whole) - len(continuation) :]))
    out = []
    for whole, requests in rows.values():
        scored = max(len(cont) for _, cont in requests)
        labels = [IGNORE_INDEX] * (len(whole) - scored) + whole[-scored:]
        out.append(_ScoredRow(TokenizedRow(whole, labels), scored, requests))
    return out


@torch.inference_mode()
def score_packed(
    model: Any,
    adapters: dict[str, str | None],
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_length: int,
    pad: int,
) -> dict[str, list[tuple[float, bool]]]:
    """``(context tokens, continuation tokens)`` -> (log p(continuation | context), greedy?) for
    every ``{label: adapter}`` (None: the base), the rows of all labels in the same batches.

    A pass holds ``batch_size`` distinct inputs (longest first) once per label, one layout
    segment per label; ``lm_head`` runs on the scored positions only, and each continuation
    token's log-probability is ``log_softmax`` of the position's logits (fp32, as the harness's
    hf model; summed in fp64). The sums come to the host once per pass.
    """
    labels = list(adapters)
    rows = sorted(_scored_rows(pairs, max_length), key=lambda r: -len(r.row))
    out: dict[str, list[tuple[float, bool]]] = {
        label: [(0.0, False)] * len(pairs) for label in labels
    }
    stream = model.packing_form == "stream"
    for start in range(0, len(rows), batch_size):
        picked = rows[start : start + batch_size]
        groups = [(adapters[label], [r.row for r in picked]) for label in labels]
        batch = collate(groups, pad, model.device, packed=model.packing, stream=stream)
        logits = model.supervised_logits(batch)  # (N, V), positions grouped by segment
        by_row = torch.sort(batch.position_rows, stable=True).indices  # (N,) row-major
        where, tokens, owners = [], [], []  # per (label, request, token): host indices
        first = 0  # the row's first scored position in ``by_row``
        slots: list[tuple[str, int]] = []
        for label in labels:
            for r in picked:
                for index, cont in r.requests:
                    end = first + r.scored
                    where += range(end - len(cont), end)
                    tokens += cont
                    owners += [len(slots)] * len(cont)
                    slots.append((label, index))
                first += r.scored
        positions = by_row[torch.tensor(where, device=logits.device)]  # (M,)
        token_ids = torch.tensor(tokens, device=logits.device)  # (M,)
        logprobs = F.log_softmax(logits, dim=-1)  # (N, V), as the harness's hf model
        logprob = logprobs[positions, token_ids]  # (M,)
        miss = (logprobs.argmax(dim=-1)[positions] != token_ids).double()  # (M,)
        owner = torch.tensor(owners, device=logits.device)
        sums = logprob.double().new_zeros(len(slots)).index_add(0, owner, logprob.double())
        misses = miss.new_zeros(len(slots)).index_add(0, owner, miss)
        for (label, index), total, wrong in zip(slots, sums.tolist(), misses.tolist(), strict=True):
            out[label][index] = (total, wrong == 0)  # one host read per pass (above)
    return out


# (request key, context tokens, continuation tokens), as HFLM's requests
_Request = tuple[Any, list[int], list[int]]


def _sort_key(request: _Request) -> tuple[int, tuple[int, ...]]:
    """HFLM's order: longest input first, ties by the tokens."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _one_token_group(request: _Request) -> list[int]:
    """HFLM's logits cache: requests with the same input share one row."""
    return request[-2] + request[-1][:-1]


@torch.inference_mode()
def score_like_hf(
    model: Any,
    adapter: str | None,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_length: int,
) -> list[tuple[float, bool]]:
    """``(context, continuation)`` token pairs -> (log-likelihood, greedy?) under one adapter,
    computed as HFLM computes them with this ``batch_size``.

    Args:
        model: a ``MultiLoraModel``.
        adapter: the adapter answering (None: the base model).
        pairs: non-empty context and continuation tokens.
        batch_size: rows per pass (HFLM's ``batch_size``).
        max_length: the model's context; inputs are cut from the left as HFLM does.
    """
    requests: list[_Request] = [(i, list(c), list(t)) for i, (c, t) in enumerate(pairs)]
    order = Collator(requests, sort_fn=_sort_key, group_by="contexts", group_fn=_one_token_group)
    answers: list[tuple[float, bool]] = []
    for chunk in order.get_batched(n=batch_size):
        inputs = [
            torch.tensor((ctx + cont)[-(max_length + 1) :][:-1], dtype=torch.long)
            for _, ctx, cont in chunk
        ]
        width = max(len(row) for row in inputs)
        lengths = [len(row) for row in inputs]
        batch = pad_and_concat(width, inputs, padding_side="right").to(model.device)  # (B, T)
        real = torch.arange(width) < torch.tensor(lengths)[:, None]  # (B, T)
        layout = BatchLayout.from_row_adapters([adapter] * len(inputs))
        with model.context.use(layout, real.reshape(-1).to(model.device)):
            logits = model.model(batch).logits  # (B, T, V), as HFLM's _model_call
        logprobs = F.log_softmax(logits, dim=-1)
        for (_, ctx, cont), row, length in zip(chunk, logprobs, lengths, strict=True):
            picked = row[length - len(cont) : length].unsqueeze(0)  # (1, len(cont), V)
            greedy = picked.argmax(dim=-1)
            for _, cont_tokens, scores in order.get_cache(None, ctx, cont, picked):
                wanted = torch.tensor(cont_tokens, device=scores.device).unsqueeze(0)  # (1, C)
                equal = bool((greedy[:, -wanted.shape[1] :] == wanted).all())
                total = float(torch.gather(scores, 2, wanted.unsqueeze(-1)).squeeze(-1).sum())
                answers.append((total, equal))
    return order.get_original(answers)


def score_labels_like_hf(
    model: Any,
    adapters: dict[str, str | None],
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_length: int,
    rolling: bool = False,
) -> dict[str, list[tuple[float, bool]]]:
    """``score_like_hf`` for each ``{label: adapter}``, one label after the other.

    ``rolling``: the pairs are rolling windows, which HFLM's ``loglikelihood_rolling`` cuts
    into chunks of ``batch_size`` before ordering each chunk on its own.
    """
    step = batch_size if rolling else max(len(pairs), 1)
    return {
        label: [
            answer
            for start in range(0, len(pairs), step)
            for answer in score_like_hf(
                model, adapter, pairs[start : start + step], batch_size, max_length
            )
        ]
        for label, adapter in adapters.items()
    }
