"""The pieces every lookup kernel shares, written once: reading a block of
ids, hashing what their ``k`` rows have in common, gathering and summing the
rows, and scattering a gradient into them.

Ids come as a 2-D block: ``(BLOCK_N, 1)`` when each id owns a row of the
tile (forward, backward, bags), ``(BLOCK_N, BLOCK_D)`` when each column has
an id of its own (the max-pooled bag's backward, where each column's
gradient goes to the id that won it).  Row offsets then broadcast against
the ``(1, BLOCK_D)`` columns in both cases.

Rows are read and written a vector at a time (up to 16 bytes a thread) at
any dim: the launchers pass ``ROW_ALIGN`` (:func:`alignment_args`), and the
kernels rewrite ``dim`` and the row stride with :func:`aligned` before any
offset is built from them.

The ``k`` hash functions run as a loop, not unrolled: unrolled, the
compiler hoists all ``k`` row gathers to overlap them, and at ``k = 24``
that keeps 24 tiles alive at once, which spills registers even at the
smallest tiles (``bench/results/kernels_sm90.md``).
"""

import math

import torch
import triton
import triton.language as tl

from ..constants import accumulation_dtype
from .hashing import bloom_rows, importance_row, premix_ids, row_factor


def accumulator(dtype):
    """The ``ACC`` constexpr of a table of ``dtype`` (``accumulation_dtype``'s rule)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[accumulation_dtype(dtype)]


def hashing_args(table, *, num_hash_functions, wide_ids, signed, importance, hot, absent):
    """The arguments that every lookup kernel takes alike: the table with its
    row stride and its shared rows' count (the hash's modulus: the table's
    rows less the ``H`` private rows at its end), and the hashing and its
    variants.  ``hot`` holds the sorted ids that own the private rows.
    ``absent`` stands in for a tensor that is not given (never read then)."""
    hot_count = hot.numel() if hot is not None else 0
    return dict(
        W=table,
        stride_w=table.stride(0),
        num_rows=table.shape[0] - hot_count,
        HOT=hot if hot is not None else absent,
        hot_count=hot_count,
        # A binary search over H sorted ids settles in bit_length(H) halvings,
        # unrolled: one specialization per power of two of H.
        HOT_STEPS=hot_count.bit_length(),
        HAS_HOT=hot is not None,
        IMPORTANCE=importance.contiguous() if importance is not None else absent,
        importance_rows=importance.shape[0] if importance is not None else 1,
        K=num_hash_functions,
        SIGNED=signed,
        HAS_IMPORTANCE=importance is not None,
        WIDE_IDS=wide_ids,
    )


def id_args(ids, rows, num_hash_functions):
    """``IDS`` flattened and contiguous, and ``ROWS``: the hash cache's rows
    as ``(n, K)``, or the ids again when there is no cache (never read then),
    with ``PRECOMPUTED``."""
    ids = ids.reshape(-1).contiguous()  # a strided 1-D view reshapes to itself
    if rows is None:
        return dict(IDS=ids, ROWS=ids, PRECOMPUTED=False)
    return dict(IDS=ids, ROWS=rows.reshape(ids.numel(), num_hash_functions).contiguous(), PRECOMPUTED=True)


def row_contiguous(table):
    """``table`` with contiguous rows, which the kernels' row offsets assume."""
    return table if table.stride(1) == 1 else table.contiguous()


