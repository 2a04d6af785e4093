"""Each Bloom operation once, computed by the Triton kernels or by the
PyTorch reference: the functions that the custom ops (``ops.py``) run.

Whether the kernels or the reference computes an operation is decided in one
function per operation: ``forward``, ``backward``, ``bag_forward``,
``bag_backward``, ``_hash`` and ``_row_gradients``.  They read
``use_triton``, which the caller (``functional``) decides once per call with
``dispatch.use_triton``.  Options are keyword-only here, as in the ops.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import dispatch
from .constants import accumulation_dtype
from .hashing import WIDE_ID_START, hash_rows, hot_rows, seed_tensor
from .reference import (
    bloom_backward_reference,
    bloom_bag_forward_reference,
    bloom_forward_reference,
    bloom_row_gradients_reference,
    bloom_rowwise_update_reference,
    row_factors,
    with_hot_rows,
)
from .rowwise import (
    Entries,
    bag_entries,
    densify,
    embedding_entries,
    importance_entries,
    per_id_gradient,
    per_sample_weights_gradient,
    with_factors,
)


@dataclasses.dataclass(frozen=True)
class Lookup:
    """How a lookup turns ids into weighted rows, and which backend computes
    it: the ops' keyword arguments of that name, as one value for the helpers."""

    num_hash_functions: int
    padding_idx: Optional[int]
    num_embeddings: Optional[int]
    signed: bool
    use_triton: bool

    def wide_ids(self, ids: torch.Tensor) -> bool:
        """Whether ``ids`` need the kernels' 8-byte hashing: only int64 ids that may reach 2**31."""
        return ids.dtype == torch.int64 and (self.num_embeddings is None or self.num_embeddings > WIDE_ID_START)

    def factors(self, ids: torch.Tensor, importance: Optional[torch.Tensor], private: Optional[torch.Tensor]):
        """``row_factors`` of ``ids`` (``private``: their private rows, see
        :func:`_private_rows`): ``(factors, signs, importance_rows)``."""
        return row_factors(ids, self.num_hash_functions, signed=self.signed, importance=importance, hot=private)


LOOKUP_OPTIONS = tuple(field.name for field in dataclasses.fields(Lookup))


@dataclasses.dataclass(frozen=True)
class Training:
    """What the backward does with the table's gradient: dense, a sparse COO
    tensor (``sparse``), or a fused step of ``optimizer`` (a code from
    ``constants``) with ``lr`` and ``eps``."""

    sparse: bool = False
    optimizer: Optional[int] = None
    lr: float = 0.0
    eps: float = 0.0

    @property
    def per_row(self) -> bool:
        """Whether the table's gradient goes per touched row (sparse or fused)."""
        return self.sparse or self.optimizer is not None


TRAINING_OPTIONS = tuple(field.name for field in dataclasses.fields(Training))


