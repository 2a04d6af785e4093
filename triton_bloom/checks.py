"""Checks of the values users hand in, with errors that name the bad value.

The argument checks (sizes, dtypes, options) run once where the arguments
are given: in a module's ``__init__``, or in each call of the functional API.
The input checks (``check_input``) run on every call.  The value checks (ids
in range, offsets in order) read tensor contents, so they run inside the
custom ops' implementations, where tensors are real: ``torch.compile`` traces
around them without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from .optim import FUSED_OPTIMIZERS

__all__ = [
    "WEIGHT_DTYPES",
    "check_weight",
    "check_training_options",
    "check_importance",
    "check_hash_cache",
    "check_hot",
    "check_input",
    "check_id_tensor",
    "check_id_range",
    "check_id_bounds",
    "check_offsets",
    "normalize_padding_idx",
]


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a 2-D table of a supported float dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D (num_rows, embedding_dim) Tensor, got {getattr(weight, 'shape', weight)}"
        )
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got dtype {weight.dtype}")
    if weight.shape[0] < 1:
        # Every id hashes to some row: with none, the floor modulo divides by zero.
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")


def check_training_options(sparse: bool, fused_optimizer) -> None:
    """Raise unless ``fused_optimizer`` is one of ours (or ``None``) and not
    combined with ``sparse=True``."""
    if fused_optimizer is not None and not isinstance(fused_optimizer, FUSED_OPTIMIZERS):
        raise TypeError(
            f"fused_optimizer must be a triton_bloom.optim.FusedSGD or FusedRowWiseAdagrad, got {fused_optimizer!r}"
        )
    if sparse and fused_optimizer is not None:
        raise ValueError("sparse=True and a fused_optimizer exclude each other: the fused step leaves no gradient")


def check_importance(importance: Optional[torch.Tensor], weight: torch.Tensor, num_hash_functions: int) -> None:
    """Raise unless ``importance`` is ``None`` or a floating-point
    ``(importance_rows, k)`` tensor on ``weight``'s device."""
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


def check_hash_cache(
    hash_cache: Optional[torch.Tensor], num_hash_functions: int, weight: Optional[torch.Tensor] = None
) -> None:
    """Raise unless ``hash_cache`` is ``None`` or an int32/int64
    ``(num_embeddings, k)`` tensor (on ``weight``'s device, when given).
    Its values are checked per call, by :func:`check_hash_cache_rows`."""
    if hash_cache is None:
        return
    if hash_cache.dim() != 2 or hash_cache.shape[1] != num_hash_functions:
        raise ValueError(
            f"hash_cache must have shape (num_embeddings, {num_hash_functions}), got {tuple(hash_cache.shape)}"
        )
    if hash_cache.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"hash_cache must hold int32 or int64 rows, got dtype {hash_cache.dtype}")
    if weight is not None and hash_cache.device != weight.device:
        raise RuntimeError(f"hash_cache is on {hash_cache.device} but weight is on {weight.device}")


def check_hash_cache_rows(ids: torch.Tensor, hash_cache: torch.Tensor, num_rows: int) -> None:
    """``IndexError`` naming the offending value unless every id has a row
    of ``hash_cache`` and the rows it gives lie in ``[0, num_rows)``
    (asynchronously on CUDA).  A user's cache is read by the kernels without
    bounds checks: this keeps a wrong one from reading outside the table."""
    if ids.numel() == 0:
        return
    if hash_cache.shape[0] == 0:  # known on the host: no id has a row
        raise IndexError(f"index {int(ids.reshape(-1)[0])} is out of range for a hash_cache of 0 ids")
    if ids.device.type == "cuda":
        ok = ids.max() < hash_cache.shape[0]
        rows = hash_cache.index_select(0, ids.reshape(-1).clamp(0, max(hash_cache.shape[0] - 1, 0)))
        ok = ok & (rows.min() >= 0) & (rows.max() < num_rows)
        torch._assert_async(ok, f"triton_bloom: an id past the hash_cache, or a cached row outside [0, {num_rows})")
        return
    high = int(ids.max())
    if high >= hash_cache.shape[0]:
        raise IndexError(f"index {high} is out of range for a hash_cache of {hash_cache.shape[0]} ids")
    low, high = (int(v) for v in torch.aminmax(hash_cache.index_select(0, ids.reshape(-1))))
    bad = low if low < 0 else high
    if low < 0 or high >= num_rows:
        raise IndexError(f"hash_cache gives row {bad}, outside the table's {num_rows} rows")


