"""Backward passes that aggregate the gradient per touched row.

Three features need each touched row's whole gradient rather than atomic adds
into a dense buffer: sparse gradients (``sparse=True``: a COO ``weight.grad``
over the touched rows), the fused optimizers (``optim.py``: the rows are
updated inside the backward and no gradient is returned), and the
deterministic Triton backward (``torch.use_deterministic_algorithms``: rows
summed in a fixed order, then scattered into the dense gradient).  The
reference path's bag backward goes this way too.  All of them reduce to one
computation, ``row_gradients``: the touched rows and their summed gradients,
by a sort and segment sum on the Triton path and by ``unique`` +
``index_add_`` on the reference path.

Gradients are described by *entries*: id ``i`` adds ``grad[sources[i]]``,
scaled by ``scales[i]`` (per-sample weight, 1/count) and by the variants'
factor of each row, to its ``k`` rows; ``keep`` drops padding.
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
    row_factors,
)

MODE_SUM, MODE_MEAN, MODE_MAX = 0, 1, 2


def row_gradients(rows, sources, grad, scales, keep, use_triton):
    """Touched rows and their summed gradients: see ``kernels/segment.py``."""
    if use_triton:
        return dispatch.kernels().bloom_row_gradients(rows, sources, grad, scales, keep)
    return bloom_row_gradients_reference(rows, sources, grad, scales, keep)


def densify(rows, values, num_rows, dtype):
    """The dense gradient holding ``values`` at ``rows`` and zeros elsewhere."""
    dense = values.new_zeros((num_rows, values.shape[1]))
    dense.index_copy_(0, rows, values)
    return dense.to(dtype)


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


def bag_of_ids(offsets, n):
    """The bag of every id position, from ``B + 1`` offsets."""
    lengths = bag_sizes(offsets)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)


def embedding_entries(ids, grad_out, padding_idx):
    """``(sources, grad, scales, keep)`` of a plain lookup: id ``i`` adds ``grad_out[i]``."""
    n = ids.numel()
    return torch.arange(n, device=ids.device), grad_out.reshape(n, -1), None, _live(ids, padding_idx)


def bag_entries(ids, offsets, grad_out, mode, per_sample_weights, padding_idx, argmax):
    """``(sources, grad, scales, keep)`` of a pooled lookup."""
    n = ids.numel()
    live = _live(ids, padding_idx)
    if mode == MODE_MAX:
        # Each column's gradient goes to one id: spread the bag gradients over
        # the ids they belong to (positions are unique per column, so this is
        # a plain, deterministic write).
        per_id = grad_out.new_zeros((n, grad_out.shape[1]))
        found = argmax >= 0
        columns = torch.arange(grad_out.shape[1], device=grad_out.device).expand_as(argmax)
        per_id[argmax[found], columns[found]] = grad_out[found]
        return torch.arange(n, device=ids.device), per_id, None, live
    sources = bag_of_ids(offsets, n)
    scales = per_sample_weights
    if mode == MODE_MEAN:
        counts = bag_sizes(offsets, live if live is not None else torch.ones(n, dtype=torch.bool, device=ids.device))
        scales = counts.clamp_min(1).to(grad_out.dtype).reciprocal()[sources]
    return sources, grad_out, scales, live


def per_id_gradient(entries):
    """The ``(n, dim)`` gradient each id receives from ``entries`` (before the
    variants' factors; padding is left to the caller)."""
    sources, grad, scales, _ = entries
    per_id = grad.index_select(0, sources)
    return per_id if scales is None else per_id * scales.to(per_id.dtype).unsqueeze(1)


def entry_row_gradients(rows, entries, factors, use_triton):
    """Touched rows and their gradients for ``entries``, with the variants' factors."""
    sources, grad, scales, keep = entries
    if factors is not None:
        if scales is not None:
            dtype = torch.promote_types(scales.dtype, factors.dtype)
            factors = scales.to(dtype).unsqueeze(1) * factors.to(dtype)
        scales = factors
    return row_gradients(rows, sources, grad, scales, keep, use_triton)


def importance_gradient(rows, entries, weight, signs, imp_rows, importance, use_triton):
    """Gradient of the importance weights: entry ``i`` adds
    ``scales[i] * signs[i, j] * <grad[sources[i]], weight[rows[i, j]]>`` to
    ``importance[imp_rows[i], j]``, summed per importance row like the table's."""
    sources, grad, scales, keep = entries
    acc = torch.float64 if importance.dtype == torch.float64 else torch.float32
    source_grads = grad.to(acc).index_select(0, sources)
    if scales is not None:
        source_grads = source_grads * scales.to(acc).unsqueeze(1)
    dots = torch.stack(
        [(source_grads * weight.index_select(0, rows[:, j]).to(acc)).sum(1) for j in range(rows.shape[1])], dim=1
    )
    n = imp_rows.numel()
    unique_rows, values = row_gradients(imp_rows.unsqueeze(1), torch.arange(n, device=dots.device),
                                        dots * signs.to(acc), None, keep, use_triton)  # fmt: skip
    return densify(unique_rows, values, importance.shape[0], importance.dtype)


def per_id_vectors(ids, weight, rows, padding_idx, use_triton, wide_ids, signed, importance):
    """``(n, dim)`` Bloom vectors of the flattened ids (zero for padding)."""
    if use_triton:
        return dispatch.kernels().bloom_forward(ids.reshape(-1), weight, seed_tensor(weight.device), rows.shape[1],
                                                padding_idx, rows, wide_ids, signed, importance)  # fmt: skip
    factors, _, _ = row_factors(ids, rows.shape[1], signed, importance)
    return bloom_forward_reference(ids.reshape(-1), weight, rows, padding_idx, factors)


def per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx, use_triton, wide_ids,
                                signed=False, importance=None):  # fmt: skip
    """d out[bag] / d psw[i] = <grad_out[bag], vector(id i)>; zero for padding."""
    vectors = per_id_vectors(ids, weight, rows, padding_idx, use_triton, wide_ids, signed, importance)
    grad_bags = grad_out[bag_of_ids(offsets, ids.numel())]
    return (vectors.to(grad_bags.dtype) * grad_bags).sum(dim=1)