def cached_rows(ids: torch.Tensor, hash_cache: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The ids' ``(*, k)`` rows from a ``(num_embeddings, k)`` hash cache."""
    if hash_cache is None:
        return None
    return hash_cache.index_select(0, ids.reshape(-1)).view(*ids.shape, hash_cache.shape[1])


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _shared_rows(weight: torch.Tensor, hot: Optional[torch.Tensor]) -> int:
    """Rows the ids hash into: the table's, less the private rows at its end."""
    return weight.shape[0] - (hot.numel() if hot is not None else 0)


def _atomic_backward(weight: torch.Tensor) -> bool:
    """Whether the Triton path's dense gradient comes from the atomic kernels
    (float32 and float64 tables, outside deterministic mode), else from sums
    per touched row written once into the zeroed gradient: a half-precision
    table would otherwise need a float32 accumulator of the whole table,
    zeroed and cast every step (``bench/results/traffic_sm90.md``)."""
    return not _deterministic() and accumulation_dtype(weight.dtype) == weight.dtype


def _zeroed_gradient(weight: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The table's dense gradient before any row is written: zeros of its shape and dtype."""
    return torch.zeros((weight.shape[0], grad_out.shape[-1]), dtype=weight.dtype, device=grad_out.device)


def _private_rows(ids: torch.Tensor, weight: torch.Tensor, hot: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The flattened ids' private rows (-1 for ids that hash), or ``None``
    without hot ids."""
    if hot is None:
        return None
    return hot_rows(ids.reshape(-1), hot, _shared_rows(weight, hot))


# One function per operation: the kernels' result or the reference's. -----------


def _hash(
    ids: torch.Tensor,
    weight: torch.Tensor,
    hot: Optional[torch.Tensor],
    *,
    rows: Optional[torch.Tensor],
    lookup: Lookup,
):
    """``(rows, private)``: the flattened ids' ``(n, k)`` int64 rows of
    ``weight`` (``rows``, a hash cache's, when given, else hashed), where a hot
    id's ``k`` rows are all its private row, and the ids' private rows
    (:func:`_private_rows`, for ``Lookup.factors``, which weighs a hot id's
    rows ``1, 0, ...``)."""
    n, k = ids.numel(), lookup.num_hash_functions
    num_rows = _shared_rows(weight, hot)
    flat = ids.reshape(-1)
    if rows is not None:
        rows = rows.reshape(n, k).to(torch.int64)
    elif lookup.use_triton:
        rows = dispatch.kernels().bloom_hash(
            flat, seed_tensor(ids.device), num_hash_functions=k, num_rows=num_rows, wide_ids=lookup.wide_ids(ids)
        )
    else:
        rows = hash_rows(flat, k, num_rows).to(torch.int64)
    private = _private_rows(ids, weight, hot)
    return with_hot_rows(rows, private), private


def _row_gradients(rows: torch.Tensor, entries: Entries, *, use_triton: bool, dense: Optional[torch.Tensor] = None):
    """``(unique_rows, values)``: the sorted rows ``entries`` touch and their
    summed gradients (see ``kernels/segment.py``); with ``dense`` (a zeroed
    ``(num_rows, dim)`` gradient, Triton path only), the sums are written
    into it and ``values`` is ``dense``."""
    if use_triton:
        return dispatch.kernels().bloom_row_gradients(
            rows, entries.sources, entries.grad, scales=entries.scales, keep=entries.keep, dense=dense
        )
    return bloom_row_gradients_reference(rows, entries.sources, entries.grad, scales=entries.scales, keep=entries.keep)


def forward(ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup) -> torch.Tensor:
    """``(*, dim)`` sums of the ids' weighted rows (``rows``: precomputed, or ``None``)."""
    if lookup.use_triton:
        return dispatch.kernels().bloom_forward(
            ids,
            weight,
            seed_tensor(weight.device),
            num_hash_functions=lookup.num_hash_functions,
            padding_idx=lookup.padding_idx,
            rows=rows,
            wide_ids=lookup.wide_ids(ids),
            signed=lookup.signed,
            importance=importance,
            hot=hot,
        )
    private = _private_rows(ids, weight, hot)
    if rows is None:
        rows = hash_rows(ids, lookup.num_hash_functions, _shared_rows(weight, hot))
    factors, _, _ = lookup.factors(ids, importance, private)
    return bloom_forward_reference(ids, weight, with_hot_rows(rows, private), lookup.padding_idx, factors=factors)


def backward(grad_out, ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup):
    """``(grad_weight, grad_importance or None)`` of ``forward``: the dense gradients.

    The Triton kernel's atomic adds make the float sums' order, and so their
    last bits, vary run to run; under ``torch.use_deterministic_algorithms``
    the Triton path sums each touched row in a fixed order instead, as it
    does for half-precision tables (see :func:`_atomic_backward`).
    """
    num_rows = weight.shape[0]
    if lookup.use_triton and _atomic_backward(weight):
        return dispatch.kernels().bloom_backward(
            grad_out,
            ids,
            seed_tensor(grad_out.device),
            num_rows=num_rows,
            num_hash_functions=lookup.num_hash_functions,
            padding_idx=lookup.padding_idx,
            rows=rows,
            wide_ids=lookup.wide_ids(ids),
            dtype=weight.dtype,
            signed=lookup.signed,
            weight=weight,
            importance=importance,
            hot=hot,
        )
    if lookup.use_triton:
        dense = _zeroed_gradient(weight, grad_out)
        _, _, grad_importance = backward_rows(
            grad_out, ids, weight, importance, hot, rows=rows, lookup=lookup, dense=dense
        )
        return dense, grad_importance
    rows, private = _hash(ids, weight, hot, rows=rows, lookup=lookup)
    factors, signs, imp_rows = lookup.factors(ids, importance, private)
    grad_weight = bloom_backward_reference(
        grad_out, ids, rows, num_rows, lookup.padding_idx, dtype=weight.dtype, factors=factors, owner=weight
    )
    grad_importance = None
    if importance is not None:
        entries = embedding_entries(ids, grad_out, lookup.padding_idx)
        grad_importance = _importance_gradient(
            rows, entries, weight, importance, signs=signs, imp_rows=imp_rows, use_triton=False
        )
    return grad_weight, grad_importance


def bag_forward(ids, offsets, weight, per_sample_weights, importance, hot, *, mode: int, lookup: Lookup):
    """``(out, argmax)``: the ``(B, dim)`` pooled bags, and in max mode the
    ``(B, dim)`` positions of the maxima (empty otherwise)."""
    if lookup.use_triton:
        return dispatch.kernels().bloom_bag_forward(
            ids,
            offsets,
            weight,
            seed_tensor(weight.device),
            num_hash_functions=lookup.num_hash_functions,
            mode=mode,
            per_sample_weights=per_sample_weights,
            padding_idx=lookup.padding_idx,
            wide_ids=lookup.wide_ids(ids),
            signed=lookup.signed,
            importance=importance,
            hot=hot,
        )
    private = _private_rows(ids, weight, hot)
    rows = with_hot_rows(hash_rows(ids, lookup.num_hash_functions, _shared_rows(weight, hot)), private)
    factors, _, _ = lookup.factors(ids, importance, private)
    return bloom_bag_forward_reference(
        ids,
        offsets,
        weight,
        rows,
        mode=mode,
        per_sample_weights=per_sample_weights,
        padding_idx=lookup.padding_idx,
        factors=factors,
    )


def bag_backward(
    grad_out,
    ids,
    offsets,
    weight,
    per_sample_weights,
    importance,
    hot,
    argmax,
    *,
    mode: int,
    psw_grad: bool,
    lookup: Lookup,
):
    """``(grad_weight, grad_per_sample_weights or None, grad_importance or
    None)`` of ``bag_forward``: the dense gradients, deterministic under
    ``torch.use_deterministic_algorithms(True)``."""
    num_rows = weight.shape[0]
    if lookup.use_triton and _atomic_backward(weight):
        return dispatch.kernels().bloom_bag_backward(
            grad_out,
            ids,
            offsets,
            weight,
            seed_tensor(weight.device),
            num_hash_functions=lookup.num_hash_functions,
            mode=mode,
            per_sample_weights=per_sample_weights,
            argmax=argmax,
            padding_idx=lookup.padding_idx,
            wide_ids=lookup.wide_ids(ids),
            psw_grad=psw_grad,
            signed=lookup.signed,
            importance=importance,
            hot=hot,
        )
    if lookup.use_triton:
        dense = _zeroed_gradient(weight, grad_out)
        _, _, grad_psw, grad_importance = bag_backward_rows(
            grad_out,
            ids,
            offsets,
            weight,
            per_sample_weights,
            importance,
            hot,
            argmax,
            mode=mode,
            psw_grad=psw_grad,
            lookup=lookup,
            dense=dense,
        )
        return dense, grad_psw, grad_importance
    # On CPU, spreading each bag's gradient over its ids and scattering with
    # index_add_ is ~2x faster than summing per touched row.
    rows, private, grad_psw, entries = _bag_gradient_entries(
        grad_out,
        ids,
        offsets,
        weight,
        per_sample_weights,
        importance,
        hot,
        argmax,
        mode=mode,
        psw_grad=psw_grad,
        lookup=lookup,
    )
    factors, signs, imp_rows = lookup.factors(ids, importance, private)
    grad_weight = bloom_backward_reference(
        per_id_gradient(entries),
        ids,
        rows,
        num_rows,
        lookup.padding_idx,
        dtype=weight.dtype,
        factors=factors,
        owner=weight,
    )
    grad_importance = None
    if importance is not None:
        grad_importance = _importance_gradient(
            rows, entries, weight, importance, signs=signs, imp_rows=imp_rows, use_triton=False
        )
    return grad_weight, grad_psw, grad_importance


# Gradients per touched row, from the operations above. ---------------------------


def _importance_gradient(rows, entries: Entries, weight, importance, *, signs, imp_rows, use_triton: bool):
    """The importance weights' dense gradient for ``entries`` over ``rows``."""
    imp_table_rows, imp_entries = importance_entries(rows, entries, weight, signs, imp_rows, importance.dtype)
    unique_rows, values = _row_gradients(imp_table_rows, imp_entries, use_triton=use_triton)
    return densify(unique_rows, values, importance.shape[0], importance.dtype)


def _table_gradients(rows, private, entries: Entries, ids, weight, importance, *, lookup: Lookup, dense=None):
    """``(unique_rows, values, grad_importance or None)`` of ``entries``
    (``rows`` and ``private`` as :func:`_hash` gives them; ``dense``: see
    :func:`_row_gradients`)."""
    factors, signs, imp_rows = lookup.factors(ids, importance, private)
    unique_rows, values = _row_gradients(
        rows, with_factors(entries, factors), use_triton=lookup.use_triton, dense=dense
    )
    grad_importance = None
    if importance is not None:
        grad_importance = _importance_gradient(
            rows, entries, weight, importance, signs=signs, imp_rows=imp_rows, use_triton=lookup.use_triton
        )
    return unique_rows, values, grad_importance


def _per_sample_weights_gradient(grad_out, ids, offsets, weight, importance, hot, *, rows, lookup: Lookup):
    """The ``(n,)`` per-sample weights' gradient: each id's vector against its bag's gradient."""
    vectors = forward(ids.reshape(-1), weight, importance, hot, rows=rows, lookup=lookup)
    return per_sample_weights_gradient(vectors, offsets, grad_out)


def backward_rows(grad_out, ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup, dense=None):
    """``(unique_rows, values, grad_importance or None)`` of ``forward``
    (``dense``: see :func:`_row_gradients`)."""
    rows, private = _hash(ids, weight, hot, rows=rows, lookup=lookup)
    entries = embedding_entries(ids, grad_out, lookup.padding_idx)
    return _table_gradients(rows, private, entries, ids, weight, importance, lookup=lookup, dense=dense)


def _bag_gradient_entries(
    grad_out, ids, offsets, weight, per_sample_weights, importance, hot, argmax, *, mode: int, psw_grad: bool, lookup
):
    """What every bag backward starts from: the ids' ``(rows, private)``, the
    per-sample weights' gradient (``None`` unless ``psw_grad``) and the
    output gradient spread over the bags' ids (:func:`bag_entries`)."""
    rows, private = _hash(ids, weight, hot, rows=None, lookup=lookup)
    grad_psw = None
    if psw_grad:
        grad_psw = _per_sample_weights_gradient(
            grad_out, ids, offsets, weight, importance, hot, rows=rows, lookup=lookup
        )
    entries = bag_entries(
        ids,
        offsets,
        grad_out,
        mode=mode,
        per_sample_weights=per_sample_weights,
        padding_idx=lookup.padding_idx,
        argmax=argmax,
    )
    return rows, private, grad_psw, entries


def bag_backward_rows(
    grad_out,
    ids,
    offsets,
    weight,
    per_sample_weights,
    importance,
    hot,
    argmax,
    *,
    mode: int,
    psw_grad: bool,
    lookup: Lookup,
    dense=None,
):
    """``(unique_rows, values, grad_per_sample_weights or None,
    grad_importance or None)`` of ``bag_forward`` (``dense``: see
    :func:`_row_gradients`)."""
    rows, private, grad_psw, entries = _bag_gradient_entries(
        grad_out,
        ids,
        offsets,
        weight,
        per_sample_weights,
        importance,
        hot,
        argmax,
        mode=mode,
        psw_grad=psw_grad,
        lookup=lookup,
    )
    unique_rows, values, grad_importance = _table_gradients(
        rows, private, entries, ids, weight, importance, lookup=lookup, dense=dense
    )
    return unique_rows, values, grad_psw, grad_importance


# The fused optimizer step, from the operations above. -----------------------------


def _row_step(rows, entries: Entries, weight, state, rounding, *, training: Training, use_triton: bool) -> None:
    """One step of ``training.optimizer`` on the rows ``entries`` touch, in
    place: the kernels sum each row's gradient and update the row in one
    kernel (``kernels/optimizer.py``); the reference sums, then updates."""
    step = dict(optimizer=training.optimizer, lr=training.lr, eps=training.eps, state=state, rounding=rounding)
    if use_triton:
        dispatch.kernels().bloom_segment_step(
            weight, rows, entries.sources, entries.grad, scales=entries.scales, keep=entries.keep, **step
        )
        return
    unique_rows, values = bloom_row_gradients_reference(
        rows, entries.sources, entries.grad, scales=entries.scales, keep=entries.keep
    )
    bloom_rowwise_update_reference(weight, unique_rows, values, **step)


def _table_step(rows, private, entries: Entries, ids, weight, importance, state, rounding, *, lookup, training):
    """:func:`_row_step` of ``entries``; returns the importance weights'
    gradient (or ``None``), taken before the step changes the rows it reads."""
    factors, signs, imp_rows = lookup.factors(ids, importance, private)
    grad_importance = None
    if importance is not None:
        grad_importance = _importance_gradient(
            rows, entries, weight, importance, signs=signs, imp_rows=imp_rows, use_triton=lookup.use_triton
        )
    _row_step(
        rows, with_factors(entries, factors), weight, state, rounding, training=training, use_triton=lookup.use_triton
    )
    return grad_importance


def backward_step(
    grad_out, ids, weight, importance, hot, state, rounding, *, rows: Optional[torch.Tensor], lookup: Lookup, training
):
    """The fused step of ``forward``'s table gradient (``state`` and
    ``rounding``: the optimizer's, updated in place); returns the importance
    weights' gradient or ``None``."""
    rows, private = _hash(ids, weight, hot, rows=rows, lookup=lookup)
    entries = embedding_entries(ids, grad_out, lookup.padding_idx)
    return _table_step(
        rows, private, entries, ids, weight, importance, state, rounding, lookup=lookup, training=training
    )


def bag_backward_step(
    grad_out,
    ids,
    offsets,
    weight,
    per_sample_weights,
    importance,
    hot,
    argmax,
    state,
    rounding,
    *,
    mode: int,
    psw_grad: bool,
    lookup: Lookup,
    training,
):
    """The fused step of ``bag_forward``'s table gradient; returns
    ``(grad_per_sample_weights or None, grad_importance or None)``, both
    taken before the step."""
    rows, private, grad_psw, entries = _bag_gradient_entries(
        grad_out,
        ids,
        offsets,
        weight,
        per_sample_weights,
        importance,
        hot,
        argmax,
        mode=mode,
        psw_grad=psw_grad,
        lookup=lookup,
    )
    grad_importance = _table_step(
        rows, private, entries, ids, weight, importance, state, rounding, lookup=lookup, training=training
    )
    return grad_psw, grad_importance