def check_hot(hot: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    """Raise unless ``hot`` is ``None`` or a 1-D int32/int64 tensor of
    strictly increasing non-negative ids on ``weight``'s device, fewer than
    ``weight``'s rows (the last ``len(hot)`` rows are theirs; at least one
    row stays shared)."""
    if hot is None:
        return
    if not isinstance(hot, torch.Tensor) or hot.dim() != 1 or hot.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"hot ids must be a 1-D int32 or int64 Tensor, got {getattr(hot, 'dtype', type(hot))} "
            f"of shape {tuple(getattr(hot, 'shape', ()))}"
        )
    if hot.device != weight.device:
        raise RuntimeError(f"hot ids are on {hot.device} but weight is on {weight.device}")
    if hot.numel() >= weight.shape[0]:
        raise ValueError(
            f"{hot.numel()} hot ids need fewer than the table's {weight.shape[0]} rows: "
            "the last len(hot) rows are theirs and at least one must stay shared"
        )
    if hot.numel() and int(hot.min()) < 0:
        raise ValueError(f"hot ids must be non-negative, got {int(hot.min())}")
    if hot.numel() > 1 and not bool((hot[1:] > hot[:-1]).all()):
        i = int(torch.nonzero(hot[1:] <= hot[:-1])[0])
        raise ValueError(
            f"hot ids must be sorted and distinct, but hot[{i}]={int(hot[i])} >= hot[{i + 1}]={int(hot[i + 1])}"
        )


def check_input(ids, weight: torch.Tensor) -> None:
    """Raise unless ``ids`` is an id tensor (:func:`check_id_tensor`) on ``weight``'s device."""
    check_id_tensor(ids)
    if ids.device != weight.device:
        raise RuntimeError(f"input is on {ids.device} but weight is on {weight.device}")


def check_id_tensor(ids) -> None:
    """``TypeError`` unless ``ids`` is an int32 or int64 tensor (as ``nn.Embedding``)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input must be a Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input must hold int32 or int64 ids (as nn.Embedding), got dtype {ids.dtype}")


def check_id_range(ids: torch.Tensor, num_embeddings: Optional[int]) -> None:
    """``IndexError`` naming the offending value unless every id lies in
    ``[0, num_embeddings)`` (``[0, 2**63)`` for ``None``).

    On CUDA the check is asynchronous (a device-side assert, as
    ``nn.Embedding`` gives there), so it costs no host synchronisation.
    """
    if ids.numel() == 0:
        return
    if ids.device.type == "cuda":
        ok = ids.min() >= 0
        if num_embeddings is not None:
            ok = ok & (ids.max() < num_embeddings)
        torch._assert_async(ok, f"triton_bloom: ids out of range [0, {num_embeddings})")
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    check_id_bounds(low, high, num_embeddings)


def check_id_bounds(low: int, high: int, num_embeddings: Optional[int]) -> None:
    """:func:`check_id_range` given the ids' smallest and largest value."""
    if low < 0:
        raise IndexError(f"index {low} is out of range: ids must be non-negative")
    if num_embeddings is not None and high >= num_embeddings:
        raise IndexError(f"index {high} is out of range for num_embeddings={num_embeddings}")


def check_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    """Raise ``ValueError`` unless the ``(B + 1,)`` offsets start at 0, never
    decrease and end at ``num_ids`` (asynchronously on CUDA).

    With ``include_last_offset=True`` the caller's last offset is this end:
    ``nn.EmbeddingBag`` documents it as the input's length (CSR), and ids
    past it would belong to no bag."""
    if offsets.device.type == "cuda":
        ok = (offsets[0] == 0) & (offsets[-1] == num_ids)
        if offsets.numel() > 1:
            ok = ok & (offsets[1:] >= offsets[:-1]).all()
        torch._assert_async(ok, "triton_bloom: offsets must start at 0, not decrease, and end at the input's length")
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
    end = int(offsets[-1])
    if end != num_ids:
        raise ValueError(
            f"with include_last_offset=True the last offset must equal the input length {num_ids} "
            f"(it ends the last bag, as in nn.EmbeddingBag), but got {end}"
        )


def normalize_padding_idx(padding_idx: Optional[int], num_embeddings: Optional[int]) -> Optional[int]:
    """``padding_idx`` as a non-negative id (negative counts from
    ``num_embeddings``, as in ``nn.Embedding``); ``ValueError`` when out of range."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if num_embeddings is None:
        if padding_idx < 0:
            raise ValueError(f"padding_idx={padding_idx} must be non-negative when num_embeddings is None")
        return padding_idx
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
    return padding_idx % num_embeddings
