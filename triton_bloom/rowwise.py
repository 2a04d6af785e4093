"""Backward passes that aggregate the gradient per touched row.

Three features need each touched row's whole gradient rather than atomic adds
into a dense buffer: sparse gradients (``sparse=True``: a coalesced COO
``weight.grad`` over the touched rows), the fused optimizers (``optim.py``:
the rows are updated inside the backward and no gradient is returned), and
the deterministic Triton backward (``torch.use_deterministic_algorithms``:
rows summed in a fixed order, then scattered into the dense gradient).
All three reduce to one computation, ``row_gradients``: the touched rows and
their summed gradients, by a sort and segment sum on the Triton path and by
``unique`` + ``index_add_`` on the reference path.
"""

from __future__ import annotations

import torch

from . import dispatch
from .hashing import hash_rows, seed_tensor
from .reference import (
    bag_sizes,
    bloom_bag_forward_reference,
    bloom_forward_reference,
    bloom_row_gradients_reference,
)

MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2


def row_gradients(rows, sources, grad, scales, keep, use_triton):
    """Touched rows and their summed gradients: see ``kernels/segment.py``."""
    if use_triton:
        return dispatch.kernels().bloom_row_gradients(rows, sources, grad, scales, keep)
    return bloom_row_gradients_reference(rows, sources, grad, scales, keep)


def id_rows(ids, num_hash_functions, num_rows, cached_rows, wide_ids, use_triton):
    """The ``(n, k)`` int64 rows of the flattened ids."""
    n = ids.numel()
    if cached_rows is not None:
        return cached_rows.reshape(n, num_hash_functions).to(torch.int64)
    if use_triton:
        kernels = dispatch.kernels()
        return kernels.bloom_hash(ids.reshape(-1), seed_tensor(ids.device), num_hash_functions, num_rows, wide_ids)
    return hash_rows(ids.reshape(-1), num_hash_functions, num_rows).to(torch.int64)


def _live(ids, padding_idx):
    return None if padding_idx is None else ids.reshape(-1) != padding_idx


def embedding_row_gradients(ids, rows, grad_out, padding_idx, use_triton):
    n = ids.numel()
    sources = torch.arange(n, device=ids.device)
    return row_gradients(rows, sources, grad_out.reshape(n, -1), None, _live(ids, padding_idx), use_triton)


def bag_of_ids(offsets, n):
    """The bag of every id position, from ``B + 1`` offsets."""
    lengths = bag_sizes(offsets)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)


def bag_row_gradients(ids, offsets, rows, grad_out, mode, per_sample_weights, padding_idx, argmax, use_triton):
    n = ids.numel()
    live = _live(ids, padding_idx)
    if mode == MODE_MAX:
        # Each column's gradient goes to one id: spread the bag gradients over
        # the ids they belong to (positions are unique per column, so this is
        # a plain, deterministic write), then sum per row.
        per_id = grad_out.new_zeros((n, grad_out.shape[1]))
        found = argmax >= 0
        columns = torch.arange(grad_out.shape[1], device=grad_out.device).expand_as(argmax)
        per_id[argmax[found], columns[found]] = grad_out[found]
        return row_gradients(rows, torch.arange(n, device=ids.device), per_id, None, live, use_triton)
    sources = bag_of_ids(offsets, n)
    scales = per_sample_weights
    if mode == MODE_MEAN:
        counts = bag_sizes(offsets, live if live is not None else torch.ones(n, dtype=torch.bool, device=ids.device))
        scales = counts.clamp_min(1).to(grad_out.dtype).reciprocal()[sources]
    return row_gradients(rows, sources, grad_out, scales, live, use_triton)


def per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx, use_triton, wide_ids):
    """d out[bag] / d psw[i] = <grad_out[bag], vector(id i)>; zero for padding."""
    if use_triton:
        vectors = dispatch.kernels().bloom_forward(ids, weight, seed_tensor(weight.device), rows.shape[1],
                                                   padding_idx, rows, wide_ids)  # fmt: skip
    else:
        vectors = bloom_forward_reference(ids, weight, rows, padding_idx)
    grad_bags = grad_out[bag_of_ids(offsets, ids.numel())]
    return (vectors.to(grad_bags.dtype) * grad_bags).sum(dim=1)


