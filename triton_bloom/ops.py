"""The Bloom lookups as ``torch.library`` custom ops: the one path every lookup
takes, whatever its options (dense or ``sparse=True`` gradients, a fused
optimizer, bags, the variants, a hash cache)::

    bloom_forward, bloom_bag_forward          the lookups; their autograd formulas call
      dense gradient:                         bloom_backward, bloom_bag_backward
      sparse=True:                            bloom_backward_rows, bloom_bag_backward_rows
                                              (the touched rows and their summed gradients),
                                              then a sparse COO gradient built from them
      a fused optimizer:                      bloom_backward_step, bloom_bag_backward_step
                                              (the fused step: each touched row's gradient
                                              summed and the row updated in place, with the
                                              optimizer's state and rounding counter; the
                                              table gets no gradient)

Every op has a fake implementation, so ``torch.compile(fullgraph=True)``
captures training through them: the touched rows' count is data-dependent
(an unbacked size while tracing), the sparse gradient is assembled outside
the ops from dense tensors, and the fused step is a declared mutation of
forward inputs (the table, the optimizer's state, the stochastic rounding's
seed and step) inside the backward, which AOTAutograd keeps in the graph.

Whether the Triton kernels or the PyTorch reference computes an operation is
decided in one function per operation, in ``compute.py`` (``forward``,
``backward``, ``bag_forward``, ``bag_backward``, ``_hash``,
``_row_gradients``, ``_row_step``), and in the op ``bloom_rowwise_update``.  They read
``use_triton``, which the caller (``functional``) decides once per call with
``dispatch.use_triton``.  The value checks (ids in range, offsets in order) run inside the forward ops,
where tensors are real, and so never break a graph.

Options are keyword-only in every op and helper here.  Tensors are
positional-or-keyword (custom ops take no keyword-only tensors), passed by
name where two of them sit side by side, and have no defaults: the
dispatcher drops arguments equal to their defaults before autograd sees
them, which would shorten ``ctx.needs_input_grad``.  The one exception is
the lookups' last input, ``rounding`` (``None`` by default, so callers that
predate it need not pass it): nothing after it is read from
``needs_input_grad``.

The kernels are launched directly rather than through ``wrap_triton``: that
also works under Triton's interpreter, which ``wrap_triton`` rejects.

One lookup skips the custom op: a plain dense ``bloom_forward`` of CPU
tensors outside ``torch.compile`` (``eager.eager_lookup``, an ``autograd.Function``
over the same reference functions, so the same bits), because the op's
Python autograd wrapper costs as much as the lookup of a small batch.  It
also keeps the forward's rows for the backward, where the op hashes again.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import compute, dispatch
from .checks import check_hash_cache_rows, check_id_range, check_offsets
from .constants import MODE_MAX, accumulation_dtype
from .reference import (
    bloom_rowwise_update_reference,
)

__all__ = [
    "bloom_forward",
    "bloom_backward",
    "bloom_backward_rows",
    "bloom_bag_forward",
    "bloom_bag_backward",
    "bloom_bag_backward_rows",
    "bloom_rowwise_update",
    "bloom_backward_step",
    "bloom_bag_backward_step",
]


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
    rounding: Optional[torch.Tensor] = None,
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

    ``sparse``, ``optimizer``, ``lr``, ``eps``, ``optimizer_state`` and
    ``rounding`` (the fused optimizer's ``(2,)`` int64 stochastic rounding
    seed and step, or ``None`` for round-to-nearest) tell the backward what to
    do with the table's gradient (see ``compute.Training``); the forward does
    not read them.
    """
    check_id_range(ids, num_embeddings)
    if hash_cache is not None:
        check_hash_cache_rows(ids, hash_cache, weight.shape[0])
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    return compute.forward(ids, weight, importance, hot, rows=compute.cached_rows(ids, hash_cache), lookup=lookup)


