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
from .reference import bloom_backward_reference, bloom_bag_forward_reference, bloom_forward_reference, row_factors

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
    importance: Optional[torch.Tensor],
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    backend: str,
) -> torch.Tensor:
    """``(*)`` ids to the ``(*, dim)`` sums of their Bloom rows (hashed, or
    looked up in ``hash_cache``), each row times its sign hash's +-1 when
    ``signed`` and its importance weight when ``importance`` is given."""
    check_id_range(ids, num_embeddings)
    rows = cached_rows(ids, hash_cache)
    if dispatch.use_triton(backend, weight.device):
        return dispatch.kernels().bloom_forward(
            ids, weight, seed_tensor(weight.device), num_hash_functions, padding_idx, rows,
            wide_ids_for(ids, num_embeddings), signed, importance,
        )  # fmt: skip
    if rows is None:
        rows = hash_rows(ids, num_hash_functions, weight.shape[0])
    factors, _, _ = row_factors(ids, num_hash_functions, signed, importance)
    return bloom_forward_reference(ids, weight, rows, padding_idx, factors)


@bloom_forward.register_fake
def _(ids, weight, hash_cache, importance, num_hash_functions, padding_idx, num_embeddings, signed, backend):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("triton_bloom::bloom_backward", mutates_args=())
def bloom_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    hash_cache: Optional[torch.Tensor],
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``bloom_forward``: the dense table gradient, and the
    importance weights' (empty without them).

    The Triton kernel's atomic adds make the float sums' order, and so their
    last bits, vary run to run; under ``torch.use_deterministic_algorithms``
    the rows are summed by a sort and segment reduction instead.
    """
    rows = cached_rows(ids, hash_cache)
    use_triton = dispatch.use_triton(backend, grad_out.device)
    wide_ids = wide_ids_for(ids, num_embeddings)
    if use_triton and not torch.are_deterministic_algorithms_enabled():
        grad_weight, grad_importance = dispatch.kernels().bloom_backward(
            grad_out, ids, seed_tensor(grad_out.device), weight.shape[0], num_hash_functions, padding_idx, rows,
            wide_ids, weight.dtype, signed, weight, importance,
        )  # fmt: skip
    elif use_triton:
        rows = rowwise.id_rows(ids, num_hash_functions, weight.shape[0], rows, wide_ids, use_triton=True)
        entries = rowwise.embedding_entries(ids, grad_out, padding_idx)
        unique_rows, values, grad_importance = rowwise.table_gradients(rows, entries, weight, importance, signed, ids,
                                                                       use_triton=True)  # fmt: skip
        grad_weight = rowwise.densify(unique_rows, values, weight.shape[0], weight.dtype)
    else:
        if rows is None:
            rows = hash_rows(ids, num_hash_functions, weight.shape[0])
        factors, signs, imp_rows = row_factors(ids, num_hash_functions, signed, importance)
        grad_weight = bloom_backward_reference(grad_out, ids, rows, weight.shape[0], padding_idx, weight.dtype,
                                               factors)  # fmt: skip
        grad_importance = None
        if importance is not None:
            entries = rowwise.embedding_entries(ids, grad_out, padding_idx)
            grad_importance = rowwise.importance_gradient(rows.reshape(-1, num_hash_functions).to(torch.int64),
                                                          entries, weight, signs, imp_rows, importance, False)  # fmt: skip
    if grad_importance is None:
        grad_importance = weight.new_empty((0,))
    return grad_weight, grad_importance


@bloom_backward.register_fake
def _(grad_out, ids, hash_cache, weight, importance, num_hash_functions, padding_idx, num_embeddings, signed,
      backend):  # fmt: skip
    grad_importance = torch.empty_like(importance) if importance is not None else weight.new_empty((0,))
    return torch.empty_like(weight), grad_importance


def _setup_context(ctx, inputs, output):
    ids, weight, hash_cache, importance, num_hash_functions, padding_idx, num_embeddings, signed, backend = inputs
    ctx.save_for_backward(ids, hash_cache, weight, importance)
    ctx.args = (num_hash_functions, padding_idx, num_embeddings, signed, backend)


def _backward(ctx, grad_out):
    ids, hash_cache, weight, importance = ctx.saved_tensors
    grad_weight, grad_importance = None, None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        grad_weight, grad_importance = bloom_backward(grad_out, ids, hash_cache, weight, importance, *ctx.args)
    return (None, grad_weight if ctx.needs_input_grad[1] else None, None,
            grad_importance if ctx.needs_input_grad[3] else None, None, None, None, None, None)  # fmt: skip


bloom_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("triton_bloom::bloom_bag_forward", mutates_args=())
def bloom_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    num_hash_functions: int,
    mode: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, dim)`` pooled Bloom vectors of the bags ``ids[offsets[b]:offsets[b+1]]``,
    and for max mode the ``(B, dim)`` positions of the maxima (empty otherwise)."""
    check_id_range(ids, num_embeddings)
    check_offsets(offsets, ids.numel())
    if dispatch.use_triton(backend, weight.device):
        return dispatch.kernels().bloom_bag_forward(
            ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode, per_sample_weights,
            padding_idx, wide_ids_for(ids, num_embeddings), signed, importance,
        )  # fmt: skip
    rows = hash_rows(ids, num_hash_functions, weight.shape[0])
    factors, _, _ = row_factors(ids, num_hash_functions, signed, importance)
    return bloom_bag_forward_reference(ids, offsets, weight, rows, MODES[mode], per_sample_weights, padding_idx,
                                       factors)  # fmt: skip


