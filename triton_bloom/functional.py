"""Functional form of the Bloom embedding."""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, ops
from .hashing import WIDE_ID_START, check_num_hash_functions, hash_rows
from .reference import bloom_embedding_reference

__all__ = ["bloom_embedding", "check_ids"]


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
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_rows, embedding_dim), got shape {tuple(weight.shape)}")
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
    if dispatch.use_triton(backend, weight.device):
        wide_ids = input.dtype == torch.int64 and (num_embeddings is None or num_embeddings > WIDE_ID_START)
        return ops.bloom_forward(input, weight, rows, num_hash_functions, padding_idx, wide_ids)
    if rows is None:
        rows = hash_rows(input, num_hash_functions, num_rows)
    return bloom_embedding_reference(input, weight, rows, padding_idx)
