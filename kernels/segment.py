"""Gradients aggregated per touched row, without atomics: sort the
(row, source) pairs by row, then one program sums each row's segment in a
fixed order.

It serves the deterministic backward (bit-identical run to run, as
``torch.use_deterministic_algorithms(True)`` asks), sparse gradients (the
touched rows and their values are exactly a coalesced COO tensor) and the
fused optimizers (which need each row's whole gradient before updating it).
"""

import torch
import triton
import triton.language as tl

from ..constants import accumulation_dtype
from .launch import launch

# Not autotuned: BLOCK_N sets the order in which a row's terms are added, so a
# tuner free to change it would change the bits of the result between runs.
SEGMENT_BLOCK_N = 16


@triton.jit
def _bloom_segment_sum_kernel(
    SEGMENTS,  # (u + 1,) int64: entries SEGMENTS[r]:SEGMENTS[r + 1] belong to unique row r
    SOURCES,  # (m,) int64 row of GRAD each entry adds, sorted by destination row
    SCALES,  # (m,) float scale of each entry, read only when HAS_SCALE
    GRAD,  # (s, dim) per-source gradients, contiguous
    OUT,  # (u, dim) float32 (float64) per-unique-row sums, contiguous
    dim,  # embedding_dim
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    start = tl.load(SEGMENTS + segment)
    end = tl.load(SEGMENTS + segment + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=OUT.dtype.element_ty)
    for first in range(start, end, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        sources = tl.load(SOURCES + offs_n, mask=mask_n, other=0)
        mask = mask_n[:, None] & mask_d[None, :]
        grad = tl.load(GRAD + sources[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
        grad = grad.to(OUT.dtype.element_ty)
        if HAS_SCALE:
            grad *= tl.load(SCALES + offs_n, mask=mask_n, other=0.0).to(OUT.dtype.element_ty)[:, None]
        acc += grad
    tl.store(OUT + segment * dim + offs_d, tl.sum(acc, axis=0), mask=mask_d)


def bloom_row_gradients(rows, sources, grad, *, scales=None, keep=None):
    """Sum ``grad[sources[i]] * scales[i]`` into each of ``rows[i, :]``, per row.

    Args:
        rows (Tensor): ``(n, k)`` int64 rows each entry adds to.
        sources (Tensor): ``(n,)`` int64 row of ``grad`` each entry adds.
        grad (Tensor): ``(s, dim)`` gradients.
        scales (Tensor, optional): ``(n,)`` factors of the entries (per-sample
            weights, 1/count), or ``(n, k)`` factors of each of their rows.
        keep (Tensor, optional): ``(n,)`` bool; entries that are ``False``
            (padding) add nothing and touch no row.

    Returns:
        ``(unique_rows, values)``: the sorted ``(u,)`` int64 rows that some
        entry touches and their ``(u, dim)`` summed gradients, float32
        (float64 when ``grad`` is float64). Deterministic: each row's terms
        are added in the order of the entries.
    """
    k = rows.shape[1]
    dim = grad.shape[1]
    if keep is not None:
        rows, sources = rows[keep], sources[keep]
        scales = scales[keep] if scales is not None else None
    flat_rows = rows.reshape(-1)
    flat_sources = sources.repeat_interleave(k)
    flat_scales = None
    if scales is not None:
        flat_scales = scales.reshape(-1) if scales.dim() == 2 else scales.repeat_interleave(k)
    sorted_rows, order = torch.sort(flat_rows, stable=True)
    unique_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    segments = torch.zeros(unique_rows.numel() + 1, dtype=torch.int64, device=grad.device)
    torch.cumsum(counts, 0, out=segments[1:])
    acc_dtype = accumulation_dtype(grad.dtype)
    values = torch.empty((unique_rows.numel(), dim), dtype=acc_dtype, device=grad.device)
    if unique_rows.numel() and dim:
        args = dict(
            SEGMENTS=segments,
            SOURCES=flat_sources[order].contiguous(),
            SCALES=flat_scales[order].contiguous() if flat_scales is not None else segments,
            GRAD=grad.contiguous(),
            OUT=values,
            dim=dim,
            HAS_SCALE=flat_scales is not None,
        )
        config = {"kwargs": {"BLOCK_N": SEGMENT_BLOCK_N, "BLOCK_D": min(128, triton.next_power_of_2(dim))}}
        launch(
            _bloom_segment_sum_kernel,
            lambda meta: (unique_rows.numel(), triton.cdiv(dim, meta["BLOCK_D"])),
            args,
            grad.device,
            config=config,
        )
    return unique_rows, values
