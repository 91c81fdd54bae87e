"""Segmented LoRA: many adapters' LoRA deltas over one packed batch, one adapter per segment.

The math, exactly. Given ``x`` of shape (T, in) (the tokens of a flattened batch) and G
segments ``[start_g, end_g)`` (sorted, non-overlapping, possibly empty, possibly with gaps
between or around them), per-segment LoRA weights ``A_g`` (r_g, in) and ``B_g`` (out, r_g)
(the ``.weight`` of ``nn.Linear(in, r_g)`` and ``nn.Linear(r_g, out)``; ranks may differ) and
Python float scales ``s_g``, ``segmented_lora`` returns ``delta`` of shape (T, out) with::

    delta[start_g:end_g] = s_g * (x[start_g:end_g] @ A_g.T) @ B_g.T    for every segment g
    delta[t] = 0                                                       for t in no segment

It is computed in the weights' dtype (``x`` is cast to it first: bf16 activations with fp32
adapters compute in fp32) and returned in that dtype. Gradients flow to ``x`` and to every
``A_g`` and ``B_g`` that requires grad; tokens in no segment get a zero gradient.

Implementations (``impl=``), all tested equal to ``loop``:

- ``loop``: the per-segment reference, written to be obviously right.
- ``grouped``: two ``torch.nn.functional.grouped_mm`` calls (``torch._grouped_mm`` before it
  was public) over the weights stacked to (G', in, r_pad) and (G', r_pad, out). Unequal ranks
  are zero-padded to a common ``r_pad``; gaps become extra groups with zero weights so that the
  groups cover [0, T). ``s_g`` is folded into the stacked B (``s * (h @ B.T) == h @ (s * B).T``),
  which needs no per-token scale vector and no extra (T, r) intermediate.
- ``function``: a custom ``torch.autograd.Function`` that writes each segment's result into one
  preallocated (T, out) buffer, saves ``x`` and the (tokens, r_g) intermediates in one flat
  buffer, and in backward writes each segment's input gradient into one (T, in) buffer. Its
  temporaries do not grow with G (mLoRA's BatchLoRA idea).
- ``auto``: ``grouped`` where ``grouped_supported`` says so, else ``function``.

What ``grouped_mm`` accepts in torch 2.13 (tried on CPU; CUDA from its source, GroupedBlas.cpp):

- dtypes: float32, bfloat16, float16 (not float64); both operands and the output in one dtype
  (``out_dtype`` must equal the input dtype, so bf16 inputs cannot accumulate into fp32 output).
- layout: every operand row-major or column-major (a transposed view is fine) with its leading
  stride a multiple of 16 bytes: ``in``, ``out`` and the rank must be multiples of 4 (fp32) or 8
  (bf16/fp16). The rank is padded here; ``in`` and ``out`` are checked by ``grouped_supported``.
  Stride-0 (expanded) operands are rejected ("Invalid strides/sizes").
- autograd: supported for both operands, including empty groups (their weight gradient is 0).
  The incoming gradient must satisfy the same layout rule, so the stride-0 gradient of
  ``delta.sum().backward()`` is rejected; a hook here makes it contiguous. Double backward
  fails the same way (not needed for training).
- offsets: int32 cumulative group ends on the operand's device; empty groups are fine. Rows
  past ``offs[-1]`` are left uninitialised in the output and in the input gradient, which is why
  the gap groups must make the groups cover all T tokens.
- speed: on CPU (and on CUDA outside the fast path) it is ``_grouped_mm_fallback``, a C++ loop of
  ``mm_out`` per group that reads ``offs`` on the host: a device sync on CUDA. The CUDA fast
  path (no sync) is bf16 on compute capability 9.x / 10.x only, so ``grouped_supported`` allows
  CUDA only there.

``grouped`` multiplies gap tokens by zero weights, so gap tokens must be finite (0 * inf = nan).

``dropout_segmented_lora`` is ``segmented_lora(x * keep, ...)`` for LoRA dropout given as a bool
mask (``mlora.ops.masked_dropout``): the ``function`` implementation, which forms the dropped
input in forward and again in backward, so what it keeps is ``x`` and the 1-byte mask, and its
backward is plain matmuls (no nested autograd, no recomputed (T, out) output).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mlora.hardware.backends import get_backend
from mlora.ops.masked_dropout import KeepRanges, dropped_input, scale_by_keep_

IMPLS = ("loop", "grouped", "function", "auto")

grouped_mm: Callable[..., torch.Tensor] | None = getattr(
    F, "grouped_mm", getattr(torch, "_grouped_mm", None)
)
GROUPED_AVAILABLE: bool = grouped_mm is not None
"""Whether this torch has a grouped matmul at all (``grouped_supported`` says where it runs)."""

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def segmented_lora(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
    impl: str = "auto",
) -> torch.Tensor:
    """The LoRA delta of every segment's adapter over a packed batch (math in module docstring).

    Args:
        x: (T, in) input tokens; cast to the weights' dtype.
        segments: G token ranges ``(start, end)``, sorted and non-overlapping, within [0, T].
        lora_a: G tensors (r_g, in), all of one dtype and device.
        lora_b: G tensors (out, r_g), same dtype and device as ``lora_a``.
        scales: G Python floats (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        impl: "loop", "grouped", "function" or "auto" (see ``resolve_impl``).

    Returns:
        (T, out) delta in the weights' dtype; zero on tokens in no segment.

    Raises:
        ValueError: inconsistent arguments, or an implementation that cannot run on them.
    """
    x, segments, scales = _checked(x, segments, lora_a, lora_b, scales)
    chosen = resolve_impl(impl, x, lora_a, lora_b)
    if chosen == "loop":
        return _loop(x, segments, lora_a, lora_b, scales)
    if chosen == "grouped":
        return _grouped(x, segments, lora_a, lora_b, scales)
    return _SegmentedLoraFunction.apply(x, segments, scales, None, (), *lora_a, *lora_b)


def dropout_segmented_lora(
    x: torch.Tensor,
    mask: torch.Tensor,
    keep_ranges: Sequence[tuple[int, int, float]],
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """``segmented_lora(x * keep, ...)`` with ``keep = keep_multipliers(mask, keep_ranges)``,
    keeping ``x`` and the bool mask for backward, not the (T, in) dropped input.

    Values and gradients are bit for bit those of ``segmented_lora(x * keep, ..., impl=
    "function")`` under plain autograd: the same ops on the same inputs.

    Args:
        x: (T, in) input, cast to the weights' dtype.
        mask: (T, in) bool, True where a unit is kept (everywhere outside ``keep_ranges``).
        keep_ranges: ``(start, end, scale)`` rows whose kept units are multiplied by ``scale``.
        segments, lora_a, lora_b, scales: as ``segmented_lora``.
    """
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool of shape {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    x, segments, scales = _checked(x, segments, lora_a, lora_b, scales)
    ranges = tuple((int(start), int(end), float(scale)) for start, end, scale in keep_ranges)
    return _SegmentedLoraFunction.apply(x, segments, scales, mask, ranges, *lora_a, *lora_b)


def _checked(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> tuple[torch.Tensor, tuple[tuple[int, int], ...], tuple[float, ...]]:
    """The arguments checked (``_check_inputs``), ``x`` in the weights' dtype, and the
    segments and scales as the hashable tuples the autograd function keeps."""
    _check_inputs(x, segments, lora_a, lora_b, scales)
    segments = tuple((int(start), int(end)) for start, end in segments)
    return x.to(lora_a[0].dtype), segments, tuple(float(scale) for scale in scales)


def resolve_impl(
    impl: str, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]
) -> str:
    """The implementation that ``segmented_lora`` runs for ``impl`` on these tensors.

    Args:
        impl: one of ``IMPLS``; "auto" picks "grouped" where supported, else "function".
        x: (T, in) input, already in the weights' dtype.
        lora_a: G tensors (r_g, in).
        lora_b: G tensors (out, r_g).

    Returns:
        "loop", "grouped" or "function".

    Raises:
        ValueError: an unknown ``impl``, or "grouped" where ``grouped_supported`` is False.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown segmented LoRA impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "grouped" if grouped_supported(x, lora_a, lora_b) else "function"
    if impl == "grouped" and not grouped_supported(x, lora_a, lora_b):
        raise ValueError(
            f"grouped_mm cannot run {lora_a[0].dtype} on {x.device} with in={x.shape[1]}, "
            f"out={lora_b[0].shape[0]}; use impl='function'"
        )
    return impl


def grouped_supported(
    x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]
) -> bool:
    """Whether ``grouped_mm`` runs these tensors without a device sync.

    Args:
        x: (T, in) input, already in the weights' dtype.
        lora_a: G tensors (r_g, in).
        lora_b: G tensors (out, r_g).

    Returns:
        True on CPU for float32/bf16/fp16 with ``in`` and ``out`` 16-byte aligned, and on CUDA
        additionally only for bf16 on compute capability 9.x / 10.x (the no-sync fast path).
    """
    dtype = lora_a[0].dtype
    if dtype not in _GROUPED_DTYPES:
        return False
    alignment = 16 // dtype.itemsize
    if x.shape[1] % alignment or lora_b[0].shape[0] % alignment:
        return False
    if x.device.type == "cpu":
        return _grouped_mm_runs_on_cpu(dtype)
    if x.device.type == "cuda" and torch.version.hip is None and dtype == torch.bfloat16:
        return GROUPED_AVAILABLE and _hopper_or_blackwell(x.device) and x.data_ptr() % 16 == 0
    return False