def alignment_args(table, dim):
    """``ROW_ALIGN``, the row alignment that the kernels can use but Triton
    cannot see: the largest power of two, up to one 16-byte vector of
    ``table``'s elements, that divides both ``dim`` (the row length of the
    contiguous operands: the output, its gradient, the accumulator) and
    ``table``'s row stride.

    Triton specializes an integer argument on divisibility by 16 only, so a
    row of 100 floats, 16-byte aligned like every row of the table, reads
    one element an instruction unless the kernel is told (:func:`aligned`).
    It is 1 when both are multiples of 16, which Triton proves by itself:
    those dims compile as before, and ``ROW_ALIGN`` adds a specialization
    only at the other dims, at most one per power of two of their alignment.
    The base pointers need nothing: Triton checks their 16-byte alignment
    at each launch."""
    stride = table.stride(0)
    if dim % 16 == 0 and stride % 16 == 0:
        return dict(ROW_ALIGN=1)
    # The gcd with a power of two is the widest power of two dividing both
    # (a zero stride, from an expanded table, allows any width).
    return dict(ROW_ALIGN=math.gcd(dim, stride, max(1, 16 // table.element_size())))


def padding_args(padding_idx):
    """``padding_idx`` and ``HAS_PADDING`` as the kernels take them."""
    return dict(padding_idx=-1 if padding_idx is None else padding_idx, HAS_PADDING=padding_idx is not None)


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """``x``, a multiple of ``ALIGN`` (:func:`alignment_args`), written so that
    the compiler knows it: row offsets and the column mask built from it then
    keep runs of ``ALIGN`` elements, which load as one vector.
    (``tl.multiple_of`` leaves a scalar argument without the hint.)"""
    if ALIGN > 1:
        x = x // ALIGN * ALIGN
    return x


@triton.jit
def load_ids(IDS, offs, mask, padding_idx, HAS_PADDING: tl.constexpr):
    """The int64 ids at ``offs`` and which of them take part: in range and,
    with ``HAS_PADDING``, not ``padding_idx``."""
    ids = tl.load(IDS + offs, mask=mask, other=0).to(tl.int64)
    live = mask
    if HAS_PADDING:
        live = live & (ids != padding_idx)
    return ids, live


@triton.jit
def hot_positions(ids, HOT, hot_count, HOT_STEPS: tl.constexpr):
    """Each id's int32 position in the sorted ``(hot_count,)`` hot ids, or -1
    for an id that is not hot: a lower-bound binary search, so the hot set
    costs memory in its own size only.  Its private row is ``num_rows`` plus
    the position; int32 here keeps a register per id free for the callers."""
    lo = tl.zeros(ids.shape, tl.int32)
    hi = tl.full(ids.shape, 0, tl.int32) + hot_count
    # Unrolled: a loop with a data-dependent trip count nested in the bags'
    # loop over ids made Triton 3.6's ptxas spill.
    for _ in tl.static_range(HOT_STEPS):
        open_range = lo < hi
        mid = (lo + hi) >> 1  # both non-negative
        below = tl.load(HOT + mid, mask=open_range, other=0).to(tl.int64) < ids
        lo = tl.where(open_range & below, mid + 1, lo)
        hi = tl.where(open_range & ~below, mid, hi)
    found = (lo < hot_count) & (tl.load(HOT + lo, mask=lo < hot_count, other=-1).to(tl.int64) == ids)
    return tl.where(found, lo, -1)


@triton.jit
def id_hashes(
    ids,
    SEEDS,
    importance_rows,
    HOT,
    hot_count,
    HOT_STEPS: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
):
    """What the ``k`` rows of each id share: its premixed murmur blocks, the
    row of the importance table it reads (the ids themselves without
    importance weights: unused then) and, with ``HAS_HOT``, its position
    among the hot ids (-1 for ids that hash; the ids again without hot rows:
    unused then)."""
    mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
    imp_rows = ids
    if HAS_IMPORTANCE:
        imp_rows = importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS)
    hot = ids
    if HAS_HOT:
        hot = hot_positions(ids, HOT, hot_count, HOT_STEPS)
    return mixed_lo, mixed_hi, imp_rows, hot


@triton.jit
def row_index(
    ids,
    live,
    mixed_lo,
    mixed_hi,
    hot,
    ROWS,
    offs_n,
    SEEDS,
    j,
    num_rows,
    mask,
    K: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
):
    """Row ``j`` of each id, hashed or read from the ``(n, K)`` hash cache,
    and the part of ``mask`` that reads it: a hot id reads its private row
    once, at ``j = 0``, and nothing at the other ``j``."""
    if PRECOMPUTED:
        rows = tl.load(ROWS + offs_n * K + j, mask=live, other=0).to(tl.int64)
    else:
        rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
    if HAS_HOT:
        rows = tl.where(hot >= 0, num_rows + hot.to(tl.int64), rows)
        # A branch on j (uniform across the block): a select in every
        # iteration, or the hot ids handled apart after the loop, made
        # ptxas spill in more of the bag kernels' specializations.
        if K > 1:
            if j > 0:
                mask = mask & (hot < 0)
    return rows, mask


@triton.jit
def variant_factor(
    ids,
    mixed_lo,
    mixed_hi,
    hot,
    SEEDS,
    IMPORTANCE,
    imp_rows,
    live,
    j,
    K: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
):
    """``row_factor``'s ``(sign, factor)``: ``(1, 1)`` for a hot id's private row."""
    hashed = live
    if HAS_HOT:
        hashed = live & (hot < 0)
    return row_factor(
        ids, mixed_lo, mixed_hi, SEEDS, IMPORTANCE, imp_rows, hashed, j, K, SIGNED, HAS_IMPORTANCE, WIDE_IDS, HAS_HOT
    )


@triton.jit
def pair_rows(
    offs_n,
    j,
    in_bag,
    IDS,
    SEEDS,
    IMPORTANCE,
    HOT,
    num_rows,
    importance_rows,
    hot_count,
    padding_idx,
    K: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    HOT_STEPS: tl.constexpr,
    WIDE_IDS: tl.constexpr,
):
    """The rows of the (id, hash function) pairs ``(offs_n, j)`` (positions
    in ``IDS``, int32 hash functions), one pair a thread: ``(rows, row_live,
    live, factor)``, where ``row_live`` says which pairs read a row (a hot id
    reads its private row once, as its first pair), ``live`` which ids take
    part (in ``in_bag``, not padding), and ``factor`` is each pair's sign
    times importance weight (float32; 1 without them)."""
    ids, live = load_ids(IDS, offs_n, in_bag, padding_idx, HAS_PADDING)
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j, mask=live, other=0), num_rows, WIDE_IDS)
    row_live = live
    if HAS_HOT:
        rows = tl.where(hot >= 0, num_rows + hot.to(tl.int64), rows)
        row_live = live & ((j == 0) | (hot < 0))
    factor = tl.full(ids.shape, 1.0, tl.float32)
    if SIGNED or HAS_IMPORTANCE:
        _, factor = variant_factor(
            ids,
            mixed_lo,
            mixed_hi,
            hot,
            SEEDS,
            IMPORTANCE,
            imp_rows,
            live,
            j,
            K,
            SIGNED,
            HAS_IMPORTANCE,
            HAS_HOT,
            WIDE_IDS,
        )
    return rows, row_live, live, factor


