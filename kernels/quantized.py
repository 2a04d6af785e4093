"""Lookups of quantized Bloom tables: hash, gather the ``k`` rows of int8 or
int4 codes, dequantise them in registers, sum (and pool, for bags) in
float32, write once.

The table comes in two arrays (see ``triton_bloom/quantized_ops.py``):

- ``CODES``: ``(rows, row_bytes)`` uint8, ``row_bytes`` a multiple of 16, so
  every row starts 16-byte aligned and Triton, which sees a row stride
  divisible by 16, gathers a row with 128-bit loads.  int4 packs two columns
  a byte: column ``2c`` in the low nibble of byte ``c``, ``2c + 1`` in the
  high one.
- ``SCALE_CODES``: ``(rows,)`` uint8, each row's scale code ``e`` on the
  table's grid ``GRID = (lo, step)`` (float32): the scale is
  ``2 ** (lo + (e - 1) * step)``, 0 for ``e = 0`` (one byte loaded and one
  ``exp2`` per gathered row).
- ``COLUMN_OFFSET``: ``(dim,)`` float32, the table's mean row, loaded once
  per program; a value is ``(u - (2**BITS - 1) / 2) * scale + offset``.

The hashing and its variants (signs, importance weights, hot rows) are
``kernels/lookup.py``'s, shared with the float kernels.
"""

import torch
import triton
import triton.language as tl

from .. import constants
from .launch import launch
from .lookup import hashing_args, id_hashes, load_ids, padding_args, row_index, variant_factor

MODE_MEAN = tl.constexpr(constants.MODE_MEAN)
MODE_MAX = tl.constexpr(constants.MODE_MAX)


@triton.jit
def _dequantized(
    CODES, SCALE_CODES, lo, step, column_offset, rows, row_live, offs_b, mask_b, row_bytes, BITS: tl.constexpr
):
    """The float32 values of ``rows`` on the byte block ``offs_b``: a
    ``(BLOCK_N, BLOCK_B)`` tile for int8, ``(BLOCK_N, 2 * BLOCK_B)`` for int4
    (each byte's two nibbles side by side); ``column_offset`` is the block's
    ``(1, COLS)`` offsets.  Rows outside ``row_live`` are 0."""
    code = tl.load(SCALE_CODES + rows, mask=row_live, other=0).to(tl.float32)
    scale = tl.where(code > 0, tl.exp2(lo + (code - 1.0) * step), 0.0)
    # Levels symmetric around the offset: u * scale + (offset - centre * scale).
    shift = tl.where(row_live, column_offset, 0.0) - ((1 << BITS) - 1) * 0.5 * scale
    codes = tl.load(CODES + rows * row_bytes + offs_b, mask=row_live & mask_b, other=0)
    if BITS == 8:
        vals = codes.to(tl.float32) * scale + shift
    else:
        low = (codes & 15).to(tl.float32) * scale
        high = (codes >> 4).to(tl.float32) * scale
        vals = tl.interleave(low, high) + shift
    return vals


@triton.jit
def _quantized_sum(
    ids,
    live,
    mixed_lo,
    mixed_hi,
    imp_rows,
    hot,
    offs_n,
    SEEDS,
    CODES,
    SCALE_CODES,
    lo,
    step,
    column_offset,
    IMPORTANCE,
    offs_b,
    mask_b,
    num_rows,
    row_bytes,
    K: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BITS: tl.constexpr,
    COLS: tl.constexpr,
):
    """Each live id's vector, ``(BLOCK_N, COLS)`` float32: the sum of its ``K``
    dequantised rows times their signs and importance weights (a hot id: its
    private row alone)."""
    acc = tl.zeros((ids.shape[0], COLS), dtype=tl.float32)
    for j in range(K):
        rows, row_live = row_index(
            ids, live, mixed_lo, mixed_hi, hot, ids, offs_n, SEEDS, j, num_rows, live, K, False, HAS_HOT, WIDE_IDS
        )
        vals = _dequantized(
            CODES, SCALE_CODES, lo, step, column_offset, rows, row_live, offs_b, mask_b, row_bytes, BITS
        )
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
            vals = vals * factor.to(tl.float32)
        acc += vals
    return acc