def table_gradients(rows, entries, weight, importance, signed, ids, use_triton):
    """``(unique_rows, values, grad_importance)`` of a lookup's ``entries``."""
    factors, signs, imp_rows = row_factors(ids, rows.shape[1], signed, importance)
    unique_rows, values = entry_row_gradients(rows, entries, factors, use_triton)
    grad_importance = None
    if importance is not None:
        grad_importance = importance_gradient(rows, entries, weight, signs, imp_rows, importance, use_triton)
    return unique_rows, values, grad_importance


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
    def forward(ctx, weight, importance, ids, cached_rows, num_hash_functions, padding_idx, wide_ids, signed,
                use_triton, sparse, optimizer):  # fmt: skip
        num_rows = weight.shape[0]
        if use_triton:
            out = dispatch.kernels().bloom_forward(ids, weight, seed_tensor(weight.device), num_hash_functions,
                                                   padding_idx, cached_rows, wide_ids, signed, importance)  # fmt: skip
        else:
            rows = cached_rows if cached_rows is not None else hash_rows(ids, num_hash_functions, num_rows)
            factors, _, _ = row_factors(ids, num_hash_functions, signed, importance)
            out = bloom_forward_reference(ids, weight, rows, padding_idx, factors)
        ctx.save_for_backward(ids, cached_rows, importance)
        ctx.args = (weight, num_hash_functions, padding_idx, wide_ids, signed, use_triton, sparse, optimizer)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ids, cached_rows, importance = ctx.saved_tensors
        weight, k, padding_idx, wide_ids, signed, use_triton, sparse, optimizer = ctx.args
        rows = id_rows(ids, k, weight.shape[0], cached_rows, wide_ids, use_triton)
        entries = embedding_entries(ids, grad_out, padding_idx)
        # The importance gradient reads the rows a fused step is about to change.
        unique_rows, values, grad_importance = table_gradients(rows, entries, weight, importance, signed, ids,
                                                               use_triton)  # fmt: skip
        grad_weight = _finish(weight, unique_rows, values, sparse, optimizer, use_triton)
        return (grad_weight, grad_importance) + (None,) * 9


class RowwiseEmbeddingBag(torch.autograd.Function):
    """``bloom_embedding_bag`` whose backward returns a sparse gradient or
    applies a fused optimizer."""

    @staticmethod
    def forward(ctx, weight, per_sample_weights, importance, ids, offsets, num_hash_functions, mode, padding_idx,
                wide_ids, signed, use_triton, sparse, optimizer):  # fmt: skip
        if use_triton:
            out, argmax = dispatch.kernels().bloom_bag_forward(
                ids, offsets, weight, seed_tensor(weight.device), num_hash_functions, mode,
                per_sample_weights, padding_idx, wide_ids, signed, importance,
            )  # fmt: skip
        else:
            rows = hash_rows(ids, num_hash_functions, weight.shape[0])
            factors, _, _ = row_factors(ids, num_hash_functions, signed, importance)
            out, argmax = bloom_bag_forward_reference(ids, offsets, weight, rows, ("sum", "mean", "max")[mode],
                                                      per_sample_weights, padding_idx, factors)  # fmt: skip
        ctx.save_for_backward(ids, offsets, per_sample_weights, importance, argmax)
        ctx.args = (weight, num_hash_functions, mode, padding_idx, wide_ids, signed, use_triton, sparse, optimizer)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        ids, offsets, per_sample_weights, importance, argmax = ctx.saved_tensors
        weight, k, mode, padding_idx, wide_ids, signed, use_triton, sparse, optimizer = ctx.args
        rows = id_rows(ids, k, weight.shape[0], None, wide_ids, use_triton)
        grad_psw = None
        if ctx.needs_input_grad[1]:
            # Before a fused step changes the rows it reads.
            grad_psw = per_sample_weights_gradient(ids, offsets, weight, rows, grad_out, padding_idx, use_triton,
                                                   wide_ids, signed, importance).to(per_sample_weights.dtype)  # fmt: skip
        entries = bag_entries(ids, offsets, grad_out, mode, per_sample_weights, padding_idx, argmax)
        unique_rows, values, grad_importance = table_gradients(rows, entries, weight, importance, signed, ids,
                                                               use_triton)  # fmt: skip
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = _finish(weight, unique_rows, values, sparse, optimizer, use_triton)
        return (grad_weight, grad_psw, grad_importance) + (None,) * 10
