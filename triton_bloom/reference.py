"""The Bloom embedding in plain PyTorch: the CPU path, the fallback where
Triton is missing, and the oracle every kernel is tested against.

Forward is one fused ``embedding_bag`` over the ``(n, k)`` hashed rows (each
id is a bag of its ``k`` rows), so no ``(n, k, dim)`` tensor is ever built.
Backward scatter-adds the output gradient into the rows with ``index_add_``,
one call per hash function: on CPU that beats ``embedding_bag``'s own
backward by about 2x, because it skips the sort.

Bags (``bloom_bag_forward_reference``) expand each id into its ``k`` rows and
pool them with one ``embedding_bag``, the padding and the mean folded into
per-sample weights; ``max`` pools the per-id vectors.  A bag's dense gradient
is spread over its ids and scattered by the same ``index_add_`` backward.
Sparse gradients and fused optimizer steps need each touched row's summed
gradient (``bloom_row_gradients_reference``, then
``bloom_rowwise_update_reference`` for a fused step).

The ``bloom_*_reference`` functions are twins of the launchers in
``triton_bloom.kernels``; ``triton_bloom.ops`` picks one of the two per
operation and joins forward and backward for autograd.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from . import native
from .constants import FUSED_ROWWISE_ADAGRAD, FUSED_SGD, MODE_MAX, MODE_MEAN, MODE_SUM, accumulation_dtype
from .hashing import bloom_signs, importance_rows
from .rounding import ROUNDED_DTYPES, base_key, random_bits, stochastic_round

__all__ = [
    "bloom_forward_reference",
    "bloom_backward_reference",
    "bloom_bag_forward_reference",
    "bloom_row_gradients_reference",
    "bloom_rowwise_update_reference",
    "row_factors",
    "with_hot_rows",
    "bag_sizes",
    "gradient_buffer",
    "release_gradient_buffers",
]


def row_factors(
    ids: torch.Tensor,
    num_hash_functions: int,
    *,
    signed: bool = False,
    importance: Optional[torch.Tensor] = None,
    hot: Optional[torch.Tensor] = None,
):
    """The variants' ``(n, k)`` factors of the flattened ids' rows, or ``None``.

    Returns ``(factors, signs, importance_rows)``: ``signs * importance`` in
    float32 (float64 for float64 importance weights), the ``(n, k)`` +-1 signs
    (ones when not ``signed``) and the ``(n,)`` importance rows (``None``
    without importance weights).  ``hot`` (the ids' :func:`hot_rows`) makes
    a hot id read its private row once: factors ``(1, 0, ..., 0)``, and signs
    of 0, since no importance weight of it is read.
    """
    if not signed and importance is None and hot is None:
        return None, None, None
    ids = ids.reshape(-1)
    dtype = accumulation_dtype(importance.dtype if importance is not None else torch.float32)
    if signed:
        signs = bloom_signs(ids, num_hash_functions).to(dtype)
    else:
        signs = torch.ones((ids.numel(), num_hash_functions), dtype=dtype, device=ids.device)
    imp_rows = None
    factors = signs
    if importance is not None:
        imp_rows = importance_rows(ids, importance.shape[0])
        factors = signs * importance.to(dtype).index_select(0, imp_rows)
    if hot is not None:
        is_hot = (hot.reshape(-1) >= 0).unsqueeze(1)
        first_only = torch.zeros(num_hash_functions, dtype=dtype, device=ids.device)
        first_only[0] = 1
        factors = torch.where(is_hot, first_only, factors)
        signs = signs.masked_fill(is_hot, 0)
    return factors, signs, imp_rows


def with_hot_rows(rows: torch.Tensor, hot: Optional[torch.Tensor]) -> torch.Tensor:
    """``(*, k)`` rows with every hot id's ``k`` rows replaced by its private
    row (``hot``: the ids' :func:`hot_rows`, ``-1`` for the others), so a hot
    id touches no shared row; :func:`row_factors` weighs them ``(1, 0, ...)``."""
    if hot is None:
        return rows
    # int64: a private row may lie past int32's range when the shared rows do not.
    hot = hot.reshape(rows.shape[:-1]).unsqueeze(-1)
    return torch.where(hot >= 0, hot, rows.to(torch.int64))


def bloom_forward_reference(
    ids: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    padding_idx: Optional[int] = None,
    *,
    factors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum of the Bloom rows of every id.

    Args:
        ids (Tensor): integer ids, shape ``(*)``.
        weight (Tensor): the ``(num_rows, dim)`` table.
        rows (Tensor): the ids' rows from :func:`triton_bloom.hashing.hash_rows`,
            shape ``(*, k)``.
        padding_idx (int, optional): id whose output is zero.
        factors (Tensor, optional): ``(n, k)`` weights of the rows (the
            variants', from :func:`row_factors`).

    Returns:
        Tensor of shape ``(*, dim)`` in ``weight``'s dtype.
    """
    k = rows.shape[-1]
    dim = weight.shape[1]
    flat_rows = rows.reshape(-1, k)
    if flat_rows.shape[0] == 0:
        return weight.new_zeros((*ids.shape, dim))
    per_sample_weights = factors.to(weight.dtype) if factors is not None else None
    if padding_idx is not None:
        keep = (ids.reshape(-1, 1) != padding_idx).to(weight.dtype)
        per_sample_weights = keep.expand(-1, k) if per_sample_weights is None else per_sample_weights * keep
    if per_sample_weights is None and not (weight.requires_grad and torch.is_grad_enabled()):
        # A small batch sums on one thread (same bits), so a busy machine
        # does not stall it; None for a large one.
        out = native.gather_sum(weight, flat_rows)
        if out is not None:
            return out.view(*ids.shape, dim)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.reshape(-1)
    # The op F.embedding_bag calls for 2-D input, with the bags' offsets cached
    # rather than built by every call.
    n = flat_rows.shape[0]
    out = torch.embedding_bag(
        weight,
        flat_rows.reshape(-1),
        _bag_starts(n, k, flat_rows.dtype, weight.device),
        False,
        0,
        False,
        per_sample_weights,
        False,
        None,
    )[0]
    return out.view(*ids.shape, dim)


_starts: dict = {}


def _bag_starts(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``arange(0, n * k, k)``: where each id's bag of ``k`` rows starts."""
    key = (k, dtype, device)
    starts = _starts.get(key)
    if starts is None or starts.numel() < n:
        starts = torch.arange(0, max(n, 1024) * k, k, dtype=dtype, device=device)
        if device.type == "cpu":
            _starts[key] = starts
    return starts[:n]


# Dense gradients kept for reuse, one per table (see gradient_buffer).
_buffers: dict = {}
_buffers_lock = threading.Lock()
# Below this a fresh buffer costs little: malloc serves it from memory it keeps.
POOLED_GRADIENT_BYTES = 1 << 20


def _storage_users(storage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def gradient_buffer(
    shape: tuple, dtype: torch.dtype, device: torch.device, owner: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """A zeroed ``shape`` tensor for ``owner``'s dense gradient, in memory
    that earlier steps' gradients of ``owner`` used when nothing holds them
    any more.

    A fresh table-sized ``torch.zeros`` on the CPU comes from ``mmap``
    (glibc maps blocks above 32 MB, and unmaps them on free), so every step
    page-faults the whole gradient in again: 12,500 faults and ~15 ms for a
    51 MB table, against ~1.5 ms to zero memory already mapped.  The pool
    keeps the storage of the last gradient it handed out and reuses it only
    when it is the storage's sole holder: while ``weight.grad``, a view of
    it, or any tensor a caller kept still uses it, a fresh buffer is
    returned (and kept instead), so accumulated and retained gradients are
    never overwritten.  Autograd takes the returned tensor as ``.grad``
    without a copy, as it takes a fresh one.  The pool's buffer lives as
    long as ``owner`` (``release_gradient_buffers`` frees it sooner).

    Args:
        shape (tuple): ``(num_rows, dim)``.
        dtype (torch.dtype), device (torch.device): of the gradient.
        owner (Tensor, optional): the table; ``None`` gives a fresh buffer.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if owner is None or device.type != "cpu" or nbytes < POOLED_GRADIENT_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    key = id(owner)
    with _buffers_lock:
        entry = _buffers.get(key)
        if entry is not None and entry[1] == (shape, dtype) and _storage_users(entry[0]) == 1:
            # The view is made under the lock: from here on the storage has a second holder.
            grad = torch.empty(0, dtype=dtype, device=device).set_(entry[0], 0, shape)
        else:
            grad = torch.empty(shape, dtype=dtype, device=device)
            if entry is None:
                try:
                    weakref.finalize(owner, _buffers.pop, key, None)
                except TypeError:  # an owner without weak references: no pooling
                    return grad.zero_()
            _buffers[key] = (grad.untyped_storage(), (shape, dtype))
    return native.zero(grad)


def release_gradient_buffers() -> None:
    """Free the dense gradients :func:`gradient_buffer` keeps for reuse
    (gradients in use stay valid: their tensors hold their memory)."""
    with _buffers_lock:
        _buffers.clear()


def bloom_backward_reference(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    padding_idx: Optional[int] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    factors: Optional[torch.Tensor] = None,
    owner: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient of :func:`bloom_forward_reference` with respect to the table.

    Returns the dense ``(num_rows, dim)`` gradient in ``dtype`` (default:
    ``grad_out``'s), accumulated in float32 for half-precision dtypes.  With
    ``owner`` (the table) it is written into :func:`gradient_buffer`'s
    reusable memory when the gradient is accumulated in ``dtype`` itself.
    """
    dim = grad_out.shape[-1]
    dtype = dtype or grad_out.dtype
    acc = accumulation_dtype(dtype)
    k = rows.shape[-1]
    # contiguous(): index_add_ reads an expanded gradient (the one a .sum()
    # loss gives) three times slower than the copy costs.
    grad = grad_out.reshape(-1, dim).to(acc).contiguous()
    flat_rows = rows.reshape(-1, k)
    if padding_idx is not None:
        grad = grad.masked_fill(ids.reshape(-1, 1) == padding_idx, 0)
    grad_weight = gradient_buffer((num_rows, dim), acc, grad_out.device, owner if acc == dtype else None)
    if factors is None and native.scatter_add(grad_weight, flat_rows.contiguous(), grad):
        return grad_weight.to(dtype)
    # index_add_ takes int32 indices too, but only int64 ones reach its fast
    # path on CPU (2x faster here).
    flat_rows = flat_rows.to(torch.int64)
    for j in range(k):
        scaled = grad if factors is None else grad * factors[:, j : j + 1].to(acc)
        grad_weight.index_add_(0, flat_rows[:, j], scaled)
    return grad_weight.to(dtype)


def bag_sizes(offsets: torch.Tensor, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ids per bag, or live (non-padding) ids per bag when ``live`` is given.

    ``offsets`` has ``B + 1`` entries, the last one the number of ids.
    """
    lengths = offsets[1:] - offsets[:-1]
    if live is None:
        return lengths
    bag_of_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    return torch.zeros(lengths.numel(), dtype=torch.int64, device=offsets.device).index_add_(0, bag_of_id, live.long())


def bloom_bag_forward_reference(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    *,
    mode: int = MODE_SUM,
    per_sample_weights: Optional[torch.Tensor] = None,
    padding_idx: Optional[int] = None,
    factors: Optional[torch.Tensor] = None,
):
    """Pool the Bloom vectors of bags of ids, as ``nn.EmbeddingBag`` pools rows.

    Args:
        ids (Tensor): ``(n,)`` ids of all bags, one after another.
        offsets (Tensor): ``(B + 1,)`` int64 starts of the bags, then ``n``.
        weight (Tensor): the ``(num_rows, dim)`` table.
        rows (Tensor): ``(n, k)`` rows of the ids.
        mode (int): ``MODE_SUM``, ``MODE_MEAN`` or ``MODE_MAX`` (``constants``).
        per_sample_weights (Tensor, optional): ``(n,)`` weights (``sum`` only).
        padding_idx (int, optional): id left out of the pooling (and of the
            mean's count).
        factors (Tensor, optional): ``(n, k)`` weights of the rows (the variants').

    Returns:
        ``(out, argmax)``: the ``(B, dim)`` pooled vectors (empty bags give
        zeros) and, in max mode, the ``(B, dim)`` int64 position of each
        column's maximum (-1 in bags with no live id); an empty tensor in the
        other modes.
    """
    n, k = rows.shape
    num_bags = offsets.numel() - 1
    dim = weight.shape[1]
    no_argmax = torch.empty(0, dtype=torch.int64, device=weight.device)
    if n == 0:
        argmax = torch.full((num_bags, dim), -1, dtype=torch.int64, device=weight.device)
        return weight.new_zeros((num_bags, dim)), argmax if mode == MODE_MAX else no_argmax
    live = None if padding_idx is None else ids != padding_idx
    if mode == MODE_MAX:
        return _max_pool(bloom_forward_reference(ids, weight, rows, padding_idx, factors=factors), offsets, live)
    # Each id becomes k entries of one flat bag: offsets scale by k, and the
    # id's weight (its per-sample weight, 0 for padding, 1/count for mean)
    # repeats k times.
    weights = per_sample_weights
    if live is not None:
        # Not weights * live: a NaN or infinite weight of a padding id must
        # stay out of its bag, as in nn.EmbeddingBag.
        weights = live.to(weight.dtype) if weights is None else weights.masked_fill(~live, 0)
    if mode == MODE_MEAN:
        counts = bag_sizes(offsets, live).clamp_min(1).to(weight.dtype)
        inverse = torch.repeat_interleave(counts.reciprocal(), bag_sizes(offsets), output_size=n)
        weights = inverse if weights is None else weights * inverse
    flat_rows = rows.reshape(-1)
    if weights is not None:
        weights = weights.to(weight.dtype).unsqueeze(1).expand(n, k)
    if factors is not None:
        weights = factors.to(weight.dtype) if weights is None else weights * factors.to(weight.dtype)
    if weights is not None:
        weights = weights.reshape(-1)
    out = F.embedding_bag(
        flat_rows,
        weight,
        (offsets * k).to(flat_rows.dtype),
        mode="sum",
        per_sample_weights=weights,
        include_last_offset=True,
    )
    return out, no_argmax


def _max_pool(vectors, offsets, live):
    """``embedding_bag``'s max over per-id vectors: ``(out, argmax)``, where
    ``argmax`` holds the position of each column's maximum (-1 in bags with
    no live id)."""
    n, dim = vectors.shape
    positions = torch.arange(n, device=vectors.device)
    padding = None
    if live is not None:
        # Padding ids point at an extra row that embedding_bag leaves out.
        positions = positions.masked_fill(~live, n)
        vectors = torch.cat([vectors, vectors.new_zeros(1, dim)])
        padding = n
    # 2 is PyTorch's own code for max pooling (aten's embedding_bag takes no names).
    out, _, _, argmax = torch.embedding_bag(vectors, positions, offsets, False, 2, False, None, True, padding)
    empty = bag_sizes(offsets, live if live is not None else torch.ones_like(positions, dtype=torch.bool)) == 0
    return out, argmax.masked_fill(empty.unsqueeze(1), -1)


def bloom_row_gradients_reference(
    rows: torch.Tensor,
    sources: torch.Tensor,
    grad: torch.Tensor,
    *,
    scales: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
):
    """Sum ``grad[sources[i]] * scales[i]`` into each of ``rows[i, :]`` (with
    ``(n, k)`` scales, ``scales[i, j]`` into ``rows[i, j]``), per touched row:
    the twin of ``kernels.bloom_row_gradients``.

    Returns ``(unique_rows, values)``: sorted ``(u,)`` int64 rows and their
    ``(u, dim)`` gradients in float32 (float64 for float64 ``grad``).
    """
    if keep is not None:
        rows, sources = rows[keep], sources[keep]
        scales = scales[keep] if scales is not None else None
    acc = accumulation_dtype(grad.dtype)
    unique_rows, inverse = torch.unique(rows.to(torch.int64), sorted=True, return_inverse=True)
    contrib = grad.to(acc).index_select(0, sources)
    if scales is not None and scales.dim() == 1:
        contrib = contrib * scales.to(acc).unsqueeze(1)
    values = torch.zeros((unique_rows.numel(), grad.shape[1]), dtype=acc, device=grad.device)
    for j in range(rows.shape[1]):
        scaled = contrib * scales[:, j : j + 1].to(acc) if scales is not None and scales.dim() == 2 else contrib
        values.index_add_(0, inverse[:, j], scaled)
    return unique_rows, values


def bloom_rowwise_update_reference(
    weight: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    optimizer: int,
    lr: float,
    eps: float = 0.0,
    state: Optional[torch.Tensor] = None,
    rounding: Optional[torch.Tensor] = None,
) -> None:
    """One fused optimizer step on ``weight``'s ``rows``, in place: the twin
    of ``kernels.bloom_rowwise_update``.

    Args:
        weight (Tensor): the ``(num_rows, dim)`` table.
        rows (Tensor): ``(u,)`` unique int64 rows.
        values (Tensor): their ``(u, dim)`` summed gradients.
        optimizer (int): ``FUSED_SGD`` (``w -= lr * g``) or
            ``FUSED_ROWWISE_ADAGRAD`` (``state[r] += mean(g_r ** 2)``, then
            ``w_r -= lr * g_r / (sqrt(state[r]) + eps)``).
        lr (float), eps (float): the optimizer's.
        state (Tensor, optional): row-wise Adagrad's ``(num_rows,)`` float32
            accumulator, updated in place.
        rounding (Tensor, optional): ``(2,)`` int64 seed and step: a
            bfloat16 or float16 table is rounded stochastically
            (``rounding.py``, the kernels' bits) and the step incremented.
    """
    rows_before = weight.index_select(0, rows).to(values.dtype)
    if optimizer == FUSED_SGD:
        updated = rows_before - lr * values
    elif optimizer == FUSED_ROWWISE_ADAGRAD:
        state.index_add_(0, rows, values.float().pow(2).mean(dim=1))
        step = lr / (state.index_select(0, rows).sqrt() + eps)
        updated = rows_before - step.to(values.dtype).unsqueeze(1) * values
    else:
        raise ValueError(f"unknown fused optimizer code {optimizer!r}")
    if rounding is None:
        weight.index_copy_(0, rows, updated.to(weight.dtype))
        return
    if weight.dtype in ROUNDED_DTYPES:
        seed, step = rounding.tolist()
        updated = stochastic_round(updated, random_bits(base_key(seed, step), rows, weight.shape[1]), weight.dtype)
    weight.index_copy_(0, rows, updated.to(weight.dtype))
    rounding[1] += 1
