"""Lookups of quantized Bloom tables: hash, gather the ``k`` rows of int8 or
int4 codes, dequantise them in registers, sum (and pool, for bags) in
float32, write once.

The table comes in two arrays (see ``triton_bloom/quantized_ops.py``):

- ``codes``: ``(rows, row_bytes)`` uint8, ``row_bytes`` a multiple of 16, so
  every row starts 16-byte aligned.  int4 packs two columns a byte: column
  ``2c`` in the low nibble of byte ``c``, ``2c + 1`` in the high one.  The
  kernels read it as ``(rows, row_bytes // 4)`` int32 words (``CODES``,
  gathered with 128-bit loads): a word's code ``s`` is column
  ``(32 // BITS) * word + s`` for both widths.
- ``SCALE_CODES``: ``(rows,)`` uint8, each row's scale code ``e`` on the
  table's grid ``GRID = (lo, step)`` (float32): the scale is
  ``2 ** (lo + (e - 1) * step)``, 0 for ``e = 0`` (one byte loaded and one
  ``exp2`` per gathered row).
- ``COLUMN_OFFSET``: ``(dim,)`` float32, the table's mean row, loaded once
  per program; a value is ``(u - (2**BITS - 1) / 2) * scale + offset``.

A sum of rows is therefore ``sum(u * w)`` (``w``: the row's scale times its
sign, importance and per-sample weight), less ``centre * sum(w)``, plus the
offsets times the sum of the rows' factors: the loop over rows costs one
mask, one conversion and one fused multiply-add a code (:func:`_add_codes`),
the rest is done once.  The sum and mean bags take the float bags' tiling
(``bag_forward.py``): the tile's rows are (id, hash function) pairs, each
hashed by one thread (``lookup.pair_rows``), one warp a bag.

The hashing and its variants (signs, importance weights, hot rows) are
``kernels/lookup.py``'s, shared with the float kernels.
"""

import torch
import triton
import triton.language as tl

from .. import constants
from .launch import launch
from .lookup import aligned, hashing_args, id_hashes, load_ids, padding_args, pair_rows, row_index, variant_factor

MODE_MEAN = tl.constexpr(constants.MODE_MEAN)
MODE_MAX = tl.constexpr(constants.MODE_MAX)


@triton.jit
def _row_weight(SCALE_CODES, rows, row_live, factor, lo, step):
    """Each gathered row's scale times ``factor`` (its sign, importance and
    per-sample weight): one byte loaded and one ``exp2`` a row; 0 outside
    ``row_live``."""
    code = tl.load(SCALE_CODES + rows, mask=row_live, other=0).to(tl.float32)
    return tl.where(code > 0, tl.exp2(lo + (code - 1.0) * step), 0.0) * factor


