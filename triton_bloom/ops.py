"""The Bloom lookups as ``torch.library`` custom ops: the one path every lookup
takes, whatever its options (dense or ``sparse=True`` gradients, a fused
optimizer, bags, the variants, a hash cache)::

    bloom_forward, bloom_bag_forward          the lookups; their autograd formulas call
      dense gradient:                         bloom_backward, bloom_bag_backward
      sparse=True or a fused optimizer:       bloom_backward_rows, bloom_bag_backward_rows
                                              (the touched rows and their summed gradients),
                                              then a sparse COO gradient built from them, or
                                              bloom_rowwise_update (the fused step: updates the
                                              table and the optimizer state in place, and the
                                              table gets no gradient)

Every op has a fake implementation, so ``torch.compile(fullgraph=True)``
captures training through them: the touched rows' count is data-dependent
(an unbacked size while tracing), the sparse gradient is assembled outside
the ops from dense tensors, and the fused step is a declared mutation of
forward inputs inside the backward, which AOTAutograd keeps in the graph.

Whether the Triton kernels or the PyTorch reference computes an operation is
decided in one function per operation: ``_forward``, ``_backward``,
``_bag_forward``, ``_bag_backward``, ``_hash``, ``_row_gradients`` and the op
``bloom_rowwise_update``.  They read ``use_triton``, which the caller
(``functional``) decides once per call with ``dispatch.use_triton``.  The
value checks (ids in range, offsets in order) run inside the forward ops,
where tensors are real, and so never break a graph.

Options are keyword-only in every op and helper here.  Tensors are
positional-or-keyword (custom ops take no keyword-only tensors), passed by
name where two of them sit side by side, and have no defaults: the
dispatcher drops arguments equal to their defaults before autograd sees
them, which would shorten ``ctx.needs_input_grad``.

The kernels are launched directly rather than through ``wrap_triton``: that
also works under Triton's interpreter, which ``wrap_triton`` rejects.

One lookup skips the custom op: a plain dense ``bloom_forward`` of CPU
tensors outside ``torch.compile`` (``eager_lookup``, an ``autograd.Function``
over the same reference functions, so the same bits), because the op's
Python autograd wrapper costs as much as the lookup of a small batch.  It
also keeps the forward's rows for the backward, where the op hashes again.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import dispatch, native
from .checks import check_hash_cache_rows, check_id_bounds, check_id_range, check_offsets
from .constants import MODE_MAX, accumulation_dtype
from .hashing import SEEDS, WIDE_ID_START, hash_rows, hot_rows, native_allowed, seed_tensor
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

__all__ = [
    "bloom_forward",
    "bloom_backward",
    "bloom_backward_rows",
    "bloom_bag_forward",
    "bloom_bag_backward",
    "bloom_bag_backward_rows",
    "bloom_rowwise_update",
]


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


def _cached_rows(ids: torch.Tensor, hash_cache: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
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


def _forward(ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup) -> torch.Tensor:
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


def _backward(grad_out, ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup):
    """``(grad_weight, grad_importance or None)`` of ``_forward``: the dense gradients.

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
        _, _, grad_importance = _backward_rows(
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


def _bag_forward(ids, offsets, weight, per_sample_weights, importance, hot, *, mode: int, lookup: Lookup):
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


def _bag_backward(
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
    None)`` of ``_bag_forward``: the dense gradients, deterministic under
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
        _, _, grad_psw, grad_importance = _bag_backward_rows(
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
    vectors = _forward(ids.reshape(-1), weight, importance, hot, rows=rows, lookup=lookup)
    return per_sample_weights_gradient(vectors, offsets, grad_out)


def _backward_rows(grad_out, ids, weight, importance, hot, *, rows: Optional[torch.Tensor], lookup: Lookup, dense=None):
    """``(unique_rows, values, grad_importance or None)`` of ``_forward``
    (``dense``: see :func:`_row_gradients`)."""
    rows, private = _hash(ids, weight, hot, rows=rows, lookup=lookup)
    entries = embedding_entries(ids, grad_out, lookup.padding_idx)
    return _table_gradients(rows, private, entries, ids, weight, importance, lookup=lookup, dense=dense)


def _bag_backward_rows(
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
    grad_importance or None)`` of ``_bag_forward`` (``dense``: see
    :func:`_row_gradients`)."""
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
    unique_rows, values, grad_importance = _table_gradients(
        rows, private, entries, ids, weight, importance, lookup=lookup, dense=dense
    )
    return unique_rows, values, grad_psw, grad_importance


# A custom op's outputs are tensors, never None, and may not alias each other:
# an absent gradient is a fresh empty tensor.


def _or_empty(tensor: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else like.new_empty((0,))


def _new_touched_rows(grad_out: torch.Tensor, dim: int):
    """Fake ``(unique_rows, values)``: their count depends on the ids' values."""
    touched = torch.library.get_ctx().new_dynamic_size()
    rows = grad_out.new_empty((touched,), dtype=torch.int64)
    return rows, grad_out.new_empty((touched, dim), dtype=accumulation_dtype(grad_out.dtype))


# The custom ops. ----------------------------------------------------------------


@torch.library.custom_op("triton_bloom::bloom_forward", mutates_args=())
def bloom_forward(
    ids: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    hash_cache: Optional[torch.Tensor],
    optimizer_state: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
    sparse: bool = False,
    optimizer: Optional[int] = None,
    lr: float = 0.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """``(*)`` ids to the ``(*, dim)`` sums of their Bloom rows (hashed, or
    looked up in ``hash_cache``), each row times its sign hash's +-1 when
    ``signed`` and its importance weight when ``importance`` is given; the
    sorted ids in ``hot`` read their private rows at the end of ``weight``.

    ``sparse``, ``optimizer``, ``lr``, ``eps`` and ``optimizer_state`` tell
    the backward what to do with the table's gradient (see ``Training``); the
    forward does not read them.
    """
    check_id_range(ids, num_embeddings)
    if hash_cache is not None:
        check_hash_cache_rows(ids, hash_cache, weight.shape[0])
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    return _forward(ids, weight, importance, hot, rows=_cached_rows(ids, hash_cache), lookup=lookup)


@bloom_forward.register_fake
def _(ids, weight, importance, hot, hash_cache, optimizer_state, **options):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("triton_bloom::bloom_backward", mutates_args=())
def bloom_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    hash_cache: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense gradients of ``bloom_forward``: the ``(num_rows, dim)`` table's,
    and the importance weights' (empty without them)."""
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    grad_weight, grad_importance = _backward(
        grad_out, ids, weight, importance, hot, rows=_cached_rows(ids, hash_cache), lookup=lookup
    )
    return grad_weight, _or_empty(grad_importance, weight)


@bloom_backward.register_fake
def _(grad_out, ids, weight, importance, hot, hash_cache, **options):
    return torch.empty_like(weight), torch.empty_like(importance) if importance is not None else weight.new_empty((0,))


@torch.library.custom_op("triton_bloom::bloom_backward_rows", mutates_args=())
def bloom_backward_rows(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    hash_cache: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``bloom_forward`` per touched row: the sorted ``(u,)``
    int64 rows, their ``(u, dim)`` summed gradients (float32, float64 for a
    float64 ``grad_out``), and the importance weights' dense gradient (empty
    without them).  Deterministic on both backends."""
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    rows = _cached_rows(ids, hash_cache)
    unique_rows, values, grad_importance = _backward_rows(
        grad_out, ids, weight, importance, hot, rows=rows, lookup=lookup
    )
    return unique_rows, values, _or_empty(grad_importance, weight)


@bloom_backward_rows.register_fake
def _(grad_out, ids, weight, importance, hot, hash_cache, **options):
    grad_importance = torch.empty_like(importance) if importance is not None else weight.new_empty((0,))
    return (*_new_touched_rows(grad_out, weight.shape[1]), grad_importance)


@torch.library.custom_op("triton_bloom::bloom_rowwise_update", mutates_args=("weight", "state"))
def bloom_rowwise_update(
    weight: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    state: Optional[torch.Tensor],
    *,
    optimizer: int,
    lr: float,
    eps: float = 0.0,
    use_triton: bool,
) -> None:
    """The fused optimizer step: ``optimizer`` (``FUSED_SGD`` or
    ``FUSED_ROWWISE_ADAGRAD``) applied to ``weight``'s ``(u,)`` unique
    ``rows`` with their ``(u, dim)`` gradients ``values``, in place, and to
    row-wise Adagrad's ``(num_rows,)`` ``state``."""
    if use_triton:
        dispatch.kernels().bloom_rowwise_update(weight, rows, values, optimizer=optimizer, lr=lr, eps=eps, state=state)
    else:
        bloom_rowwise_update_reference(weight, rows, values, optimizer=optimizer, lr=lr, eps=eps, state=state)


@bloom_rowwise_update.register_fake
def _(weight, rows, values, state, **options):
    return None


@torch.library.custom_op("triton_bloom::bloom_bag_forward", mutates_args=())
def bloom_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    optimizer_state: Optional[torch.Tensor],
    *,
    mode: int,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
    sparse: bool = False,
    optimizer: Optional[int] = None,
    lr: float = 0.0,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, dim)`` pooled Bloom vectors of the bags ``ids[offsets[b]:offsets[b+1]]``
    (``mode`` a code from ``constants``), and for max mode the ``(B, dim)``
    positions of the maxima (empty otherwise).  The training options are
    ``bloom_forward``'s."""
    check_id_range(ids, num_embeddings)
    check_offsets(offsets, ids.numel())
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    return _bag_forward(ids, offsets, weight, per_sample_weights, importance, hot, mode=mode, lookup=lookup)


@bloom_bag_forward.register_fake
def _(ids, offsets, weight, per_sample_weights, importance, hot, optimizer_state, *, mode, **options):
    num_bags = offsets.shape[0] - 1
    out = weight.new_empty((num_bags, weight.shape[1]))
    argmax_shape = (num_bags, weight.shape[1]) if mode == MODE_MAX else (0,)
    return out, weight.new_empty(argmax_shape, dtype=torch.int64)


def _bag_backward_fake_extras(ids, weight, per_sample_weights, importance, psw_grad):
    psw_shape = (ids.numel(),) if psw_grad else (0,)
    psw_dtype = per_sample_weights.dtype if per_sample_weights is not None else weight.dtype
    grad_importance = torch.empty_like(importance) if importance is not None else weight.new_empty((0,))
    return weight.new_empty(psw_shape, dtype=psw_dtype), grad_importance


def _psw_gradient_out(grad_psw: Optional[torch.Tensor], per_sample_weights, weight) -> torch.Tensor:
    return grad_psw.to(per_sample_weights.dtype) if grad_psw is not None else weight.new_empty((0,))


@torch.library.custom_op("triton_bloom::bloom_bag_backward", mutates_args=())
def bloom_bag_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    argmax: torch.Tensor,
    *,
    mode: int,
    psw_grad: bool,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense gradients of ``bloom_bag_forward``: the ``(num_rows, dim)``
    table's, the ``(n,)`` per-sample weights' (empty unless ``psw_grad``) and
    the importance weights' (empty without them)."""
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    grad_weight, grad_psw, grad_importance = _bag_backward(
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
    return grad_weight, _psw_gradient_out(grad_psw, per_sample_weights, weight), _or_empty(grad_importance, weight)


@bloom_bag_backward.register_fake
def _(grad_out, ids, offsets, weight, per_sample_weights, importance, hot, argmax, *, psw_grad, **options):
    return (torch.empty_like(weight), *_bag_backward_fake_extras(ids, weight, per_sample_weights, importance, psw_grad))


@torch.library.custom_op("triton_bloom::bloom_bag_backward_rows", mutates_args=())
def bloom_bag_backward_rows(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    argmax: torch.Tensor,
    *,
    mode: int,
    psw_grad: bool,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``bloom_bag_forward`` per touched row: ``bloom_backward_rows``'s
    rows and values, then ``bloom_bag_backward``'s per-sample weights' and
    importance weights' gradients."""
    lookup = Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    unique_rows, values, grad_psw, grad_importance = _bag_backward_rows(
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
    grad_psw = _psw_gradient_out(grad_psw, per_sample_weights, weight)
    return unique_rows, values, grad_psw, _or_empty(grad_importance, weight)


@bloom_bag_backward_rows.register_fake
def _(grad_out, ids, offsets, weight, per_sample_weights, importance, hot, argmax, *, psw_grad, **options):
    extras = _bag_backward_fake_extras(ids, weight, per_sample_weights, importance, psw_grad)
    return (*_new_touched_rows(grad_out, weight.shape[1]), *extras)


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


# Autograd. -----------------------------------------------------------------------


def _save_training(ctx, options: dict, weight: torch.Tensor, optimizer_state: Optional[torch.Tensor]):
    """Keep the forward's options on ``ctx``; returns the table to save for
    backward (``None`` when a fused step will change it)."""
    ctx.lookup = {name: options[name] for name in LOOKUP_OPTIONS}
    ctx.training = Training(**{name: options[name] for name in TRAINING_OPTIONS})
    ctx.stepped = None
    if ctx.training.optimizer is None:
        return weight
    # The fused step changes the table and the state in place: they are kept
    # outside save_for_backward, whose version check would refuse a second
    # lookup of the same table after the first one's step.
    ctx.stepped = (weight, optimizer_state)
    return None


def _table_gradient(ctx, rows: torch.Tensor, values: torch.Tensor) -> Optional[torch.Tensor]:
    """The table's gradient from its touched rows: a sparse COO tensor, or
    ``None`` after the fused step."""
    training = ctx.training
    if training.optimizer is not None:
        weight, state = ctx.stepped
        bloom_rowwise_update(
            weight,
            rows,
            values,
            state,
            optimizer=training.optimizer,
            lr=training.lr,
            eps=training.eps,
            use_triton=ctx.lookup["use_triton"],
        )
        return None
    weight_shape, weight_dtype = ctx.table_meta
    # Sorted, unique rows: coalesced by construction.
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values.to(weight_dtype), weight_shape, is_coalesced=True, check_invariants=False
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ids, weight, importance, hot, hash_cache, optimizer_state = inputs
    saved_weight = _save_training(ctx, keyword_only_inputs, weight, optimizer_state)
    ctx.table_meta = (weight.shape, weight.dtype)
    ctx.save_for_backward(ids, saved_weight, importance, hot, hash_cache)


def _backward_formula(ctx, grad_out):
    ids, weight, importance, hot, hash_cache = ctx.saved_tensors
    needs_weight, needs_importance = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_weight = grad_importance = None
    if needs_weight or needs_importance:
        if ctx.stepped is not None:
            weight = ctx.stepped[0]
        tensors = dict(grad_out=grad_out, ids=ids, weight=weight, importance=importance, hot=hot, hash_cache=hash_cache)
        if ctx.training.per_row:
            rows, values, grad_importance = bloom_backward_rows(**tensors, **ctx.lookup)
            if needs_weight:
                grad_weight = _table_gradient(ctx, rows, values)
        else:
            grad_weight, grad_importance = bloom_backward(**tensors, **ctx.lookup)
    return (
        None,
        grad_weight if needs_weight else None,
        grad_importance if needs_importance else None,
        None,
        None,
        None,
    )


bloom_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def _bag_setup_context(ctx, inputs, keyword_only_inputs, output):
    ids, offsets, weight, per_sample_weights, importance, hot, optimizer_state = inputs
    _, argmax = output
    saved_weight = _save_training(ctx, keyword_only_inputs, weight, optimizer_state)
    ctx.table_meta = (weight.shape, weight.dtype)
    ctx.mode = keyword_only_inputs["mode"]
    ctx.save_for_backward(ids, offsets, saved_weight, per_sample_weights, importance, hot, argmax)


def _bag_backward_formula(ctx, grad_out, _grad_argmax):
    ids, offsets, weight, per_sample_weights, importance, hot, argmax = ctx.saved_tensors
    needs_weight, needs_psw, needs_importance = ctx.needs_input_grad[2:5]
    psw_grad = per_sample_weights is not None and needs_psw
    grad_weight = grad_psw = grad_importance = None
    if needs_weight or psw_grad or needs_importance:
        if ctx.stepped is not None:
            weight = ctx.stepped[0]
        tensors = dict(
            grad_out=grad_out,
            ids=ids,
            offsets=offsets,
            weight=weight,
            per_sample_weights=per_sample_weights,
            importance=importance,
            hot=hot,
            argmax=argmax,
        )
        options = dict(mode=ctx.mode, psw_grad=psw_grad, **ctx.lookup)
        if ctx.training.per_row:
            # The step comes after this op: the per-sample weights' and
            # importance weights' gradients read the rows before it.
            rows, values, grad_psw, grad_importance = bloom_bag_backward_rows(**tensors, **options)
            if needs_weight:
                grad_weight = _table_gradient(ctx, rows, values)
        else:
            grad_weight, grad_psw, grad_importance = bloom_bag_backward(**tensors, **options)
    return (
        None,
        None,
        grad_weight if needs_weight else None,
        grad_psw if psw_grad else None,
        grad_importance if needs_importance else None,
        None,
        None,
    )


bloom_bag_forward.register_autograd(_bag_backward_formula, setup_context=_bag_setup_context)
