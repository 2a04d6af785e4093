"""Functional form of the Bloom embedding.

``bloom_embedding`` and ``bloom_embedding_bag`` check their arguments, then
run ``lookup`` and ``bag_lookup``, which the modules call directly (they
checked the same arguments once, in ``__init__``).  Those check the input,
decide the backend once for the call, and call the custom op in ``ops``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, eager, ops
from .checks import (
    check_hash_cache,
    check_hot,
    check_importance,
    check_input,
    check_training_options,
    check_weight,
    normalize_padding_idx,
)
from .constants import MODES
from .hashing import check_num_hash_functions

__all__ = ["bloom_embedding", "bloom_embedding_bag", "bag_layout", "check_training_options"]


def training_arguments(sparse: bool, fused_optimizer, weight: torch.Tensor) -> dict:
    """The lookup ops' training options: ``sparse``, or ``fused_optimizer``'s
    code, ``lr``, ``eps``, its state and its stochastic rounding's seed and
    step for ``weight`` (which the op's backward updates in place)."""
    if fused_optimizer is None:
        return {"sparse": sparse, "optimizer_state": None, "rounding": None}
    return fused_optimizer.step_arguments(weight)


def bloom_embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    num_hash_functions: int = 4,
    padding_idx: Optional[int] = None,
    *,
    num_embeddings: Optional[int] = None,
    hash_cache: Optional[torch.Tensor] = None,
    backend: str = "auto",
    sparse: bool = False,
    fused_optimizer=None,
    signed: bool = False,
    importance: Optional[torch.Tensor] = None,
    hot_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Look up the Bloom embedding of every id: the sum of the ``k`` rows of
    ``weight`` that the id's murmurhash3 hashes select.

    Args:
        input (Tensor): int32 or int64 ids, any shape.
        weight (Tensor): the compressed table, ``(num_rows, embedding_dim)``.
        num_hash_functions (int): ``k``, 1 to 24.
        padding_idx (int, optional): this id gives a zero vector and no gradient.
        num_embeddings (int, optional): ids must be below it (``IndexError``
            otherwise); ``None`` admits any id in ``[0, 2**63)``.
        hash_cache (Tensor, optional): precomputed ``(num_embeddings, k)`` rows,
            as :func:`triton_bloom.bloom_hash` gives them, used instead of hashing.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``.
        sparse (bool): ``weight``'s gradient is a coalesced sparse COO tensor
            over the touched rows, as with ``nn.Embedding(sparse=True)``.
        fused_optimizer (FusedSGD or FusedRowWiseAdagrad, optional): update
            the touched rows of ``weight`` inside the backward pass instead of
            returning a gradient (see :mod:`triton_bloom.optim`).
        signed (bool): each row enters with the +-1 of a sign hash, so that
            colliding ids cancel in expectation (Weinberger et al. 2009).
        importance (Tensor, optional): ``(importance_rows, k)`` learned
            weights of the ``k`` rows, read at a hash of the id (hash
            embeddings, Svenstrup et al. 2017); differentiable.
        hot_ids (Tensor, optional): ``(H,)`` sorted, distinct ids that own
            the last ``H`` rows of ``weight``: the id at position ``p`` reads
            row ``R - H + p`` alone, with no sign or importance weight, and
            every other id hashes into the first ``R - H`` rows.

    Shape:
        - Input: :math:`(*)`
        - Weight: :math:`(R, H)`, ``R`` rows of dimension ``H``
        - Output: :math:`(*, H)`

    Examples::

        >>> weight = torch.randn(200, 16)
        >>> ids = torch.tensor([[1, 2, 4], [4, 3, 999]])
        >>> bloom_embedding(ids, weight, num_hash_functions=4).shape
        torch.Size([2, 3, 16])
    """
    check_num_hash_functions(num_hash_functions)
    dispatch.check_backend(backend)
    check_weight(weight)
    check_training_options(sparse, fused_optimizer)
    check_hash_cache(hash_cache, num_hash_functions, weight)
    check_importance(importance, weight, num_hash_functions)
    check_hot(hot_ids, weight)
    padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
    return lookup(
        input,
        weight,
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        hash_cache=hash_cache,
        backend=backend,
        sparse=sparse,
        fused_optimizer=fused_optimizer,
        signed=signed,
        importance=importance,
        hot=hot_ids,
    )


def op_options(weight: torch.Tensor, *, backend: str, sparse: bool, fused_optimizer, **lookup_options) -> dict:
    """The custom ops' keyword arguments for one call: the backend decided
    once, here, the training options as the ops take them, and the lookup's
    own options (``num_hash_functions``, ``padding_idx``, ``num_embeddings``,
    ``signed``) as given."""
    # Checks that do not read tensor values happen here, before the op, so
    # that the backend's errors surface in eager mode and at trace time alike.
    use_triton = dispatch.use_triton(backend, weight.device)
    return dict(use_triton=use_triton, **training_arguments(sparse, fused_optimizer, weight), **lookup_options)


def lookup(
    input: torch.Tensor,
    weight: torch.Tensor,
    *,
    hash_cache: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    **options,
) -> torch.Tensor:
    """:func:`bloom_embedding` once its arguments are checked: checks the
    input and runs the custom op with :func:`op_options` of ``options``."""
    check_input(input, weight)
    if (
        hash_cache is None
        and importance is None
        and hot is None
        and not options["signed"]
        and not options["sparse"]
        and options["fused_optimizer"] is None
        and options["backend"] != "triton"
        and eager.eager_path(input, weight)
    ):
        return eager.eager_lookup(
            input,
            weight,
            num_hash_functions=options["num_hash_functions"],
            padding_idx=options["padding_idx"],
            num_embeddings=options["num_embeddings"],
        )
    return ops.bloom_forward(
        input, weight, importance=importance, hot=hot, hash_cache=hash_cache, **op_options(weight, **options)
    )


def bag_layout(
    input: torch.Tensor,
    offsets: Optional[torch.Tensor],
    per_sample_weights: Optional[torch.Tensor],
    mode: str,
    include_last_offset: bool,
):
    """Checks ``nn.EmbeddingBag``'s input conventions and turns them into one
    layout: flat ``(n,)`` ids, ``(B + 1,)`` int64 offsets ending at ``n``, and
    flat ``(n,)`` per-sample weights or ``None``.  ``mode``, one of
    :data:`MODES`, is checked by the caller."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor of integer ids, got {type(input).__name__}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "if input is 2-D (bags of equal length), offsets has to be None, "
                f"but got offsets of shape {tuple(offsets.shape)}"
            )
        num_bags, length = input.shape
        ids = input.reshape(-1)
        full_offsets = torch.arange(0, num_bags * length + 1, max(length, 1), device=input.device)
        if length == 0:
            full_offsets = torch.zeros(num_bags + 1, dtype=torch.int64, device=input.device)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1-D Tensor when input is 1-D, but got None")
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1:
            raise ValueError(f"offsets has to be a 1-D Tensor, got {getattr(offsets, 'shape', offsets)}")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"offsets must hold int32 or int64 values, got dtype {offsets.dtype}")
        if offsets.device != input.device:
            raise RuntimeError(f"input is on {input.device} but offsets is on {offsets.device}")
        ids = input
        full_offsets = offsets.to(torch.int64)
        if include_last_offset:
            if full_offsets.numel() == 0:
                raise ValueError("include_last_offset=True needs at least one offset (the end of the last bag)")
        else:
            end = torch.full((1,), ids.numel(), dtype=torch.int64, device=ids.device)
            full_offsets = torch.cat([full_offsets, end])
    else:
        raise ValueError(f"input has to be 1-D or 2-D, but got a {input.dim()}-D tensor")
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(
                f"per_sample_weights are only supported for mode='sum' (got mode={mode!r}), as in nn.EmbeddingBag"
            )
        if per_sample_weights.shape != input.shape:
            raise ValueError(
                f"per_sample_weights must have the shape of input {tuple(input.shape)}, "
                f"got {tuple(per_sample_weights.shape)}"
            )
        if not per_sample_weights.is_floating_point():
            raise TypeError(f"per_sample_weights must be floating point, got dtype {per_sample_weights.dtype}")
        if per_sample_weights.device != input.device:
            raise RuntimeError(f"input is on {input.device} but per_sample_weights is on {per_sample_weights.device}")
        per_sample_weights = per_sample_weights.reshape(-1)
    return ids, full_offsets, per_sample_weights