@triton.jit
def gather_sum(
    ids,
    live,
    mixed_lo,
    mixed_hi,
    imp_rows,
    hot,
    ROWS,
    offs_n,
    SEEDS,
    W,
    IMPORTANCE,
    offs_d,
    mask,
    num_rows,
    stride_w,
    K: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Each id's vector on the columns ``offs_d``: the sum of its ``K`` rows
    of ``W``, each times its sign and importance weight (a hot id: its
    private row), in ``ACC``; zero where ``mask`` is off."""
    acc = tl.zeros(mask.shape, dtype=ACC)
    for j in range(K):
        rows, row_mask = row_index(
            ids,
            live,
            mixed_lo,
            mixed_hi,
            hot,
            ROWS,
            offs_n,
            SEEDS,
            j,
            num_rows,
            mask,
            K,
            PRECOMPUTED,
            HAS_HOT,
            WIDE_IDS,
        )
        vals = tl.load(W + rows * stride_w + offs_d, mask=row_mask, other=0.0).to(ACC)
        if SIGNED or HAS_IMPORTANCE:
            _, factor = variant_factor(
                ids,
                mixed_lo,
                mixed_hi,
                hot,
                SEEDS,
                IMPORTANCE,
                imp_rows,
                live,
                j,
                K,
                SIGNED,
                HAS_IMPORTANCE,
                HAS_HOT,
                WIDE_IDS,
            )
            vals = vals * factor.to(ACC)
        acc += vals
    return acc


@triton.jit
def scatter_sum(
    contrib,
    ids,
    live,
    mixed_lo,
    mixed_hi,
    imp_rows,
    hot,
    ROWS,
    offs_n,
    SEEDS,
    W,
    IMPORTANCE,
    GRAD_W,
    GRAD_IMPORTANCE,
    offs_d,
    mask,
    dim,
    num_rows,
    stride_w,
    K: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    IDS_PER_COLUMN: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Add ``contrib`` (each id's gradient on the columns ``offs_d``) into
    the ``K`` rows of each id, times the row's sign and importance weight
    (a hot id: into its private row), and the importance weights' gradient
    ``sign * <contrib, W[row]>`` into ``GRAD_IMPORTANCE``.  With ``GATHER``,
    also returns the ids' vectors (as :func:`gather_sum` would), for the
    per-sample weights' gradient; the rows are read once for both.
    """
    vectors = tl.zeros(mask.shape, dtype=contrib.dtype)
    for j in range(K):
        rows, row_mask = row_index(
            ids,
            live,
            mixed_lo,
            mixed_hi,
            hot,
            ROWS,
            offs_n,
            SEEDS,
            j,
            num_rows,
            mask,
            K,
            PRECOMPUTED,
            HAS_HOT,
            WIDE_IDS,
        )
        row_contrib = contrib
        factor = tl.full(ids.shape, 1.0, tl.float32)
        if SIGNED or HAS_IMPORTANCE:
            sign, factor = variant_factor(
                ids,
                mixed_lo,
                mixed_hi,
                hot,
                SEEDS,
                IMPORTANCE,
                imp_rows,
                live,
                j,
                K,
                SIGNED,
                HAS_IMPORTANCE,
                HAS_HOT,
                WIDE_IDS,
            )
            row_contrib = contrib * factor.to(contrib.dtype)
        # Relaxed: the adds commute, and nothing reads GRAD_W until the kernel ends.
        tl.atomic_add(GRAD_W + rows * dim + offs_d, row_contrib, mask=row_mask, sem="relaxed")
        if GATHER or HAS_IMPORTANCE:
            vals = tl.load(W + rows * stride_w + offs_d, mask=row_mask, other=0.0).to(contrib.dtype)
            if GATHER:
                vectors += vals * factor.to(contrib.dtype)
            if HAS_IMPORTANCE:
                # d out / d importance[r, j] = sign * <contrib, W[row_j]>.
                partial = contrib * vals
                if not IDS_PER_COLUMN:
                    # One id per tile row: its partial sum over this block of columns.
                    partial = tl.sum(partial, axis=1, keep_dims=True)
                imp_live = live
                if HAS_HOT:
                    # A hot id reads no importance weight.
                    imp_live = live & (hot < 0)
                tl.atomic_add(
                    GRAD_IMPORTANCE + imp_rows * K + j, partial * sign.to(contrib.dtype), mask=imp_live, sem="relaxed"
                )
    return vectors