@functools.cache
def _hopper_or_blackwell(device: torch.device) -> bool:
    """Compute capability 9.x / 10.x: where CUDA grouped_mm runs without reading offsets back."""
    capability = get_backend(str(device)).compute_capability()
    return capability is not None and capability[0] in (9, 10)


@functools.cache
def _grouped_mm_runs_on_cpu(dtype: torch.dtype) -> bool:
    """Try one tiny grouped matmul once per dtype: older torch has ``_grouped_mm`` for CUDA only."""
    if grouped_mm is None:
        return False
    try:
        grouped_mm(
            torch.zeros(2, 8, dtype=dtype),
            torch.zeros(2, 8, 8, dtype=dtype),
            offs=torch.tensor([1, 2], dtype=torch.int32),
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _check_inputs(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> None:
    """Raise ValueError unless the arguments describe the math of the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, in_features), got shape {tuple(x.shape)}")
    if not segments:
        raise ValueError("segmented_lora needs at least one segment")
    if not len(segments) == len(lora_a) == len(lora_b) == len(scales):
        raise ValueError(
            f"got {len(segments)} segments, {len(lora_a)} lora_a, {len(lora_b)} lora_b and "
            f"{len(scales)} scales; need one of each per segment"
        )
    cursor = 0
    for start, end in segments:
        if not cursor <= start <= end <= x.shape[0]:
            raise ValueError(
                f"segments must be sorted, non-overlapping and within {x.shape[0]} tokens, "
                f"got {list(segments)}"
            )
        cursor = end
    dtype, device = lora_a[0].dtype, lora_a[0].device
    out_features = lora_b[0].shape[0]
    for a, b in zip(lora_a, lora_b, strict=True):
        if a.dtype != dtype or b.dtype != dtype or a.device != device or b.device != device:
            raise ValueError("all LoRA weights must share one dtype and device")
        if a.dim() != 2 or b.dim() != 2 or a.shape != (b.shape[1], x.shape[1]):
            raise ValueError(
                f"lora_a must be (r, {x.shape[1]}) and lora_b (out, r), got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if b.shape[0] != out_features:
            raise ValueError(f"all lora_b must have {out_features} rows, got {tuple(b.shape)}")


def _gaps(segments: Sequence[tuple[int, int]], num_tokens: int) -> list[tuple[int, int]]:
    """The non-empty token ranges of [0, num_tokens) that no segment covers, in order."""
    gaps, cursor = [], 0
    for start, end in segments:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = end
    if cursor < num_tokens:
        gaps.append((cursor, num_tokens))
    return gaps


def _loop(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """The reference: each segment's delta written into a zero (T, out) tensor."""
    delta = x.new_zeros(x.shape[0], lora_b[0].shape[0])  # (T, out)
    for (start, end), a, b, scale in zip(segments, lora_a, lora_b, scales, strict=True):
        delta[start:end] = scale * ((x[start:end] @ a.T) @ b.T)
    return delta


def _grouped(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """Two grouped matmuls over stacked, rank-padded weights; gaps are zero-weight groups."""
    num_tokens, in_features = x.shape
    out_features = lora_b[0].shape[0]
    # grouped_mm wants the (T, r_pad) intermediate's row stride 16-byte aligned; zero rank
    # padding is exact and its gradient (ignored) is zero.
    alignment = 16 // x.dtype.itemsize
    r_pad = -(-max(a.shape[0] for a in lora_a) // alignment) * alignment
    zero_a = lora_a[0].new_zeros(r_pad, in_features)
    zero_b = lora_b[0].new_zeros(out_features, r_pad)
    ends: list[int] = []
    stacked_a: list[torch.Tensor] = []  # (r_pad, in) each
    stacked_b: list[torch.Tensor] = []  # (out, r_pad) each
    group_scales: list[float] = []
    cursor = 0
    for (start, end), a, b, scale in zip(segments, lora_a, lora_b, scales, strict=True):
        if start > cursor:
            ends.append(start)
            stacked_a.append(zero_a)
            stacked_b.append(zero_b)
            group_scales.append(0.0)
        ends.append(end)
        stacked_a.append(a if a.shape[0] == r_pad else F.pad(a, (0, 0, 0, r_pad - a.shape[0])))
        stacked_b.append(b if b.shape[1] == r_pad else F.pad(b, (0, r_pad - b.shape[1])))
        group_scales.append(scale)
        cursor = end
    if cursor < num_tokens:
        ends.append(num_tokens)
        stacked_a.append(zero_a)
        stacked_b.append(zero_b)
        group_scales.append(0.0)
    offs = host_to_device(ends, torch.int32, x.device)
    scale_b = host_to_device(group_scales, x.dtype, x.device).view(-1, 1, 1)
    weight_a = torch.stack(stacked_a)  # (G', r_pad, in)
    weight_b = torch.stack(stacked_b).mul_(scale_b)  # (G', out, r_pad)
    # .mT gives the column-major (G', in, r_pad) and (G', r_pad, out) views grouped_mm accepts.
    # contiguous(): a strided view of x (a column slice, say) may have an unaligned row stride.
    hidden = grouped_mm(x.contiguous(), weight_a.mT, offs=offs)  # (T, r_pad)
    delta = grouped_mm(hidden, weight_b.mT, offs=offs)  # (T, out)
    if delta.requires_grad:
        # grouped_mm's backward rejects stride-0 gradients such as the one of delta.sum().
        delta.register_hook(torch.Tensor.contiguous)
    return delta


def host_to_device(
    values: list[int] | list[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A small Python list as a tensor on ``device`` without waiting for the device.

    ``torch.tensor(values, device="cuda")`` copies synchronously (the host waits for the stream);
    a pinned, non-blocking copy is queued on the stream instead.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class _SegmentedLoraFunction(torch.autograd.Function):
    """Segment loop writing into preallocated buffers; temporaries do not grow with G.

    ``apply(x, segments, scales, mask, keep_ranges, *lora_a, *lora_b)`` with x (T, in) in the
    weights' dtype; ``mask`` None (no dropout) or the bool mask of ``dropout_segmented_lora``,
    whose dropped input ``x * keep`` is formed in forward and again in backward.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        segments: tuple[tuple[int, int], ...],
        scales: tuple[float, ...],
        mask: torch.Tensor | None,
        keep_ranges: KeepRanges,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        lora_a, lora_b = weights[: len(segments)], weights[len(segments) :]
        dropped = x if mask is None else dropped_input(x, mask, keep_ranges)
        delta = x.new_empty(x.shape[0], lora_b[0].shape[0])  # (T, out)
        for start, end in _gaps(segments, x.shape[0]):
            delta[start:end].zero_()
        # Every segment's scaled (tokens_g, r_g) intermediate in one flat buffer of at most
        # T * r_max elements: what backward needs for the B gradients.
        sizes = [
            (end - start) * a.shape[0] for (start, end), a in zip(segments, lora_a, strict=True)
        ]
        hidden = x.new_empty(sum(sizes))
        offset = 0
        for (start, end), a, b, scale, size in zip(
            segments, lora_a, lora_b, scales, sizes, strict=True
        ):
            h = hidden[offset : offset + size].view(end - start, a.shape[0])
            torch.mm(dropped[start:end], a.T, out=h).mul_(scale)
            torch.mm(h, b.T, out=delta[start:end])
            offset += size
        if mask is None:
            ctx.save_for_backward(x, hidden, *weights)
        else:
            ctx.save_for_backward(x, hidden, mask, *weights)
        ctx.dropout = mask is not None
        ctx.segments, ctx.scales, ctx.sizes, ctx.keep_ranges = segments, scales, sizes, keep_ranges
        return delta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_delta: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, hidden, *weights = ctx.saved_tensors
        mask = None
        if ctx.dropout:
            mask, *weights = weights
        segments, scales, sizes = ctx.segments, ctx.scales, ctx.sizes
        num_segments = len(segments)
        lora_a, lora_b = weights[:num_segments], weights[num_segments:]
        needs_x = ctx.needs_input_grad[0]
        needs_a = ctx.needs_input_grad[5 : 5 + num_segments]
        needs_b = ctx.needs_input_grad[5 + num_segments :]
        dropped = x  # the dropped input again, from x and the mask
        if mask is not None and any(needs_a):
            dropped = dropped_input(x, mask, ctx.keep_ranges)
        grad_x = None
        if needs_x:
            grad_x = torch.empty_like(x)  # (T, in)
            for start, end in _gaps(segments, x.shape[0]):
                grad_x[start:end].zero_()
        grads_a: list[torch.Tensor | None] = [None] * num_segments
        grads_b: list[torch.Tensor | None] = [None] * num_segments
        offset = 0
        for g, ((start, end), a, b, scale, size) in enumerate(
            zip(segments, lora_a, lora_b, scales, sizes, strict=True)
        ):
            grad_seg = grad_delta[start:end]  # (tokens_g, out); any strides, mm copes
            h = hidden[offset : offset + size].view(end - start, a.shape[0])
            offset += size
            if needs_b[g]:
                grads_b[g] = grad_seg.T @ h  # (out, r_g)
            if needs_x or needs_a[g]:
                grad_h = (grad_seg @ b).mul_(scale)  # (tokens_g, r_g)
                if needs_a[g]:
                    grads_a[g] = grad_h.T @ dropped[start:end]  # (r_g, in)
                if needs_x:
                    torch.mm(grad_h, a, out=grad_x[start:end])
        if grad_x is not None and mask is not None:  # through x * keep, as autograd's mul
            scale_by_keep_(grad_x, mask, ctx.keep_ranges)
        return grad_x, None, None, None, None, *grads_a, *grads_b