def bloom_embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: Optional[torch.Tensor] = None,
    num_hash_functions: int = 4,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
    padding_idx: Optional[int] = None,
    include_last_offset: bool = False,
    *,
    num_embeddings: Optional[int] = None,
    backend: str = "auto",
    sparse: bool = False,
    fused_optimizer=None,
    signed: bool = False,
    importance: Optional[torch.Tensor] = None,
    hot_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Pool the Bloom embeddings of bags of ids, as
    :func:`torch.nn.functional.embedding_bag` pools rows.

    An id's vector is the sum of its ``k`` Bloom rows (as in
    :func:`bloom_embedding`); each bag is the ``sum``, ``mean`` or ``max`` of its
    ids' vectors.

    Args:
        input (Tensor): int32/int64 ids: 2-D ``(B, L)`` bags of equal length,
            or 1-D with ``offsets``.
        weight (Tensor): the compressed table ``(num_rows, embedding_dim)``.
        offsets (Tensor, optional): 1-D starts of the bags in a 1-D ``input``.
        num_hash_functions (int): ``k``, 1 to 24.
        mode (str): ``"sum"``, ``"mean"`` or ``"max"``.
        per_sample_weights (Tensor, optional): weights of the ids, the shape
            of ``input``; ``sum`` mode only.
        padding_idx (int, optional): this id is left out of the pooling (and
            of the mean's count) and gets no gradient.
        include_last_offset (bool): ``offsets`` has one more entry, the end of
            the last bag (CSR layout).
        num_embeddings (int, optional): ids must be below it.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``.
        sparse (bool): ``weight``'s gradient is a coalesced sparse COO tensor.
        fused_optimizer (FusedSGD or FusedRowWiseAdagrad, optional): update
            the touched rows inside the backward pass (see :mod:`triton_bloom.optim`).
        signed (bool): as in :func:`bloom_embedding`.
        importance (Tensor, optional): as in :func:`bloom_embedding`.
        hot_ids (Tensor, optional): as in :func:`bloom_embedding`.

    Shape:
        - Output: :math:`(B, H)`; empty bags give zeros.

    Examples::

        >>> weight = torch.randn(200, 16)
        >>> ids = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
        >>> bloom_embedding_bag(ids, weight, torch.tensor([0, 4]), mode="mean").shape
        torch.Size([2, 16])
    """
    check_num_hash_functions(num_hash_functions)
    dispatch.check_backend(backend)
    check_weight(weight)
    check_training_options(sparse, fused_optimizer)
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, got {mode!r}")
    check_importance(importance, weight, num_hash_functions)
    check_hot(hot_ids, weight)
    padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
    return bag_lookup(
        input,
        weight,
        offsets,
        per_sample_weights,
        mode=mode,
        include_last_offset=include_last_offset,
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        backend=backend,
        sparse=sparse,
        fused_optimizer=fused_optimizer,
        signed=signed,
        importance=importance,
        hot=hot_ids,
    )


def bag_lookup(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: Optional[torch.Tensor],
    per_sample_weights: Optional[torch.Tensor],
    *,
    mode: str,
    include_last_offset: bool,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    **options,
) -> torch.Tensor:
    """:func:`bloom_embedding_bag` once its arguments are checked: checks the
    input and runs the custom op with :func:`op_options` of ``options``."""
    ids, offsets, per_sample_weights = bag_layout(input, offsets, per_sample_weights, mode, include_last_offset)
    check_input(ids, weight)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(weight.dtype)
    out, _ = ops.bloom_bag_forward(
        ids,
        offsets,
        weight,
        per_sample_weights=per_sample_weights,
        importance=importance,
        hot=hot,
        mode=MODES.index(mode),
        **op_options(weight, **options),
    )
    return out