def densify(rows, values, num_rows, dtype):
    """The dense gradient holding ``values`` at ``rows`` and zeros elsewhere."""
    dense = values.new_zeros((num_rows, values.shape[1]))
    dense.index_copy_(0, rows, values)
    return dense.to(dtype)


def _finish(weight, rows, values, sparse, optimizer, use_triton):
    """The table's gradient as autograd wants it, or ``None`` after a fused step."""
    if optimizer is not None:
        if use_triton:
            dispatch.kernels().bloom_rowwise_update(weight, rows, values, optimizer.kind, optimizer.lr,
                                                    getattr(optimizer, "eps", 0.0), optimizer.state(weight))  # fmt: skip
        else:
            optimizer.step_reference(weight, rows, values)
        return None
    if sparse:
        # Sorted, unique rows: coalesced by construction.
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values.to(weight.dtype), weight.shape,
                                       is_coalesced=True, check_invariants=False)  # fmt: skip
    return densify(rows, values, weight.shape[0], weight.dtype)


class RowwiseEmbedding(torch.autograd.Function):
    """``bloom_embedding`` whose backward returns a sparse gradient or applies
    a fused optimizer."""

    @staticmethod
    def forward(ctx, weight, ids, cached_rows, num_hash_functions, padding_idx, wide_ids, use_triton, sparse,
                optimizer):  # fmt: skip
        num_rows = weight.shape[0]
        if use_triton:
            out = dispatch.kernels().bloom_forward(ids, weight, seed_tensor(weight.device), num_hash_functions,
                                                   padding_idx, cached_rows, wide_ids)  # fmt: skip
        else:
            rows = cached_rows if cached_rows is not None else hash_rows(ids, num_hash_functions, num_rows)
            out = bloom_forward_reference(ids, weight, rows, padding_idx)
        ctx.save_for_backward(ids, cached_rows)
        ctx.args = (weight, num_hash_functions, padding_idx, wide_ids, use_triton, sparse, optimizer)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ids, cached_rows = ctx.saved_tensors
        weight, k, padding_idx, wide_ids, use_triton, sparse, optimizer = ctx.args
        rows = id_rows(ids, k, weight.shape[0], cached_rows, wide_ids, use_triton)
        unique_rows, values = embedding_row_gradients(ids, rows, grad_out, padding_idx, use_triton)
        return (_finish(weight, unique_rows, values, sparse, optimizer, use_triton),) + (None,) * 8


class RowwiseEmbeddingBag(torch.autograd.Function):
    """``bloom_embedding_bag`` whose backward returns a sparse gradient or
    applies a fused optimizer."""

    @staticmethod
    def forward(ctx, weight, per_sample_weights, ids, offsets, num_hash_functions, mode, padding_idx, wide_ids,
                use_triton, sparse, optimizer):  # fmt: skip
        if use_triton:
            out, argmax = dispatch.kernels().bloom_bag_forward(
                ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
                per_sample_weights, padding_idx, wide_ids,
            )  # fmt: skip
        else:
            rows = hash_rows(ids, num_hash_functions, weight.shape[0])
            out, argmax = bloom_bag_forward_reference(ids, offsets, weight, rows, ("sum", "mean", "max")[mode],
                                                      per_sample_weights, padding_idx)  # fmt: skip
        ctx.save_for_backward(ids, offsets, per_sample_weights, argmax)
        ctx.args = (weight, num_hash_functions, mode, padding_idx, wide_ids, use_triton, sparse, optimizer)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ids, offsets, per_sample_weights, argmax = ctx.saved_tensors
        weight, k, mode, padding_idx, wide_ids, use_triton, sparse, optimizer = ctx.args
        rows = id_rows(ids, k, weight.shape[0], None, wide_ids, use_triton)
        grad_psw = None
        if ctx.needs_input_grad[1]:
            # Before a fused step changes the rows it reads.
            grad_psw = per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx, use_triton,
                                                   wide_ids).to(per_sample_weights.dtype)  # fmt: skip
        unique_rows, values = bag_row_gradients(ids, offsets, rows, grad_out, mode, per_sample_weights, padding_idx,
                                                argmax, use_triton)  # fmt: skip
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = _finish(weight, unique_rows, values, sparse, optimizer, use_triton)
        return (grad_weight, grad_psw) + (None,) * 9
