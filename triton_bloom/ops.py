"""The Bloom lookups as ``torch.library`` custom ops, joined by autograd.

``triton_bloom::bloom_forward`` / ``bloom_backward`` and
``triton_bloom::bloom_bag_forward`` / ``bloom_bag_backward`` run the Triton
kernels or the PyTorch reference, as ``dispatch`` decides, behind one
schema.  Each has a fake implementation, so ``torch.compile(fullgraph=True)``
traces a model through them without a graph break, and each forward's
autograd formula is its backward op.  The checks that read tensor values (ids
in range, offsets in order) run inside the implementations, where tensors are
real, and so never break a graph either.

The kernels are launched directly rather than through ``wrap_triton``: that
also works under Triton's interpreter, which ``wrap_triton`` rejects.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, rowwise
from .checks import check_id_range, check_offsets
from .hashing import WIDE_ID_START, hash_rows, seed_tensor
from .reference import bloom_backward_reference, bloom_bag_forward_reference, bloom_forward_reference

__all__ = ["bloom_forward", "bloom_backward", "bloom_bag_forward", "bloom_bag_backward", "MODE_MAX"]

# kernels/bag_forward.py's pooling codes, repeated so that tracing needs no Triton.
MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2
MODES = ("sum", "mean", "max")


def wide_ids_for(ids: torch.Tensor, num_embeddings: Optional[int]) -> bool:
    # Only int64 ids that may reach 2**31 need the kernels' 8-byte hashing.
    return ids.dtype == torch.int64 and (num_embeddings is None or num_embeddings > WIDE_ID_START)


def cached_rows(ids, hash_cache):
    """The ids' ``(*, k)`` rows from a ``(num_embeddings, k)`` hash cache."""
    if hash_cache is None:
        return None
    return hash_cache.index_select(0, ids.reshape(-1)).view(*ids.shape, hash_cache.shape[1])


@torch.library.custom_op("triton_bloom::bloom_forward", mutates_args=())
def bloom_forward(
    ids: torch.Tensor,
    weight: torch.Tensor,
    hash_cache: Optional[torch.Tensor],
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    backend: str,
) -> torch.Tensor:
    """``(*)`` ids to the ``(*, dim)`` sums of their Bloom rows (hashed, or
    looked up in ``hash_cache``)."""
    check_id_range(ids, num_embeddings)
    rows = cached_rows(ids, hash_cache)
    if dispatch.use_triton(backend, weight.device):
        return dispatch.kernels().bloom_forward(
            ids, weight, seed_tensor(weight.device), num_hash_functions, padding_idx, rows,
            wide_ids_for(ids, num_embeddings),
        )  # fmt: skip
    if rows is None:
        rows = hash_rows(ids, num_hash_functions, weight.shape[0])
    return bloom_forward_reference(ids, weight, rows, padding_idx)


@bloom_forward.register_fake
def _(ids, weight, hash_cache, num_hash_functions, padding_idx, num_embeddings, backend):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("triton_bloom::bloom_backward", mutates_args=())
def bloom_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    hash_cache: Optional[torch.Tensor],
    num_rows: int,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    backend: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense ``(num_rows, dim)`` table gradient of ``bloom_forward``.

    The Triton kernel's atomic adds make the float sums' order, and so their
    last bits, vary run to run; under ``torch.use_deterministic_algorithms``
    the rows are summed by a sort and segment reduction instead.
    """
    rows = cached_rows(ids, hash_cache)
    if dispatch.use_triton(backend, grad_out.device):
        wide_ids = wide_ids_for(ids, num_embeddings)
        if torch.are_deterministic_algorithms_enabled():
            rows = rowwise.id_rows(ids, num_hash_functions, num_rows, rows, wide_ids, use_triton=True)
            unique_rows, values = rowwise.embedding_row_gradients(ids, rows, grad_out, padding_idx, use_triton=True)
            return rowwise.densify(unique_rows, values, num_rows, dtype)
        return dispatch.kernels().bloom_backward(
            grad_out, ids, seed_tensor(grad_out.device), num_rows, num_hash_functions, padding_idx, rows,
            wide_ids, dtype,
        )  # fmt: skip
    if rows is None:
        rows = hash_rows(ids, num_hash_functions, num_rows)
    return bloom_backward_reference(grad_out, ids, rows, num_rows, padding_idx, dtype)


@bloom_backward.register_fake
def _(grad_out, ids, hash_cache, num_rows, num_hash_functions, padding_idx, num_embeddings, backend, dtype):
    return grad_out.new_empty((num_rows, grad_out.shape[-1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    ids, weight, hash_cache, num_hash_functions, padding_idx, num_embeddings, backend = inputs
    ctx.save_for_backward(ids, hash_cache)
    ctx.num_rows = weight.shape[0]
    ctx.dtype = weight.dtype
    ctx.args = (num_hash_functions, padding_idx, num_embeddings, backend)


def _backward(ctx, grad_out):
    ids, hash_cache = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[1]:
        k, padding_idx, num_embeddings, backend = ctx.args
        grad_weight = bloom_backward(grad_out, ids, hash_cache, ctx.num_rows, k, padding_idx, num_embeddings, backend,
                                     ctx.dtype)  # fmt: skip
    return None, grad_weight, None, None, None, None, None


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
    num_embeddings: Optional[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, dim)`` pooled Bloom vectors of the bags ``ids[offsets[b]:offsets[b+1]]``,
    and for max mode the ``(B, dim)`` positions of the maxima (empty otherwise)."""
    check_id_range(ids, num_embeddings)
    check_offsets(offsets, ids.numel())
    if dispatch.use_triton(backend, weight.device):
        return dispatch.kernels().bloom_bag_forward(
            ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode, per_sample_weights,
            padding_idx, wide_ids_for(ids, num_embeddings),
        )  # fmt: skip
    rows = hash_rows(ids, num_hash_functions, weight.shape[0])
    return bloom_bag_forward_reference(ids, offsets, weight, rows, MODES[mode], per_sample_weights, padding_idx)


