"""The Triton kernels as ``torch.library`` custom ops, joined by autograd.

``triton_bloom::bloom_forward`` / ``bloom_backward`` and
``triton_bloom::bloom_bag_forward`` / ``bloom_bag_backward`` wrap the
launchers in ``triton_bloom.kernels``; each has a fake implementation, so
``torch.compile`` traces through them without running a kernel, and each
forward's autograd formula is its backward op.  The kernels are launched
directly rather than through ``wrap_triton``: that also works under Triton's
interpreter, which ``wrap_triton`` rejects.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import rowwise
from .dispatch import kernels
from .hashing import seed_tensor

__all__ = ["bloom_forward", "bloom_backward", "bloom_bag_forward", "bloom_bag_backward"]

# kernels/bag_forward.py's MODE_MAX, repeated so that tracing needs no Triton.
_MODE_MAX = 2


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
    """Triton backward: the dense ``(num_rows, dim)`` table gradient.

    Atomic adds make the float sums' order, and so their last bits, vary run
    to run; under ``torch.use_deterministic_algorithms(True)`` the rows are
    summed by a sort and segment reduction instead.
    """
    if torch.are_deterministic_algorithms_enabled():
        rows = rowwise.id_rows(ids, num_hash_functions, num_rows, rows, wide_ids, use_triton=True)
        unique_rows, values = rowwise.embedding_row_gradients(ids, rows, grad_out, padding_idx, use_triton=True)
        return rowwise.densify(unique_rows, values, num_rows, dtype)
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


@torch.library.custom_op("triton_bloom::bloom_bag_forward", mutates_args=())
def bloom_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    num_hash_functions: int,
    mode: int,
    padding_idx: Optional[int],
    wide_ids: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton bag forward: ``(B, dim)`` pooled vectors, and the max mode's
    ``(B, dim)`` arg-max positions (empty in other modes)."""
    return kernels().bloom_bag_forward(
        ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
        per_sample_weights, padding_idx, wide_ids,
    )  # fmt: skip


@bloom_bag_forward.register_fake
def _(ids, offsets, weight, per_sample_weights, num_hash_functions, mode, padding_idx, wide_ids):
    num_bags = offsets.shape[0] - 1
    out = weight.new_empty((num_bags, weight.shape[1]))
    argmax_shape = (num_bags, weight.shape[1]) if mode == _MODE_MAX else (0,)
    return out, weight.new_empty(argmax_shape, dtype=torch.int64)


@torch.library.custom_op("triton_bloom::bloom_bag_backward", mutates_args=())
def bloom_bag_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    argmax: torch.Tensor,
    num_hash_functions: int,
    mode: int,
    padding_idx: Optional[int],
    wide_ids: bool,
    psw_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton bag backward: the ``(num_rows, dim)`` table gradient and the
    ``(n,)`` per-sample weights' gradient (empty unless ``psw_grad``);
    deterministic under ``torch.use_deterministic_algorithms(True)``."""
    if torch.are_deterministic_algorithms_enabled():
        rows = rowwise.id_rows(ids, num_hash_functions, weight.shape[0], None, wide_ids, use_triton=True)
        grad_psw = weight.new_empty((0,))
        if psw_grad:
            grad_psw = rowwise.per_sample_weights_gradient(
                ids, offsets, weight, rows, grad_out, padding_idx, True, wide_ids
            ).to(per_sample_weights.dtype)
        unique_rows, values = rowwise.bag_row_gradients(
            ids, offsets, rows, grad_out, mode, per_sample_weights, padding_idx, argmax, use_triton=True
        )
        return rowwise.densify(unique_rows, values, weight.shape[0], weight.dtype), grad_psw
    grad_weight, grad_psw = kernels().bloom_bag_backward(
        grad_out, ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
        per_sample_weights, argmax, padding_idx, wide_ids, psw_grad,
    )  # fmt: skip
    if grad_psw is None:
        grad_psw = weight.new_empty((0,))
    return grad_weight, grad_psw


@bloom_bag_backward.register_fake
def _(grad_out, ids, offsets, weight, per_sample_weights, argmax, num_hash_functions, mode, padding_idx,
      wide_ids, psw_grad):  # fmt: skip
    psw_shape = (ids.numel(),) if psw_grad else (0,)
    psw_dtype = per_sample_weights.dtype if per_sample_weights is not None else weight.dtype
    return torch.empty_like(weight), weight.new_empty(psw_shape, dtype=psw_dtype)


def _bag_setup_context(ctx, inputs, output):
    ids, offsets, weight, per_sample_weights, num_hash_functions, mode, padding_idx, wide_ids = inputs
    _, argmax = output
    ctx.save_for_backward(ids, offsets, weight, per_sample_weights, argmax)
    ctx.num_hash_functions = num_hash_functions
    ctx.mode = mode
    ctx.padding_idx = padding_idx
    ctx.wide_ids = wide_ids


def _bag_backward(ctx, grad_out, _grad_argmax):
    ids, offsets, weight, per_sample_weights, argmax = ctx.saved_tensors
    psw_grad = per_sample_weights is not None and ctx.needs_input_grad[3]
    grad_weight, grad_psw = None, None
    if ctx.needs_input_grad[2] or psw_grad:
        grad_weight, grad_psw = bloom_bag_backward(
            grad_out, ids, offsets, weight, per_sample_weights, argmax, ctx.num_hash_functions, ctx.mode,
            ctx.padding_idx, ctx.wide_ids, psw_grad,
        )  # fmt: skip
    return (None, None, grad_weight if ctx.needs_input_grad[2] else None, grad_psw if psw_grad else None,
            None, None, None, None)  # fmt: skip


bloom_bag_forward.register_autograd(_bag_backward, setup_context=_bag_setup_context)
