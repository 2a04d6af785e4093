"""Gradients aggregated per touched row, without atomics: sort the
(row, source) pairs by row, then each program sums a block of rows'
segments, each in the order of its entries.  Programs take the segments
ordered by length, so that a block's segments are alike and its loop, which
runs to the longest of them, idles few lanes.

It serves the deterministic backward (bit-identical run to run, as
``torch.use_deterministic_algorithms(True)`` asks), the dense gradient of a
half-precision table (each touched row's float32 sum written once into the
zeroed gradient in the table's dtype: no float32 copy of the whole table to
zero and cast), sparse gradients (the touched rows and their values are
exactly a coalesced COO tensor) and the fused optimizers (which need each
row's whole gradient before updating it).
"""

import torch
import triton
import triton.language as tl

from ..constants import accumulation_dtype
from .launch import launch
from .lookup import accumulator, aligned, alignment_args

# Segments a program sums at once, and the most columns it takes.  Each
# segment's terms are added one after another in the order of its entries,
# whatever the tiling: the bits of a sum do not depend on these.  Typical
# segments are short (1.4 entries at 131,072 row-touches over 200,000 rows),
# so a block of segments, not a block of one segment's entries, fills a tile.
SEGMENT_BLOCK_S = 32
SEGMENT_BLOCK_D = 64
# float64 sums take two registers an element: half the segments.
SEGMENT_BLOCK_S_WIDE = 16


@triton.jit
def segment_sums(
    SEGMENTS, SOURCES, SCALES, GRAD, offs_s, mask_s, offs_d, mask_d, dim, HAS_SCALE: tl.constexpr, ACC: tl.constexpr
):
    """The ``(BLOCK_S, BLOCK_D)`` sums of the segments ``offs_s`` (a
    ``(BLOCK_S, 1)`` block) on the columns ``offs_d`` (``(1, BLOCK_D)``), in
    ``ACC``: each segment's entries added in order.  Two-dimensional
    throughout, as the lookups' ids: Triton 3.6 failed to compile a gather
    masked by a one-dimensional block of segments (RemoveLayoutConversions)."""
    start = tl.load(SEGMENTS + offs_s, mask=mask_s, other=0)
    length = tl.load(SEGMENTS + offs_s + 1, mask=mask_s, other=0) - start
    acc = tl.zeros((offs_s.shape[0], offs_d.shape[1]), dtype=ACC)
    for j in range(0, tl.max(length)):
        live = j < length
        entry = start + j
        sources = tl.load(SOURCES + entry, mask=live, other=0)
        grad = tl.load(GRAD + sources * dim + offs_d, mask=live & mask_d, other=0.0).to(ACC)
        if HAS_SCALE:
            grad *= tl.load(SCALES + entry, mask=live, other=0.0).to(ACC)
        acc += grad
    return acc