@bloom_forward.register_fake
def _(ids, weight, importance, hot, hash_cache, optimizer_state, rounding=None, **options):
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
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    grad_weight, grad_importance = compute.backward(
        grad_out, ids, weight, importance, hot, rows=compute.cached_rows(ids, hash_cache), lookup=lookup
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
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    rows = compute.cached_rows(ids, hash_cache)
    unique_rows, values, grad_importance = compute.backward_rows(
        grad_out, ids, weight, importance, hot, rows=rows, lookup=lookup
    )
    return unique_rows, values, _or_empty(grad_importance, weight)


@bloom_backward_rows.register_fake
def _(grad_out, ids, weight, importance, hot, hash_cache, **options):
    grad_importance = torch.empty_like(importance) if importance is not None else weight.new_empty((0,))
    return (*_new_touched_rows(grad_out, weight.shape[1]), grad_importance)


@torch.library.custom_op("triton_bloom::bloom_rowwise_update", mutates_args=("weight", "state", "rounding"))
def bloom_rowwise_update(
    weight: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    state: Optional[torch.Tensor],
    rounding: Optional[torch.Tensor] = None,
    *,
    optimizer: int,
    lr: float,
    eps: float = 0.0,
    use_triton: bool,
) -> None:
    """An optimizer step from summed gradients: ``optimizer`` (``FUSED_SGD``
    or ``FUSED_ROWWISE_ADAGRAD``) applied to ``weight``'s ``(u,)`` unique
    ``rows`` with their ``(u, dim)`` gradients ``values``, in place, to
    row-wise Adagrad's ``(num_rows,)`` ``state``, and with stochastic
    rounding's ``(2,)`` seed and step ``rounding`` when given (its step
    incremented).  The lookups' backward takes ``bloom_backward_step``
    instead, which never writes the sums."""
    step = dict(optimizer=optimizer, lr=lr, eps=eps, state=state, rounding=rounding)
    if use_triton:
        dispatch.kernels().bloom_rowwise_update(weight, rows, values, **step)
    else:
        bloom_rowwise_update_reference(weight, rows, values, **step)


@bloom_rowwise_update.register_fake
def _(weight, rows, values, state, rounding=None, **options):
    return None


@torch.library.custom_op("triton_bloom::bloom_backward_step", mutates_args=("weight", "state", "rounding"))
def bloom_backward_step(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    hash_cache: Optional[torch.Tensor],
    state: Optional[torch.Tensor],
    rounding: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
    optimizer: int,
    lr: float,
    eps: float,
) -> torch.Tensor:
    """The fused optimizer step of ``bloom_forward``'s table gradient:
    ``weight``'s touched rows (and ``state``, ``rounding``) updated in place.
    Returns the importance weights' dense gradient, read before the step
    (empty without them)."""
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    training = compute.Training(optimizer=optimizer, lr=lr, eps=eps)
    grad_importance = compute.backward_step(
        grad_out,
        ids,
        weight,
        importance,
        hot,
        state,
        rounding,
        rows=compute.cached_rows(ids, hash_cache),
        lookup=lookup,
        training=training,
    )
    return _or_empty(grad_importance, weight)


@bloom_backward_step.register_fake
def _(grad_out, ids, weight, importance, hot, hash_cache, state, rounding, **options):
    return torch.empty_like(importance) if importance is not None else weight.new_empty((0,))


@torch.library.custom_op("triton_bloom::bloom_bag_forward", mutates_args=())
def bloom_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    optimizer_state: Optional[torch.Tensor],
    rounding: Optional[torch.Tensor] = None,
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
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    return compute.bag_forward(ids, offsets, weight, per_sample_weights, importance, hot, mode=mode, lookup=lookup)


@bloom_bag_forward.register_fake
def _(ids, offsets, weight, per_sample_weights, importance, hot, optimizer_state, rounding=None, *, mode, **options):
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
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    grad_weight, grad_psw, grad_importance = compute.bag_backward(
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
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    unique_rows, values, grad_psw, grad_importance = compute.bag_backward_rows(
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


@torch.library.custom_op("triton_bloom::bloom_bag_backward_step", mutates_args=("weight", "state", "rounding"))
def bloom_bag_backward_step(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    argmax: torch.Tensor,
    state: Optional[torch.Tensor],
    rounding: Optional[torch.Tensor],
    *,
    bag_mode: int,
    psw_grad: bool,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
    optimizer: int,
    lr: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused optimizer step of ``bloom_bag_forward``'s table gradient, in
    place; returns ``bloom_bag_backward``'s per-sample weights' and importance
    weights' gradients, read before the step.  (``bag_mode`` is the other
    ops' ``mode``: a mutating op's functionalization takes ``mode`` itself.)"""
    lookup = compute.Lookup(
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=signed,
        use_triton=use_triton,
    )
    grad_psw, grad_importance = compute.bag_backward_step(
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
        mode=bag_mode,
        psw_grad=psw_grad,
        lookup=lookup,
        training=compute.Training(optimizer=optimizer, lr=lr, eps=eps),
    )
    return _psw_gradient_out(grad_psw, per_sample_weights, weight), _or_empty(grad_importance, weight)


@bloom_bag_backward_step.register_fake
def _(
    grad_out, ids, offsets, weight, per_sample_weights, importance, hot, argmax, state, rounding, *, psw_grad, **options
):
    return _bag_backward_fake_extras(ids, weight, per_sample_weights, importance, psw_grad)


# Autograd. -----------------------------------------------------------------------


def _save_training(ctx, options: dict, weight: torch.Tensor, optimizer_state, rounding):
    """Keep the forward's options on ``ctx``; returns the table to save for
    backward (``None`` when a fused step will change it)."""
    ctx.lookup = {name: options[name] for name in compute.LOOKUP_OPTIONS}
    ctx.training = compute.Training(**{name: options[name] for name in compute.TRAINING_OPTIONS})
    ctx.stepped = None
    if ctx.training.optimizer is None:
        return weight
    # The fused step changes the table and the state in place: they are kept
    # outside save_for_backward, whose version check would refuse a second
    # lookup of the same table after the first one's step.
    ctx.stepped = (weight, optimizer_state, rounding)
    return None


def _step_options(ctx) -> dict:
    """The step ops' tensors and options besides the lookup's."""
    training = ctx.training
    _, state, rounding = ctx.stepped
    return dict(state=state, rounding=rounding, optimizer=training.optimizer, lr=training.lr, eps=training.eps)


def _table_gradient(ctx, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The table's sparse COO gradient from its touched rows."""
    weight_shape, weight_dtype = ctx.table_meta
    # Sorted, unique rows: coalesced by construction.
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values.to(weight_dtype), weight_shape, is_coalesced=True, check_invariants=False
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ids, weight, importance, hot, hash_cache, optimizer_state, rounding = inputs
    saved_weight = _save_training(ctx, keyword_only_inputs, weight, optimizer_state, rounding)
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
        if ctx.training.optimizer is not None and needs_weight:
            grad_importance = bloom_backward_step(**tensors, **_step_options(ctx), **ctx.lookup)
        elif ctx.training.per_row:
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
        None,
    )


bloom_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def _bag_setup_context(ctx, inputs, keyword_only_inputs, output):
    ids, offsets, weight, per_sample_weights, importance, hot, optimizer_state, rounding = inputs
    _, argmax = output
    saved_weight = _save_training(ctx, keyword_only_inputs, weight, optimizer_state, rounding)
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
        if ctx.training.optimizer is not None and needs_weight:
            # The step op reads the per-sample weights' and importance
            # weights' gradients off the rows before it changes them.
            step_options = dict(bag_mode=ctx.mode, psw_grad=psw_grad, **ctx.lookup, **_step_options(ctx))
            grad_psw, grad_importance = bloom_bag_backward_step(**tensors, **step_options)
        elif ctx.training.per_row:
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
        None,
    )


bloom_bag_forward.register_autograd(_bag_backward_formula, setup_context=_bag_setup_context)