@triton.jit
def _quantized_forward_kernel(
    IDS,  # (n,) int32/int64 ids
    SEEDS,  # (49,) int32 seeds: rows, signs, importance
    CODES,  # (rows, row_bytes) uint8 codes
    SCALE_CODES,  # (rows,) uint8 scale codes
    GRID,  # (2,) float32: the scale grid's lo and step
    COLUMN_OFFSET,  # (dim,) float32
    IMPORTANCE,  # (importance_rows, K) float32, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted hot ids, read only when HAS_HOT
    OUT,  # (n, dim) float32
    n,
    dim,
    num_rows,  # shared rows: the hash's modulus
    row_bytes,  # bytes between two rows of CODES
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
    BITS: tl.constexpr,  # 8 or 4
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,  # bytes of a row per program; BLOCK_B * 8 // BITS columns
):
    COLS: tl.constexpr = BLOCK_B * (8 // BITS)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
    offs_c = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
    lo = tl.load(GRID)
    step = tl.load(GRID + 1)
    column_offset = tl.load(COLUMN_OFFSET + offs_c, mask=offs_c < dim, other=0.0)
    ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    acc = _quantized_sum(
        ids,
        live,
        mixed_lo,
        mixed_hi,
        imp_rows,
        hot,
        offs_n,
        SEEDS,
        CODES,
        SCALE_CODES,
        lo,
        step,
        column_offset,
        IMPORTANCE,
        offs_b,
        offs_b < row_bytes,
        num_rows,
        row_bytes,
        K,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        WIDE_IDS,
        BITS,
        COLS,
    )
    tl.store(OUT + offs_n * dim + offs_c, acc, mask=(offs_n < n) & (offs_c < dim))


@triton.jit
def _quantized_bag_kernel(
    IDS,  # (n,) int32/int64 ids, bag after bag
    OFFSETS,  # (B + 1,) int64 bag boundaries
    PSW,  # (n,) float32 per-sample weights, read only when HAS_PSW
    SEEDS,
    CODES,
    SCALE_CODES,
    GRID,
    COLUMN_OFFSET,
    IMPORTANCE,
    HOT,
    OUT,  # (B, dim) float32
    dim,
    num_rows,
    row_bytes,
    importance_rows,
    hot_count,
    padding_idx,
    K: tl.constexpr,
    MODE: tl.constexpr,
    HAS_PSW: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    HOT_STEPS: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    COLS: tl.constexpr = BLOCK_B * (8 // BITS)
    bag = tl.program_id(0).to(tl.int64)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
    offs_c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    lo = tl.load(GRID)
    step = tl.load(GRID + 1)
    column_offset = tl.load(COLUMN_OFFSET + offs_c[None, :], mask=offs_c[None, :] < dim, other=0.0)
    start = tl.load(OFFSETS + bag)
    end = tl.load(OFFSETS + bag + 1)
    acc = tl.zeros((COLS,), dtype=tl.float32)
    best = tl.full((COLS,), float("-inf"), dtype=tl.float32)
    live_count = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)[:, None]
        ids, live = load_ids(IDS, offs_n, offs_n < end, padding_idx, HAS_PADDING)
        mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
            ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
        )
        vectors = _quantized_sum(
            ids,
            live,
            mixed_lo,
            mixed_hi,
            imp_rows,
            hot,
            offs_n,
            SEEDS,
            CODES,
            SCALE_CODES,
            lo,
            step,
            column_offset,
            IMPORTANCE,
            offs_b,
            offs_b < row_bytes,
            num_rows,
            row_bytes,
            K,
            SIGNED,
            HAS_IMPORTANCE,
            HAS_HOT,
            WIDE_IDS,
            BITS,
            COLS,
        )
        if MODE == MODE_MAX:
            best = tl.maximum(best, tl.max(tl.where(live, vectors, float("-inf")), axis=0))
        else:
            weights = live.to(tl.float32)
            if HAS_PSW:
                weights *= tl.load(PSW + offs_n, mask=live, other=0.0).to(tl.float32)
            acc += tl.sum(vectors * weights, axis=0)
        live_count += live.to(tl.float32)
    count = tl.sum(live_count)
    if MODE == MODE_MAX:
        # A bag with no live id pools to zeros, as in nn.EmbeddingBag.
        acc = tl.where(count > 0, best, 0.0)
    if MODE == MODE_MEAN:
        acc = acc / tl.maximum(count, 1.0)
    tl.store(OUT + bag * dim + offs_c, acc, mask=offs_c < dim)


def used_bytes(dim, bits):
    """Bytes of a row that hold codes (the rest of ``row_bytes`` is padding)."""
    return -(-dim * bits // 8)


def tile(dim, bits):
    """``(BLOCK_N, BLOCK_B)`` of a table of ``dim`` columns at ``bits``: as
    many of a row's bytes as give at most 128 columns, at least 16 bytes, and
    as many ids as give each of the 128 threads (4 warps) 16 bytes of codes
    at int8 (one 128-bit load a row) and 8 at int4 (a 64-bit load, whose 16
    columns keep the accumulators at 16 a thread, as in the float kernels)."""
    block_b = max(16, min(triton.next_power_of_2(used_bytes(dim, bits)), 128 * bits // 8))
    per_thread = 16 if bits == 8 else 8
    return max(16, min(64, per_thread * 128 // block_b)), block_b


def _common_args(ids, table, seeds, *, bits, dim, num_hash_functions, wide_ids, signed, importance, hot):
    codes, scale_codes, scale_grid, column_offset = table
    args = dict(
        IDS=ids.reshape(-1).contiguous(),
        SEEDS=seeds,
        CODES=codes,
        SCALE_CODES=scale_codes,
        GRID=scale_grid,
        COLUMN_OFFSET=column_offset,
        dim=dim,
        row_bytes=codes.shape[1],
        BITS=bits,
        **hashing_args(
            codes,
            num_hash_functions=num_hash_functions,
            wide_ids=wide_ids,
            signed=signed,
            importance=importance,
            hot=hot,
            absent=codes,
        ),
    )
    # hashing_args names the table W and its stride: these kernels take CODES and row_bytes.
    del args["W"], args["stride_w"]
    return args


def quantized_forward(
    ids,
    codes,
    scale_codes,
    scale_grid,
    column_offset,
    seeds,
    *,
    bits,
    dim,
    num_hash_functions,
    padding_idx,
    wide_ids,
    signed,
    importance,
    hot,
):
    """The ``(*, dim)`` float32 sums of the dequantised ``k`` rows of every id.

    Args:
        ids (Tensor): int32/int64 ids, any shape, validated by the caller.
        codes (Tensor): ``(rows, row_bytes)`` uint8, ``row_bytes`` a multiple of 16.
        scale_codes (Tensor): ``(rows,)`` uint8 scale codes.
        scale_grid (Tensor): ``(2,)`` float32 ``lo`` and ``step`` of the scales.
        column_offset (Tensor): ``(dim,)`` float32 offsets.
        seeds (Tensor): int32 seeds on the table's device.
        bits (int): 8 or 4.
        dim (int): columns of the table.
        num_hash_functions, padding_idx, wide_ids, signed, importance, hot:
            as in ``bloom_forward`` (``importance`` float32).
    """
    out = torch.empty((*ids.shape, dim), dtype=torch.float32, device=codes.device)
    n = ids.numel()
    if n == 0:
        return out
    args = _common_args(
        ids,
        (codes, scale_codes, scale_grid, column_offset),
        seeds,
        bits=bits,
        dim=dim,
        num_hash_functions=num_hash_functions,
        wide_ids=wide_ids,
        signed=signed,
        importance=importance,
        hot=hot,
    )
    args.update(OUT=out, n=n, **padding_args(padding_idx))
    block_n, block_b = tile(dim, bits)

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(used_bytes(dim, bits), meta_["BLOCK_B"]))

    config = {"kwargs": {"BLOCK_N": block_n, "BLOCK_B": block_b}, "num_warps": 4, "num_stages": None}
    launch(_quantized_forward_kernel, grid, args, codes.device, config=config)
    return out


def quantized_bag_forward(
    ids,
    offsets,
    codes,
    scale_codes,
    scale_grid,
    column_offset,
    seeds,
    *,
    bits,
    dim,
    mode,
    per_sample_weights,
    num_hash_functions,
    padding_idx,
    wide_ids,
    signed,
    importance,
    hot,
):
    """The ``(B, dim)`` float32 pooled bags (``mode`` a code from
    ``constants``) of dequantised Bloom vectors; empty bags give zeros.
    ``offsets`` are the ``(B + 1,)`` int64 boundaries ending at ``n``; the
    rest is :func:`quantized_forward`'s."""
    num_bags = offsets.numel() - 1
    out = torch.empty((num_bags, dim), dtype=torch.float32, device=codes.device)
    if num_bags == 0:
        return out
    args = _common_args(
        ids,
        (codes, scale_codes, scale_grid, column_offset),
        seeds,
        bits=bits,
        dim=dim,
        num_hash_functions=num_hash_functions,
        wide_ids=wide_ids,
        signed=signed,
        importance=importance,
        hot=hot,
    )
    args.update(
        OFFSETS=offsets.contiguous(),
        PSW=per_sample_weights.contiguous() if per_sample_weights is not None else codes,
        OUT=out,
        MODE=mode,
        HAS_PSW=per_sample_weights is not None,
        **padding_args(padding_idx),
    )
    block_n, block_b = tile(dim, bits)

    def grid(meta_):
        return (num_bags, triton.cdiv(used_bytes(dim, bits), meta_["BLOCK_B"]))

    config = {"kwargs": {"BLOCK_N": block_n, "BLOCK_B": block_b}, "num_warps": 4, "num_stages": None}
    launch(_quantized_bag_kernel, grid, args, codes.device, config=config)
    return out
