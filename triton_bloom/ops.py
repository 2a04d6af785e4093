"""The Triton kernels as ``torch.library`` custom ops, joined by autograd.

``triton_bloom::bloom_forward`` and ``triton_bloom::bloom_backward`` wrap the
launchers in ``triton_bloom.kernels``; each has a fake implementation, so
``torch.compile`` traces through them without running a kernel, and the
forward's autograd formula is the backward op.  The kernels are launched
directly rather than through ``wrap_triton``: that also works under Triton's
interpreter, which ``wrap_triton`` rejects.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import kernels
from .hashing import seed_tensor

__all__ = ["bloom_forward", "bloom_backward"]


@torch.library.custom_op("triton_bloom::bloom_forward", mutates_args=())
def bloom_forward(
    ids: torch.Tensor,
    weight: torch.Tensor,
    rows: Optional[torch.Tensor],
    num_hash_functions: int,
    padding_idx: Optional[int],
    wide_ids: bool,
) -> torch.Tensor:
    """Triton forward: ``(*)`` ids to ``(*, dim)`` sums of their Bloom rows."""
    return kernels().bloom_forward(
        ids, weight, seed_tensor(weight.device), num_hash_functions, padding_idx, rows, wide_ids
    )


@bloom_forward.register_fake
def _(ids, weight, rows, num_hash_functions, padding_idx, wide_ids):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("triton_bloom::bloom_backward", mutates_args=())
def bloom_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    rows: Optional[torch.Tensor],
    num_rows: int,
    num_hash_functions: int,
    padding_idx: Optional[int],
    wide_ids: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triton backward: the dense ``(num_rows, dim)`` table gradient."""
    return kernels().bloom_backward(
        grad_out, ids, seed_tensor(grad_out.device), num_rows, num_hash_functions,
        padding_idx, rows, wide_ids, dtype,
    )  # fmt: skip


@bloom_backward.register_fake
def _(grad_out, ids, rows, num_rows, num_hash_functions, padding_idx, wide_ids, dtype):
    return grad_out.new_empty((num_rows, grad_out.shape[-1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    ids, weight, rows, num_hash_functions, padding_idx, wide_ids = inputs
    ctx.save_for_backward(ids, rows)
    ctx.num_rows = weight.shape[0]
    ctx.dtype = weight.dtype
    ctx.num_hash_functions = num_hash_functions
    ctx.padding_idx = padding_idx
    ctx.wide_ids = wide_ids


def _backward(ctx, grad_out):
    ids, rows = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = bloom_backward(
            grad_out, ids, rows, ctx.num_rows, ctx.num_hash_functions,
            ctx.padding_idx, ctx.wide_ids, ctx.dtype,
        )  # fmt: skip
    return None, grad_weight, None, None, None, None


bloom_forward.register_autograd(_backward, setup_context=_setup_context)
