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
    "check_input",
    "check_id_tensor",
    "check_id_range",
    "check_offsets",
]


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a 2-D table of a supported float dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (num_rows, embedding_dim) Tensor, got {getattr(weight, 'shape', weight)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got dtype {weight.dtype}")


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


def check_hash_cache(hash_cache: Optional[torch.Tensor], num_hash_functions: int) -> None:
    """Raise unless ``hash_cache`` is ``None`` or ``(num_embeddings, k)``."""
    if hash_cache is not None and (hash_cache.dim() != 2 or hash_cache.shape[1] != num_hash_functions):
        raise ValueError(
            f"hash_cache must have shape (num_embeddings, {num_hash_functions}), got {tuple(hash_cache.shape)}"
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
    if low < 0:
        raise IndexError(f"index {low} is out of range: ids must be non-negative")
    if num_embeddings is not None and high >= num_embeddings:
        raise IndexError(f"index {high} is out of range for num_embeddings={num_embeddings}")


def check_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    """Raise ``ValueError`` unless the ``(B + 1,)`` offsets start at 0, never
    decrease and stay within the ``num_ids`` ids (asynchronously on CUDA)."""
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
