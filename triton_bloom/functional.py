"""Functional form of the Bloom embedding."""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, ops, rowwise
from .hashing import WIDE_ID_START, check_num_hash_functions, hash_rows
from .optim import FUSED_OPTIMIZERS
from .reference import bloom_bag_reference, bloom_embedding_reference

__all__ = ["bloom_embedding", "bloom_embedding_bag", "check_ids", "bag_layout"]

MODES = ("sum", "mean", "max")


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a 2-D table of a supported float dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (num_rows, embedding_dim) Tensor, got {getattr(weight, 'shape', weight)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got dtype {weight.dtype}")


def check_training_options(sparse: bool, fused_optimizer) -> None:
    if fused_optimizer is not None and not isinstance(fused_optimizer, FUSED_OPTIMIZERS):
        raise TypeError(
            f"fused_optimizer must be a triton_bloom.optim.FusedSGD or FusedRowWiseAdagrad, got {fused_optimizer!r}"
        )
    if sparse and fused_optimizer is not None:
        raise ValueError("sparse=True and a fused_optimizer exclude each other: the fused step leaves no gradient")


def check_ids(ids: torch.Tensor, num_embeddings: Optional[int]) -> None:
    """Raise unless ``ids`` is an integer tensor with values in ``[0, num_embeddings)``.

    ``TypeError`` for a non-tensor or a float, complex or bool dtype;
    ``IndexError`` naming the first offending value otherwise.  On CUDA the
    range check is asynchronous (a device-side assert, as ``nn.Embedding``
    gives there), so it costs no host synchronisation.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input must be a Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input must hold int32 or int64 ids (as nn.Embedding), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    upper = num_embeddings if num_embeddings is not None else None
    if ids.device.type == "cuda":
        ok = ids.min() >= 0
        if upper is not None:
            ok = ok & (ids.max() < upper)
        torch._assert_async(ok, f"triton_bloom: ids out of range [0, {upper})")
        return
    low, high = torch.aminmax(ids)
    low, high = int(low), int(high)
    if low < 0:
        raise IndexError(f"index {low} is out of range: ids must be non-negative")
    if upper is not None and high >= upper:
        raise IndexError(f"index {high} is out of range for num_embeddings={upper}")


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
    check_ids(input, num_embeddings)
    if input.device != weight.device:
        raise RuntimeError(f"input is on {input.device} but weight is on {weight.device}")
    num_rows = weight.shape[0]
    rows = None
    if hash_cache is not None:
        if hash_cache.dim() != 2 or hash_cache.shape[1] != num_hash_functions:
            raise ValueError(
                f"hash_cache must have shape (num_embeddings, {num_hash_functions}), "
                f"got {tuple(hash_cache.shape)}"
            )
        rows = hash_cache.index_select(0, input.reshape(-1)).view(*input.shape, num_hash_functions)
    use_triton = dispatch.use_triton(backend, weight.device)
    wide_ids = input.dtype == torch.int64 and (num_embeddings is None or num_embeddings > WIDE_ID_START)
    if sparse or fused_optimizer is not None:
        return rowwise.RowwiseEmbedding.apply(weight, input, rows, num_hash_functions, padding_idx, wide_ids,
                                              use_triton, sparse, fused_optimizer)  # fmt: skip
    if use_triton:
        return ops.bloom_forward(input, weight, rows, num_hash_functions, padding_idx, wide_ids)
    if rows is None:
        rows = hash_rows(input, num_hash_functions, num_rows)
    return bloom_embedding_reference(input, weight, rows, padding_idx)


def _check_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    if offsets.device.type == "cuda":
        ok = (offsets[0] == 0) & (offsets[-1] <= num_ids)
        if offsets.numel() > 1:
            ok = ok & (offsets[1:] >= offsets[:-1]).all()
        torch._assert_async(ok, "triton_bloom: offsets must start at 0, not decrease, and stay within the input")
        return
    first = int(offsets[0])
    if first != 0:
        raise ValueError(f"offsets[0] has to be 0, i.e. the first bag starts at position 0, but got {first}")
    last = int(offsets.max())
    if last > num_ids:
        raise ValueError(f"offsets point past the input: offset {last} > input length {num_ids}")
    if offsets.numel() > 1:
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(
                f"offsets must not decrease, but offsets[{i}]={int(offsets[i])} > offsets[{i + 1}]={int(offsets[i + 1])}"
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
        _check_offsets(full_offsets, ids.numel())
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
    check_ids(ids, num_embeddings)
    if ids.device != weight.device:
        raise RuntimeError(f"input is on {ids.device} but weight is on {weight.device}")
    use_triton = dispatch.use_triton(backend, weight.device)
    wide_ids = ids.dtype == torch.int64 and (num_embeddings is None or num_embeddings > WIDE_ID_START)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(weight.dtype)
    if sparse or fused_optimizer is not None:
        return rowwise.RowwiseEmbeddingBag.apply(weight, per_sample_weights, ids, offsets, num_hash_functions,
                                                 MODES.index(mode), padding_idx, wide_ids, use_triton, sparse,
                                                 fused_optimizer)  # fmt: skip
    if use_triton:
        out, _ = ops.bloom_bag_forward(
            ids, offsets, weight, per_sample_weights, num_hash_functions, MODES.index(mode), padding_idx, wide_ids
        )
        return out
    rows = hash_rows(ids, num_hash_functions, weight.shape[0])
    return bloom_bag_reference(ids, offsets, weight, rows, mode, per_sample_weights, padding_idx)
