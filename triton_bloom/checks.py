"""Checks of the values users hand in, with errors that name the bad value.

The value checks (ids in range, offsets in order) read tensor contents, so
they run inside the custom ops' implementations, where tensors are real:
``torch.compile`` traces around them without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["WEIGHT_DTYPES", "check_weight", "check_id_tensor", "check_id_range", "check_offsets"]


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a 2-D table of a supported float dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (num_rows, embedding_dim) Tensor, got {getattr(weight, 'shape', weight)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got dtype {weight.dtype}")


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
