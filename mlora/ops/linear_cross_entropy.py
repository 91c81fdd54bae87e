"""Linear + cross-entropy over row chunks: per-token losses without the full (N, V) logits.

The math, exactly. Given hidden states ``x`` (N, H), the head's weight ``W`` (V, H) and
optional bias ``b`` (V,), low-rank terms ``(start_g, end_g, u_g, B_g)`` with ``u_g``
(end_g - start_g, r_g) and ``B_g`` (V, r_g), targets ``t`` (N,) and an optional soft cap ``c``::

    z = x @ W.T + b                                  # (N, V), in W's dtype
    z[start_g:end_g] += u_g @ B_g.T                  # fp32, for every low-rank term g
    z = c * tanh(z / c)                              # only with a soft cap
    loss[i] = logsumexp(z[i]) - z[i, t[i]]           # 0 where t[i] == ignore_index

For a LoRA head ``u_g = s_g * drop(x[start_g:end_g]) @ A_g.T`` is computed by the caller with
ordinary autograd (it is only (n, r)), so this op covers ``x @ W.T + s * (drop(x) @ A.T) @ B.T``
and gradients reach ``A`` and the dropout mask is the one the layer itself draws.

Why: the logits of a 49k vocabulary are the largest activation of a small model's step
(64 rows: 12 MiB of fp32 logits, and autograd keeps the logits, the softmax and their
gradient). Here forward keeps only each row's ``logsumexp`` (N,) and backward recomputes one
chunk's logits at a time to form ``softmax - onehot`` and its products with ``W``, ``x``,
``u_g`` and ``B_g``. When only ``x`` needs a gradient (a frozen head without LoRA terms, the
usual case) forward also forms each row's ``(softmax - onehot) @ W`` (N, H) and backward only
scales it by the incoming per-token gradient: no recomputation, no extra matmul (Liger's
fused-linear-cross-entropy idea, in plain PyTorch). Peak memory
of the head is then one chunk's logits, chosen from a memory budget (``chunk_rows``).
On CUDA, ``liger_linear_cross_entropy`` runs Liger's own Triton kernel instead where
``liger-kernel`` is installed (extra ``liger``) in a version whose ``reduction="none"`` takes
per-token gradients (each adapter's mean weighs its tokens differently); a head with LoRA terms
always takes the plain-PyTorch op.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_MB = 64.0


@dataclass(frozen=True)
class LowRankTerm:
    """Rows ``[start, end)`` of the logits get ``u @ lora_b.T`` added (fp32).

    Attributes:
        u: (end - start, r) the rows' low-rank activations (``s * drop(x) @ A.T``).
        lora_b: (V, r) the up projection.
    """

    start: int
    end: int
    u: torch.Tensor
    lora_b: torch.Tensor


def chunk_rows(chunk_mb: float, vocab: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``chunk_mb`` MiB (>= 1)."""
    return max(1, int(chunk_mb * 2**20) // (4 * vocab))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows_per_chunk: int,
    bias: torch.Tensor | None = None,
    low_rank: Sequence[LowRankTerm] = (),
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` (+ terms), chunk by chunk (see module).

    Args:
        hidden: (N, H) the head's input, in ``weight``'s dtype.
        weight: (V, H) the head's weight; its gradient is formed only if it requires grad.
        targets: (N,) int64 class ids, ``ignore_index`` where a row has no label.
        rows_per_chunk: rows whose logits exist at once (``chunk_rows``).
        bias: (V,) or None.
        low_rank: sorted, non-overlapping terms within [0, N).
        softcap: Gemma 2's ``final_logit_softcapping`` or None.

    Returns:
        (N,) fp32 (fp64 for fp64 inputs) losses, 0 at ignored rows.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not fit weight {tuple(weight.shape)}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    spans = tuple((term.start, term.end) for term in low_rank)
    return _LinearCrossEntropy.apply(
        hidden,
        weight,
        bias,
        targets,
        (spans, int(rows_per_chunk), softcap, ignore_index),
        *[term.u for term in low_rank],
        *[term.lora_b for term in low_rank],
    )


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor | None:
    """(N,) fp32 per-token losses from Liger's fused kernel, or None where it does not apply
    (not CUDA, fp64, liger-kernel missing or too old for per-token gradients)."""
    if hidden.device.type != "cuda" or weight.dtype == torch.float64:
        return None
    fused = _liger_function()
    if fused is None:
        return None
    out = fused(
        hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="none",
        softcap=softcap,
    )  # fmt: skip
    losses = out if isinstance(out, torch.Tensor) else out.loss  # newer versions: an output
    return losses.float()


@functools.cache
def _liger_function() -> Callable[..., object] | None:
    try:
        from liger_kernel.ops import fused_linear_cross_entropy as ops
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    per_token = inspect.signature(ops.fused_linear_cross_entropy_forward).parameters
    return liger_fused_linear_cross_entropy if "token_grad_output" in per_token else None


def _logit_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spans: Sequence[tuple[int, int]],
    us: Sequence[torch.Tensor],
    bs: Sequence[torch.Tensor],
    start: int,
    stop: int,
    buffer: torch.Tensor | None,
) -> torch.Tensor:
    """(stop - start, V) logits before the soft cap, upcast as the unchunked head does.

    Written into ``buffer`` (``_logits_buffer``; None: the weight's dtype needs an upcast):
    one allocation of a chunk per call of the op, not one per chunk and pass (a fresh chunk of
    32 MiB or more is new pages to fault in each time)."""
    rows = hidden[start:stop]
    if buffer is None:
        base = torch.nn.functional.linear(rows, weight, bias)  # (c, V) weight dtype
    elif bias is None:
        base = torch.mm(rows, weight.T, out=buffer[: stop - start])
    else:
        base = torch.addmm(bias, rows, weight.T, out=buffer[: stop - start])
    if not spans:
        return base.to(_logit_dtype(base.dtype))
    logits = base.to(_logit_dtype(torch.promote_types(base.dtype, us[0].dtype)))  # may be base
    for (lo, hi), u, b in zip(spans, us, bs, strict=True):
        a, z = max(lo, start), min(hi, stop)
        if a < z:  # the delta in the adapter's dtype, as the layer computes it
            logits[a - start : z - start] += u[a - lo : z - lo] @ b.T
    # the layer returns (base + delta) in the base's dtype, then the head upcasts it
    return logits.to(base.dtype).to(_logit_dtype(base.dtype))


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``rows`` rows covering ``n``, as equal as possible: a
    ragged last chunk of a few rows would run the head's matmul at a fraction of its speed."""
    count = -(-n // rows)
    if count == 0:
        return []
    bounds = [n * i // count for i in range(count + 1)]  # sizes differ by at most one row
    return list(pairwise(bounds))


def _logits_buffer(
    hidden: torch.Tensor, weight: torch.Tensor, chunks: Sequence[tuple[int, int]]
) -> torch.Tensor | None:
    """One (largest chunk, V) buffer that every chunk's logits are written into; None where
    the head's products are upcast to the logits' dtype (a half-precision head), which makes
    a new tensor anyway."""
    if _logit_dtype(weight.dtype) != weight.dtype:
        return None
    rows = max((stop - start for start, stop in chunks), default=0)
    return hidden.new_empty(rows, weight.shape[0], dtype=weight.dtype)


def _exp_shifted_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``z`` (c, V) into ``exp(z - max)`` in place; returns each row's logsumexp (c,) and
    the row sums of the exponentials (c, 1), by which they divide into the softmax.

    One pass for the shift and exponential and one for the sum, over a buffer that already
    exists: ``torch.logsumexp`` and then ``exp(z - lse)`` take two of each, each into a
    freshly allocated chunk."""
    top = z.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0)  # rows of -inf stay -inf, as logsumexp's
    total = z.sub_(top).exp_().sum(dim=1, keepdim=True)
    return (total.log() + top).squeeze(1), total


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward keeps each row's logsumexp; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, meta, *terms):
        spans, rows, softcap, ignore_index = meta
        us, bs = terms[: len(spans)], terms[len(spans) :]
        n = hidden.shape[0]
        dtype = _logit_dtype(weight.dtype)
        losses = torch.zeros(n, dtype=dtype, device=hidden.device)
        lse = torch.zeros(n, dtype=dtype, device=hidden.device)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        need = ctx.needs_input_grad
        # Only the hidden states need a gradient (a frozen head, no LoRA terms: the usual case):
        # d loss_i / d x_i = g_i * (softmax(z_i) - onehot(t_i)) @ W, whose factor after g_i is
        # formed here, so backward scales it by g and recomputes nothing.
        early = need[0] and not need[1] and not need[2] and not spans
        unit_grad = torch.empty_like(hidden) if early else None  # (N, H), every row written
        chunks = _chunks(n, rows)
        buffer = _logits_buffer(hidden, weight, chunks)
        for start, stop in chunks:
            z = _chunk_logits(hidden, weight, bias, spans, us, bs, start, stop, buffer)
            capped = torch.tanh(z / softcap) if softcap else None
            if softcap:
                z = capped * softcap
            picked = z.gather(1, safe[start:stop, None]).squeeze(1)
            lse[start:stop], total = _exp_shifted_(z)  # z is exp(z - max) from here
            losses[start:stop] = torch.where(valid[start:stop], lse[start:stop] - picked, 0)
            if unit_grad is not None:
                keep = valid[start:stop, None].to(z.dtype)
                grad = z.mul_(keep / total)  # the softmax, 0 on ignored rows
                grad.scatter_add_(1, safe[start:stop, None], -keep)
                if softcap:
                    grad.mul_(1 - capped * capped)
                torch.mm(grad.to(weight.dtype), weight, out=unit_grad[start:stop])
        ctx.meta = meta
        if unit_grad is not None:
            ctx.save_for_backward(unit_grad, valid)
        else:
            ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, *terms)
        ctx.early = unit_grad is not None
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        spans, rows, softcap, _ = ctx.meta
        if ctx.early:
            unit_grad, valid = ctx.saved_tensors
            g = torch.where(valid, grad_losses, 0).to(unit_grad.dtype)
            return unit_grad * g[:, None], None, None, None, None
        hidden, weight, bias, safe, valid, lse, *terms = ctx.saved_tensors
        us, bs = terms[: len(spans)], terms[len(spans) :]
        need = ctx.needs_input_grad
        n = hidden.shape[0]
        g = torch.where(valid, grad_losses.to(lse.dtype), 0)  # (N,)
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=lse.dtype) if need[2] and bias is not None else None
        )
        grad_us = [torch.zeros_like(u) for u in us]
        grad_bs = [torch.zeros_like(b) for b in bs]
        chunks = _chunks(n, rows)
        buffer = _logits_buffer(hidden, weight, chunks)
        for start, stop in chunks:
            z = _chunk_logits(hidden, weight, bias, spans, us, bs, start, stop, buffer)  # (c, V)
            capped = torch.tanh(z / softcap) if softcap else None
            capped_z = capped * softcap if softcap else z
            # d loss / d z = g * (softmax(z) - onehot(t)), written over the chunk's logits
            grad = capped_z.sub_(lse[start:stop, None]).exp_()
            grad.mul_(g[start:stop, None])
            grad.scatter_add_(1, safe[start:stop, None], -g[start:stop, None])
            if softcap:
                grad.mul_(1 - capped * capped)
            grad_base = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_base @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_base.T.to(lse.dtype), hidden[start:stop].to(lse.dtype))
            if grad_bias is not None:
                grad_bias += grad_base.sum(0).to(lse.dtype)
            for k, ((lo, hi), u, b) in enumerate(zip(spans, us, bs, strict=True)):
                a, e = max(lo, start), min(hi, stop)
                if a >= e:
                    continue
                part = grad[a - start : e - start].to(b.dtype)  # (m, V)
                grad_us[k][a - lo : e - lo] = part @ b
                grad_bs[k].addmm_(part.T, u[a - lo : e - lo].to(b.dtype))
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, *grad_us, *grad_bs
