"""Functional form of the Bloom embedding."""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, ops, rowwise
from .checks import check_id_range, check_id_tensor, check_offsets, check_weight
from .hashing import check_num_hash_functions
from .optim import FUSED_OPTIMIZERS

__all__ = ["bloom_embedding", "bloom_embedding_bag", "bag_layout", "check_training_options"]

MODES = ops.MODES


def check_training_options(sparse: bool, fused_optimizer) -> None:
    if fused_optimizer is not None and not isinstance(fused_optimizer, FUSED_OPTIMIZERS):
        raise TypeError(
            f"fused_optimizer must be a triton_bloom.optim.FusedSGD or FusedRowWiseAdagrad, got {fused_optimizer!r}"
        )
    if sparse and fused_optimizer is not None:
        raise ValueError("sparse=True and a fused_optimizer exclude each other: the fused step leaves no gradient")


def check_importance(importance: Optional[torch.Tensor], weight: torch.Tensor, num_hash_functions: int) -> None:
    if importance is None:
        return
    if importance.dim() != 2 or importance.shape[1] != num_hash_functions or importance.shape[0] < 1:
        raise ValueError(
            f"importance must have shape (importance_rows, {num_hash_functions}), got {tuple(importance.shape)}"
        )
    if not importance.is_floating_point() or importance.device != weight.device:
        raise TypeError(
            f"importance must be a floating-point tensor on {weight.device}, got {importance.dtype} on "
            f"{importance.device}"
        )


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
    check_id_tensor(input)
    if input.device != weight.device:
        raise RuntimeError(f"input is on {input.device} but weight is on {weight.device}")
    if hash_cache is not None and (hash_cache.dim() != 2 or hash_cache.shape[1] != num_hash_functions):
        raise ValueError(
            f"hash_cache must have shape (num_embeddings, {num_hash_functions}), got {tuple(hash_cache.shape)}"
        )
    check_importance(importance, weight, num_hash_functions)
    # Checks that do not read tensor values happen here, before the op, so
    # that the backend's errors surface in eager mode and at trace time alike.
    use_triton = dispatch.use_triton(backend, weight.device)
    if sparse or fused_optimizer is not None:
        check_id_range(input, num_embeddings)
        rows = ops.cached_rows(input, hash_cache)
        wide_ids = ops.wide_ids_for(input, num_embeddings)
        return rowwise.RowwiseEmbedding.apply(weight, importance, input, rows, num_hash_functions, padding_idx,
                                              wide_ids, signed, use_triton, sparse, fused_optimizer)  # fmt: skip
    return ops.bloom_forward(input, weight, hash_cache, importance, num_hash_functions, padding_idx, num_embeddings,
                             signed, backend)  # fmt: skip


def bag_layout(
    input: torch.Tensor,
    offsets: Optional[torch.Tensor],
    per_sample_weights: Optional[torch.Tensor],
    mode: str,
    include_last_offset: bool,
):
    """Checks ``nn.EmbeddingBag``'s input conventions and turns them into one
    layout: flat ``(n,)`` ids, ``(B + 1,)`` int64 offsets ending at ``n``, and
    flat ``(n,)`` per-sample weights or ``None``."""
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {MODES}, got {mode!r}")
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
        signed (bool), importance (Tensor, optional): the variants, as in
            :func:`bloom_embedding`.

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
    ids, offsets, per_sample_weights = bag_layout(input, offsets, per_sample_weights, mode, include_last_offset)
    check_id_tensor(ids)
    if ids.device != weight.device:
        raise RuntimeError(f"input is on {ids.device} but weight is on {weight.device}")
    check_importance(importance, weight, num_hash_functions)
    use_triton = dispatch.use_triton(backend, weight.device)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(weight.dtype)
    if sparse or fused_optimizer is not None:
        check_id_range(ids, num_embeddings)
        check_offsets(offsets, ids.numel())
        wide_ids = ops.wide_ids_for(ids, num_embeddings)
        return rowwise.RowwiseEmbeddingBag.apply(weight, per_sample_weights, importance, ids, offsets,
                                                 num_hash_functions, MODES.index(mode), padding_idx, wide_ids,
                                                 signed, use_triton, sparse, fused_optimizer)  # fmt: skip
    out, _ = ops.bloom_bag_forward(ids, offsets, weight, per_sample_weights, importance, num_hash_functions,
                                   MODES.index(mode), padding_idx, num_embeddings, signed, backend)  # fmt: skip
    return out