@bloom_bag_forward.register_fake
def _(ids, offsets, weight, per_sample_weights, importance, num_hash_functions, mode, padding_idx, num_embeddings,
      signed, backend):  # fmt: skip
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
    importance: Optional[torch.Tensor],
    argmax: torch.Tensor,
    num_hash_functions: int,
    mode: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    backend: str,
    psw_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``bloom_bag_forward``: the ``(num_rows, dim)`` table's, the
    ``(n,)`` per-sample weights' (empty unless ``psw_grad``) and the importance
    weights' (empty without them); deterministic under
    ``torch.use_deterministic_algorithms(True)``."""
    use_triton = dispatch.use_triton(backend, weight.device)
    wide_ids = wide_ids_for(ids, num_embeddings)
    if use_triton and not torch.are_deterministic_algorithms_enabled():
        grad_weight, grad_psw, grad_importance = dispatch.kernels().bloom_bag_backward(
            grad_out, ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
            per_sample_weights, argmax, padding_idx, wide_ids, psw_grad, signed, importance,
        )  # fmt: skip
    else:
        # Per touched row (the reference, and the deterministic Triton path).
        rows = rowwise.id_rows(ids, num_hash_functions, weight.shape[0], None, wide_ids, use_triton)
        grad_psw = None
        if psw_grad:
            grad_psw = rowwise.per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx,
                                                           use_triton, wide_ids, signed, importance)  # fmt: skip
        entries = rowwise.bag_entries(ids, offsets, grad_out, mode, per_sample_weights, padding_idx, argmax)
        if use_triton:
            unique_rows, values, grad_importance = rowwise.table_gradients(rows, entries, weight, importance, signed,
                                                                           ids, use_triton)  # fmt: skip
            grad_weight = rowwise.densify(unique_rows, values, weight.shape[0], weight.dtype)
        else:
            # On CPU, spreading each bag's gradient over its ids and scattering
            # with index_add_ is ~2x faster than sorting the touched rows.
            factors, signs, imp_rows = row_factors(ids, num_hash_functions, signed, importance)
            grad_weight = bloom_backward_reference(rowwise.per_id_gradient(entries), ids, rows, weight.shape[0],
                                                   padding_idx, weight.dtype, factors)  # fmt: skip
            grad_importance = None
            if importance is not None:
                grad_importance = rowwise.importance_gradient(rows, entries, weight, signs, imp_rows, importance,
                                                              use_triton=False)  # fmt: skip
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    grad_psw = grad_psw.to(per_sample_weights.dtype) if grad_psw is not None else weight.new_empty((0,))
    grad_importance = grad_importance if grad_importance is not None else weight.new_empty((0,))
    return grad_weight, grad_psw, grad_importance


@bloom_bag_backward.register_fake
def _(grad_out, ids, offsets, weight, per_sample_weights, importance, argmax, num_hash_functions, mode, padding_idx,
      num_embeddings, signed, backend, psw_grad):  # fmt: skip
    psw_shape = (ids.numel(),) if psw_grad else (0,)
    psw_dtype = per_sample_weights.dtype if per_sample_weights is not None else weight.dtype
    grad_importance = torch.empty_like(importance) if importance is not None else weight.new_empty((0,))
    return torch.empty_like(weight), weight.new_empty(psw_shape, dtype=psw_dtype), grad_importance


def _bag_setup_context(ctx, inputs, output):
    (ids, offsets, weight, per_sample_weights, importance, num_hash_functions, mode, padding_idx, num_embeddings,
     signed, backend) = inputs  # fmt: skip
    _, argmax = output
    ctx.save_for_backward(ids, offsets, weight, per_sample_weights, importance, argmax)
    ctx.args = (num_hash_functions, mode, padding_idx, num_embeddings, signed, backend)


def _bag_backward(ctx, grad_out, _grad_argmax):
    ids, offsets, weight, per_sample_weights, importance, argmax = ctx.saved_tensors
    psw_grad = per_sample_weights is not None and ctx.needs_input_grad[3]
    grads = (None, None, None)
    if ctx.needs_input_grad[2] or psw_grad or ctx.needs_input_grad[4]:
        grads = bloom_bag_backward(grad_out, ids, offsets, weight, per_sample_weights, importance, argmax,
                                   *ctx.args, psw_grad)  # fmt: skip
    grad_weight, grad_psw, grad_importance = grads
    return (None, None, grad_weight if ctx.needs_input_grad[2] else None, grad_psw if psw_grad else None,
            grad_importance if ctx.needs_input_grad[4] else None) + (None,) * 6  # fmt: skip


bloom_bag_forward.register_autograd(_bag_backward, setup_context=_bag_setup_context)