@triton.jit
def _bloom_segment_sum_kernel(
    ORDER,  # (u,) int64 the segments by length: program p sums ORDER[p * BLOCK_S:(p + 1) * BLOCK_S]
    SEGMENTS,  # (u + 1,) int64: entries SEGMENTS[r]:SEGMENTS[r + 1] belong to unique row r
    SOURCES,  # (m,) int64 row of GRAD each entry adds, sorted by destination row
    SCALES,  # (m,) float scale of each entry, read only when HAS_SCALE
    GRAD,  # (s, dim) per-source gradients, contiguous
    ROWS,  # (u,) int64 the unique rows, read only when DENSE
    OUT,  # (u, dim) ACC per-unique-row sums; with DENSE the (num_rows, dim) gradient
    u,  # unique rows
    dim,  # embedding_dim
    HAS_SCALE: tl.constexpr,
    DENSE: tl.constexpr,  # write row r's sum into OUT[ROWS[r]] in OUT's dtype
    ACC: tl.constexpr,  # float32 (float64 for float64 gradients)
    ROW_ALIGN: tl.constexpr,  # dim is a multiple of it (lookup.alignment_args)
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dim = aligned(dim, ROW_ALIGN)
    offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    mask_s = offs_s < u
    mask_d = offs_d < dim
    segs = tl.load(ORDER + offs_s, mask=mask_s, other=0)
    acc = segment_sums(SEGMENTS, SOURCES, SCALES, GRAD, segs, mask_s, offs_d, mask_d, dim, HAS_SCALE, ACC)
    dest = segs
    if DENSE:
        dest = tl.load(ROWS + segs, mask=mask_s, other=0)
    tl.store(OUT + dest * dim + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_s & mask_d)


def segment_config(dim, acc_dtype):
    """The segment kernels' fixed tiling: ``BLOCK_S`` segments x ``BLOCK_D`` columns."""
    block_s = SEGMENT_BLOCK_S_WIDE if acc_dtype == torch.float64 else SEGMENT_BLOCK_S
    return {
        "kwargs": {"BLOCK_S": block_s, "BLOCK_D": min(SEGMENT_BLOCK_D, max(16, triton.next_power_of_2(dim)))},
        "num_warps": 4,
        "num_stages": 1,
    }


def sorted_entries(rows, sources, scales=None, keep=None):
    """The entries sorted by row: ``(unique_rows, segments, sources, scales,
    order)`` (``scales`` ``None`` without them; ``order`` the segments by
    length), as the segment kernels take them."""
    k = rows.shape[1]
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
    segments = torch.zeros(unique_rows.numel() + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=segments[1:])
    sorted_scales = flat_scales[order].contiguous() if flat_scales is not None else None
    by_length = torch.sort(counts, stable=True).indices
    return unique_rows, segments, flat_sources[order].contiguous(), sorted_scales, by_length


def bloom_row_gradients(rows, sources, grad, *, scales=None, keep=None, dense=None):
    """Sum ``grad[sources[i]] * scales[i]`` into each of ``rows[i, :]``, per row.

    Args:
        rows (Tensor): ``(n, k)`` int64 rows each entry adds to.
        sources (Tensor): ``(n,)`` int64 row of ``grad`` each entry adds.
        grad (Tensor): ``(s, dim)`` gradients.
        scales (Tensor, optional): ``(n,)`` factors of the entries (per-sample
            weights, 1/count), or ``(n, k)`` factors of each of their rows.
        keep (Tensor, optional): ``(n,)`` bool; entries that are ``False``
            (padding) add nothing and touch no row.
        dense (Tensor, optional): a zeroed ``(num_rows, dim)`` gradient: each
            touched row's sum is written into it, cast once to its dtype,
            instead of into a ``(u, dim)`` tensor of sums.

    Returns:
        ``(unique_rows, values)``: the sorted ``(u,)`` int64 rows that some
        entry touches and their ``(u, dim)`` summed gradients, float32
        (float64 when ``grad`` is float64); with ``dense``, ``values`` is
        ``dense``.  Deterministic: each row's terms are added one after
        another in the order of the entries, in float32 (float64).
    """
    dim = grad.shape[1]
    grad = grad.contiguous()
    unique_rows, segments, sorted_sources, sorted_scales, by_length = sorted_entries(rows, sources, scales, keep)
    acc_dtype = accumulation_dtype(grad.dtype)
    u = unique_rows.numel()
    values = dense if dense is not None else torch.empty((u, dim), dtype=acc_dtype, device=grad.device)
    if u and dim:
        args = dict(
            ORDER=by_length,
            SEGMENTS=segments,
            SOURCES=sorted_sources,
            SCALES=sorted_scales if sorted_scales is not None else segments,
            GRAD=grad,
            ROWS=unique_rows if dense is not None else segments,
            OUT=values,
            u=u,
            dim=dim,
            HAS_SCALE=sorted_scales is not None,
            DENSE=dense is not None,
            ACC=accumulator(grad.dtype),
            # GRAD and OUT are both contiguous (u or s, dim) rows: GRAD's
            # elements set the vector width the gathers can use.
            **alignment_args(grad, dim),
        )
        launch(
            _bloom_segment_sum_kernel,
            lambda meta: (triton.cdiv(u, meta["BLOCK_S"]), triton.cdiv(dim, meta["BLOCK_D"])),
            args,
            grad.device,
            config=segment_config(dim, acc_dtype),
        )
    return unique_rows, values
