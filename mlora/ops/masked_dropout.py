"""A branch ``f(dropout(x), *weights)`` that keeps a 1-byte mask, not the dropped input.

The math, exactly. Given ``x`` (T, in), a bool ``mask`` (T, in) and row ranges with scales
``[(start_g, end_g, s_g)]`` (sorted, non-overlapping), the inverted-dropout multipliers are::

    keep[t, i] = mask[t, i] * s_g     for t in [start_g, end_g)
    keep[t, i] = mask[t, i]           for t in no range (mask True there: no dropout)

and ``dropout_branch`` returns ``f(x * keep, *weights)`` with the gradients autograd gives that
expression, to ``x`` and every weight that requires grad.

Why: written plainly, autograd keeps the (T, in) fp32 multipliers (for the gradient of ``x``)
and ``f`` keeps the (T, in) fp32 dropped input (for its weights' gradients): 8 bytes a unit,
per projection, per layer, until backward. ``x`` itself is kept alive anyway by the layer that
made it, and q/k/v share it. This function keeps ``x`` and the mask alone (1 byte a unit) and
rebuilds ``keep`` and ``x * keep`` in backward, where it runs ``f`` again under autograd: the
recomputed branch is a LoRA's two rank-r matmuls, cheap beside the frozen layer, and the
gradients are bit for bit those of the plain expression (same inputs, same ops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Branch = Callable[..., torch.Tensor]


def keep_multipliers(
    mask: torch.Tensor, ranges: Sequence[tuple[int, int, float]], dtype: torch.dtype
) -> torch.Tensor:
    """(T, in) inverted-dropout multipliers in ``dtype`` from the bool mask (see module docstring).

    ``mask.to(dtype) * s`` gives exactly the values ``fill_keep`` writes (0, or ``s`` rounded
    to ``dtype``), so the dropped input is bit for bit the plain path's.
    """
    keep = mask.to(dtype)
    for start, end, scale in ranges:
        keep[start:end].mul_(scale)
    return keep


def dropout_branch(
    x: torch.Tensor,
    mask: torch.Tensor,
    ranges: Sequence[tuple[int, int, float]],
    branch: Branch,
    *weights: torch.Tensor,
) -> torch.Tensor:
    """``branch(x * keep, *weights)``, keeping ``x`` and the bool mask for backward.

    Args:
        x: (T, in) input, in the dtype ``branch`` computes in.
        mask: (T, in) bool, True where a unit is kept (everywhere outside ``ranges``).
        ranges: ``(start, end, scale)`` row ranges whose kept units are multiplied by ``scale``.
        branch: a differentiable function of the dropped input and ``weights``; called once in
            forward (no grad) and once in backward (to take its gradients).
        weights: tensors ``branch`` takes after the dropped input (e.g. LoRA A's and B's).

    Returns:
        What ``branch`` returns.
    """
    return _DropoutBranch.apply(x, mask, tuple(ranges), branch, *weights)


class _DropoutBranch(torch.autograd.Function):
    """``apply(x, mask, ranges, branch, *weights)``; see ``dropout_branch``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        mask: torch.Tensor,
        ranges: tuple[tuple[int, int, float], ...],
        branch: Branch,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        dropped = x * keep_multipliers(mask, ranges, x.dtype)  # freed when forward returns
        out = branch(dropped, *weights)
        ctx.save_for_backward(x, mask, *weights)
        ctx.ranges, ctx.branch = ranges, branch
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, mask, *weights = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        needs_w = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            x = x.detach().requires_grad_(needs_x)
            weights = [w.detach().requires_grad_(n) for w, n in zip(weights, needs_w, strict=True)]
            out = ctx.branch(x * keep_multipliers(mask, ctx.ranges, x.dtype), *weights)
            wanted = [t for t in (x, *weights) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        grad_x = next(grads) if needs_x else None
        grad_w = [next(grads) if n else None for n in needs_w]
        return grad_x, None, None, None, *grad_w