@triton.jit
def _code(words, s: tl.constexpr, BITS: tl.constexpr):
    """Code ``s`` of each 32-bit word of codes (int8: byte ``s``; int4:
    nibble ``s``, column ``8 * word + s``) times ``2 ** (BITS * s)``, as
    float32: the code masked where it lies, one instruction, and converted,
    exactly (at most 8 significant bits).  Shifting it down first would
    cost a second instruction a code; the power of two is taken out once,
    from the sums (:func:`_centred`)."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << (BITS * s)
    if MASK >= 2**31:
        masked = words & (MASK - 2**32)
    else:
        masked = words & MASK
    return masked.to(tl.uint32, bitcast=True).to(tl.float32)


@triton.jit
def _add_codes(a0, a1, a2, a3, a4, a5, a6, a7, words, weight, BITS: tl.constexpr):
    """``a_s + code_s * weight`` for each code ``s`` of a tile of words of
    codes (``weight`` a column: one a row): one mask, one conversion and
    one fused multiply-add a code (int8 uses ``a0``-``a3``).  The level's
    centre and the column offsets are added once, after the sum."""
    a0 += _code(words, 0, BITS) * weight
    a1 += _code(words, 1, BITS) * weight
    a2 += _code(words, 2, BITS) * weight
    a3 += _code(words, 3, BITS) * weight
    if BITS == 4:
        a4 += _code(words, 4, BITS) * weight
        a5 += _code(words, 5, BITS) * weight
        a6 += _code(words, 6, BITS) * weight
        a7 += _code(words, 7, BITS) * weight
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _centred(acc, s: tl.constexpr, weight_sum, BITS: tl.constexpr):
    """A sum of codes ``s`` (times ``2 ** (BITS * s)``, :func:`_code`) less
    the levels' centre: each row is ``(u - centre) * scale + offset``, so a
    sum of rows times weights ``f`` is ``sum(u * f * scale) - centre *
    sum(f * scale) + offset * sum(f)``; ``weight_sum`` is ``sum(f * scale)``
    over the same rows (the two terms are large, their difference small:
    they are taken apart over the rows that one accumulator holds, not over
    a whole bag, which lost 1e-5 of a value of about 1 at int4)."""
    centre: tl.constexpr = ((1 << BITS) - 1) * 0.5
    return tl.fma(acc, 0.5 ** (BITS * s), -centre * weight_sum)


@triton.jit
def _joined(a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr):
    """The codes' columns in order along the last dimension: word ``w``'s
    code ``s`` is column ``(32 // BITS) * w + s``."""
    if BITS == 8:
        out = tl.interleave(tl.interleave(a0, a2), tl.interleave(a1, a3))
    else:
        even = tl.interleave(tl.interleave(a0, a4), tl.interleave(a2, a6))
        odd = tl.interleave(tl.interleave(a1, a5), tl.interleave(a3, a7))
        out = tl.interleave(even, odd)
    return out


@triton.jit
def _id_vectors(
    offs_n,
    in_range,
    IDS,
    SEEDS,
    CODES,
    SCALE_CODES,
    lo,
    step,
    offset,
    IMPORTANCE,
    HOT,
    offs_w,
    mask_w,
    num_rows,
    row_words,
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
    BITS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``(vectors, live)``: the float32 vectors of the ids at ``offs_n`` (a
    block of positions, one id a thread for the hashing), each the sum of
    its ``K`` dequantised rows times their signs and importance weights, on
    the columns of the words ``offs_w`` (``(BLOCK_N, COLS)``; ``offset``:
    those columns' ``(COLS,)`` offsets), and which ids are live.  A padding
    id sums no row (its vector comes out 0); a hot id its private row
    alone.  The lookup, the max-pooled bag and the scores
    (``kernels/scores.py``) all take their vectors from here."""
    ids, live = load_ids(IDS, offs_n, in_range, padding_idx, HAS_PADDING)
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    a0 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a1 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a2 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a3 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a4 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a5 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a6 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    a7 = tl.zeros((offs_n.shape[0], BLOCK_W), dtype=tl.float32)
    weight_sum = tl.zeros(offs_n.shape, dtype=tl.float32)
    factor_sum = tl.zeros(offs_n.shape, dtype=tl.float32)
    for j in range(K):
        rows, row_live = row_index(
            ids, live, mixed_lo, mixed_hi, hot, ids, offs_n, SEEDS, j, num_rows, live, K, False, HAS_HOT, WIDE_IDS
        )
        factor = tl.where(row_live, 1.0, 0.0)
        if SIGNED or HAS_IMPORTANCE:
            _, variant = variant_factor(
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
            factor = tl.where(row_live, variant.to(tl.float32), 0.0)
        weight = _row_weight(SCALE_CODES, rows, row_live, factor, lo, step)
        words = tl.load(
            CODES + rows[:, None] * row_words + offs_w[None, :], mask=row_live[:, None] & mask_w[None, :], other=0
        )
        a0, a1, a2, a3, a4, a5, a6, a7 = _add_codes(a0, a1, a2, a3, a4, a5, a6, a7, words, weight[:, None], BITS)
        weight_sum += weight
        factor_sum += factor
    ws = weight_sum[:, None]
    vectors = _joined(
        _centred(a0, 0, ws, BITS),
        _centred(a1, 1, ws, BITS),
        _centred(a2, 2, ws, BITS),
        _centred(a3, 3, ws, BITS),
        _centred(a4, 4, ws, BITS),
        _centred(a5, 5, ws, BITS),
        _centred(a6, 6, ws, BITS),
        _centred(a7, 7, ws, BITS),
        BITS,
    )
    return vectors + offset[None, :] * factor_sum[:, None], live


@triton.jit
def _quantized_forward_kernel(
    IDS,  # (n,) int32/int64 ids
    SEEDS,  # (49,) int32 seeds: rows, signs, importance
    CODES,  # (rows, row_words) int32: the uint8 codes, four to a word
    SCALE_CODES,  # (rows,) uint8 scale codes
    GRID,  # (2,) float32: the scale grid's lo and step
    COLUMN_OFFSET,  # (dim,) float32
    IMPORTANCE,  # (importance_rows, K) float32, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted hot ids, read only when HAS_HOT
    OUT,  # (n, dim) float32
    n,
    dim,
    num_rows,  # shared rows: the hash's modulus
    row_words,  # words between two rows of CODES, a multiple of 4 (16-byte rows)
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
    BLOCK_W: tl.constexpr,  # words of a row per program; BLOCK_W * 32 // BITS columns
):
    COLS: tl.constexpr = BLOCK_W * (32 // BITS)
    row_words = aligned(row_words, 4)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    offset = tl.load(COLUMN_OFFSET + offs_c, mask=offs_c < dim, other=0.0)
    vectors, _ = _id_vectors(
        offs_n,
        offs_n < n,
        IDS,
        SEEDS,
        CODES,
        SCALE_CODES,
        tl.load(GRID),
        tl.load(GRID + 1),
        offset,
        IMPORTANCE,
        HOT,
        offs_w,
        offs_w < row_words,
        num_rows,
        row_words,
        importance_rows,
        hot_count,
        padding_idx,
        K,
        HAS_PADDING,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        HOT_STEPS,
        WIDE_IDS,
        BITS,
        BLOCK_W,
    )
    tl.store(
        OUT + offs_n[:, None] * dim + offs_c[None, :], vectors, mask=(offs_n < n)[:, None] & (offs_c < dim)[None, :]
    )


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
    row_words,
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
    BLOCK_N: tl.constexpr,  # (id, hash function) pairs a step (ids a step for MODE_MAX)
    BLOCK_W: tl.constexpr,
):
    COLS: tl.constexpr = BLOCK_W * (32 // BITS)
    row_words = aligned(row_words, 2)
    bag = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    lo = tl.load(GRID)
    step = tl.load(GRID + 1)
    offset = tl.load(COLUMN_OFFSET + offs_c, mask=offs_c < dim, other=0.0)
    start = tl.load(OFFSETS + bag)
    end = tl.load(OFFSETS + bag + 1)
    lanes = tl.arange(0, BLOCK_N)
    if MODE == MODE_MAX:
        # An id's vector is the sum of its K rows: the rows of the tile are
        # ids, the K rows summed in a loop.
        best = tl.full((COLS,), float("-inf"), dtype=tl.float32)
        live_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first in range(start, end, BLOCK_N):
            offs_n = first + lanes
            vectors, live = _id_vectors(
                offs_n,
                offs_n < end,
                IDS,
                SEEDS,
                CODES,
                SCALE_CODES,
                lo,
                step,
                offset,
                IMPORTANCE,
                HOT,
                offs_w,
                offs_w < row_words,
                num_rows,
                row_words,
                importance_rows,
                hot_count,
                padding_idx,
                K,
                HAS_PADDING,
                SIGNED,
                HAS_IMPORTANCE,
                HAS_HOT,
                HOT_STEPS,
                WIDE_IDS,
                BITS,
                BLOCK_W,
            )
            vectors = tl.where(live[:, None], vectors, float("-inf"))
            best = tl.maximum(best, tl.max(vectors, axis=0))
            live_count += live.to(tl.float32)
        # A bag with no live id pools to zeros, as in nn.EmbeddingBag.
        out = tl.where(tl.sum(live_count) > 0, best, 0.0)
    else:
        # The rows of the tile are (id, hash function) pairs, K per id in
        # order, each hashed by one thread (as in bag_forward.py's sum); the
        # tile is summed in registers and across the warp once, at the end.
        a0 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a4 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a5 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a6 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        a7 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        weight_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        factor_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        live_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first in range(start * K, end * K, BLOCK_N):
            pair = first + lanes
            offs_n = pair // K
            j = (pair % K).to(tl.int32)
            rows, row_live, live, variant = pair_rows(
                offs_n,
                j,
                pair < end * K,
                IDS,
                SEEDS,
                IMPORTANCE,
                HOT,
                num_rows,
                importance_rows,
                hot_count,
                padding_idx,
                K,
                HAS_PADDING,
                SIGNED,
                HAS_IMPORTANCE,
                HAS_HOT,
                HOT_STEPS,
                WIDE_IDS,
            )
            factor = tl.where(row_live, variant.to(tl.float32), 0.0)
            if HAS_PSW:
                factor = factor * tl.load(PSW + offs_n, mask=row_live, other=0.0).to(tl.float32)
            weight = _row_weight(SCALE_CODES, rows, row_live, factor, lo, step)
            words = tl.load(
                CODES + rows[:, None] * row_words + offs_w[None, :],
                mask=row_live[:, None] & (offs_w < row_words)[None, :],
                other=0,
            )
            a0, a1, a2, a3, a4, a5, a6, a7 = _add_codes(a0, a1, a2, a3, a4, a5, a6, a7, words, weight[:, None], BITS)
            weight_sum += weight
            factor_sum += factor
            if MODE == MODE_MEAN:
                live_count += (live & (j == 0)).to(tl.float32)
        ws = weight_sum[:, None]
        out = _joined(
            tl.sum(_centred(a0, 0, ws, BITS), axis=0),
            tl.sum(_centred(a1, 1, ws, BITS), axis=0),
            tl.sum(_centred(a2, 2, ws, BITS), axis=0),
            tl.sum(_centred(a3, 3, ws, BITS), axis=0),
            tl.sum(_centred(a4, 4, ws, BITS), axis=0),
            tl.sum(_centred(a5, 5, ws, BITS), axis=0),
            tl.sum(_centred(a6, 6, ws, BITS), axis=0),
            tl.sum(_centred(a7, 7, ws, BITS), axis=0),
            BITS,
        )
        out += offset * tl.sum(factor_sum)
        if MODE == MODE_MEAN:
            out = out / tl.maximum(tl.sum(live_count), 1.0)
    tl.store(OUT + bag * dim + offs_c, out, mask=offs_c < dim)


def used_words(dim, bits):
    """32-bit words of a row that hold codes (the rest of the row is padding)."""
    return -(-dim * bits // 32)


def tile(dim, bits):
    """``(BLOCK_N, BLOCK_W)`` of a table of ``dim`` columns at ``bits``, for
    one warp: 32 rows (ids, or (id, hash function) pairs in sum and mean
    bags: one a thread for the hashing) by as many of a row's 32-bit words as
    give at most 64 columns, at least 4 (one 16-byte load).  Each thread
    then holds 64 bytes of codes at int8 (four 128-bit loads) and 32 at
    int4, and 64 float32 accumulators either way."""
    return 32, max(4, min(triton.next_power_of_2(used_words(dim, bits)), 2 * bits))


def _common_args(ids, table, seeds, *, bits, dim, num_hash_functions, wide_ids, signed, importance, hot):
    codes, scale_codes, scale_grid, column_offset = table
    args = dict(
        IDS=ids.reshape(-1).contiguous(),
        SEEDS=seeds,
        # The rows as 32-bit words (row_bytes is a multiple of 16): a word's
        # codes are taken out of it in place (_code).
        CODES=codes.contiguous().view(torch.int32),
        SCALE_CODES=scale_codes,
        GRID=scale_grid,
        COLUMN_OFFSET=column_offset,
        dim=dim,
        row_words=codes.shape[1] // 4,
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
    # hashing_args names the table W and its stride: these kernels take CODES and row_words.
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
    # At most 32 columns a program: the lookup keeps a (32 ids, 64 columns)
    # tile whole to its store, which took 128 registers and spilled 32 bytes
    # at int4 (Triton 3.9, sm_90); two warps, or 16 ids a program, hash each
    # id on several threads.
    block_n, block_w = tile(dim, bits)
    block_w = min(block_w, max(4, bits))

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(used_words(dim, bits), meta_["BLOCK_W"]))

    config = {"kwargs": {"BLOCK_N": block_n, "BLOCK_W": block_w}, "num_warps": 1, "num_stages": None}
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
    block_n, block_w = tile(dim, bits)

    def grid(meta_):
        return (num_bags, triton.cdiv(used_words(dim, bits), meta_["BLOCK_W"]))

    config = {"kwargs": {"BLOCK_N": block_n, "BLOCK_W": block_w}, "num_warps": 1, "num_stages": None}
    launch(_quantized_bag_kernel, grid, args, codes.device, config=config)
    return out