@bloom_bag_forward.register_fake
def _(ids, offsets, weight, per_sample_weights, num_hash_functions, mode, padding_idx, num_embeddings, backend):
    num_bags = offsets.shape[0] - 1
    out = weight.new_empty((num_bags, weight.shape[1]))
    argmax_shape = (num_bags, weight.shape[1]) if mode == MODE_MAX else (0,)
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
    num_embeddings: Optional[int],
    backend: str,
    psw_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(num_rows, dim)`` table gradient of ``bloom_bag_forward`` and the
    ``(n,)`` per-sample weights' gradient (empty unless ``psw_grad``);
    deterministic under ``torch.use_deterministic_algorithms(True)``."""
    use_triton = dispatch.use_triton(backend, weight.device)
    wide_ids = wide_ids_for(ids, num_embeddings)
    if use_triton and not torch.are_deterministic_algorithms_enabled():
        grad_weight, grad_psw = dispatch.kernels().bloom_bag_backward(
            grad_out, ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
            per_sample_weights, argmax, padding_idx, wide_ids, psw_grad,
        )  # fmt: skip
    else:
        # Per touched row (the reference, and the deterministic Triton path).
        rows = rowwise.id_rows(ids, num_hash_functions, weight.shape[0], None, wide_ids, use_triton)
        grad_psw = None
        if psw_grad:
            grad_psw = rowwise.per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx,
                                                           use_triton, wide_ids)  # fmt: skip
        unique_rows, values = rowwise.bag_row_gradients(ids, offsets, rows, grad_out, mode, per_sample_weights,
                                                        padding_idx, argmax, use_triton)  # fmt: skip
        grad_weight = rowwise.densify(unique_rows, values, weight.shape[0], weight.dtype)
    if grad_psw is None:
        return grad_weight, weight.new_empty((0,))
    return grad_weight, grad_psw.to(per_sample_weights.dtype)


@bloom_bag_backward.register_fake
def _(grad_out, ids, offsets, weight, per_sample_weights, argmax, num_hash_functions, mode, padding_idx,
      num_embeddings, backend, psw_grad):  # fmt: skip
    psw_shape = (ids.numel(),) if psw_grad else (0,)
    psw_dtype = per_sample_weights.dtype if per_sample_weights is not None else weight.dtype
    return torch.empty_like(weight), weight.new_empty(psw_shape, dtype=psw_dtype)


def _bag_setup_context(ctx, inputs, output):
    ids, offsets, weight, per_sample_weights, num_hash_functions, mode, padding_idx, num_embeddings, backend = inputs
    _, argmax = output
    ctx.save_for_backward(ids, offsets, weight, per_sample_weights, argmax)
    ctx.args = (num_hash_functions, mode, padding_idx, num_embeddings, backend)


def _bag_backward(ctx, grad_out, _grad_argmax):
    ids, offsets, weight, per_sample_weights, argmax = ctx.saved_tensors
    psw_grad = per_sample_weights is not None and ctx.needs_input_grad[3]
    grad_weight, grad_psw = None, None
    if ctx.needs_input_grad[2] or psw_grad:
        grad_weight, grad_psw = bloom_bag_backward(grad_out, ids, offsets, weight, per_sample_weights, argmax,
                                                   *ctx.args, psw_grad)  # fmt: skip
    return (None, None, grad_weight if ctx.needs_input_grad[2] else None, grad_psw if psw_grad else None,
            None, None, None, None, None)  # fmt: skip


bloom_bag_forward.register_autograd(_bag_backward, setup_context=_bag_setup_context)
