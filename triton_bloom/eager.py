"""The eager CPU path: a plain dense lookup of CPU tensors outside
``torch.compile`` skips the custom op ``bloom_forward``.

The op's Python autograd wrapper costs about as much as the whole lookup of a
small batch (``torch.library`` rebuilds the op's schema arguments for every
call).  This path runs the same reference functions as the op's
implementation, so the two give the same bits, and it keeps what the op
cannot: the forward's rows, for the backward, and whether any id was padding.
"""

from __future__ import annotations

import torch

from . import native
from .checks import check_id_bounds, check_id_range
from .hashing import SEEDS, hash_rows, native_allowed
from .reference import (
    bloom_backward_reference,
    bloom_forward_reference,
)

# The eager CPU path. -------------------------------------------------------------
#
# A plain dense lookup on the CPU, outside torch.compile, skips the custom op:
# its Python autograd wrapper costs about as much as the whole lookup of a
# small batch (torch.library rebuilds the op's schema arguments for every
# call).  It runs the same reference functions as the op's implementation, so
# the two give the same bits, and it keeps what the op cannot: the forward's
# rows, for the backward, and whether any id was padding.


def eager_path(ids: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a plain dense lookup of ``ids`` in ``weight`` may take
    :func:`eager_lookup`: plain CPU tensors, no tracing, no tensor subclass,
    dispatch or function mode, no functorch transform."""
    return (
        native_allowed(ids)
        and (type(weight) is torch.Tensor or type(weight) is torch.nn.Parameter)
        and weight.device.type == "cpu"
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def hash_checked(ids: torch.Tensor, num_hash_functions: int, num_rows: int, num_embeddings, padding_idx):
    """``(rows, has_padding)``: the ids' ``(*, k)`` rows (``hash_rows``),
    after ``check_id_range``'s check, and whether any id is ``padding_idx``.
    The compiled loop does all three in one pass over the ids."""
    result = None
    if native_allowed(ids):
        result = native.rows(ids, SEEDS[:num_hash_functions], num_rows, pad=padding_idx)
    if result is None:
        check_id_range(ids, num_embeddings)
        has_padding = padding_idx is not None and ids.numel() > 0 and bool((ids == padding_idx).any())
        return hash_rows(ids, num_hash_functions, num_rows), has_padding
    rows, (low, high, pads) = result
    if ids.numel():
        check_id_bounds(low, high, num_embeddings)
    return rows, padding_idx is not None and pads > 0


class _EagerLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, num_hash_functions, padding_idx, num_embeddings):
        rows, has_padding = hash_checked(ids, num_hash_functions, weight.shape[0], num_embeddings, padding_idx)
        # A batch with no padding id needs no padding weights (same sums, same bits).
        padding_idx = padding_idx if has_padding else None
        ctx.padding_idx = padding_idx
        ctx.table = weight
        ctx.save_for_backward(ids if has_padding else None, rows)
        return bloom_forward_reference(ids, weight, rows, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ids, rows = ctx.saved_tensors
        weight = ctx.table
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = bloom_backward_reference(
                grad_out, ids, rows, weight.shape[0], ctx.padding_idx, dtype=weight.dtype, owner=weight
            )
        return None, grad_weight, None, None, None


def eager_lookup(
    ids: torch.Tensor, weight: torch.Tensor, *, num_hash_functions: int, padding_idx, num_embeddings
) -> torch.Tensor:
    """``bloom_forward`` of a plain dense lookup (no variant, hash cache,
    sparse gradient or fused step) on the CPU, when :func:`eager_path`
    allows it: the same outputs and gradients, bit for bit."""
    return _EagerLookup.apply(ids, weight, num_hash_functions, padding_idx, num_embeddings)
