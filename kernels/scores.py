"""Scores of a chunk of ids against a batch of queries, without writing the
ids' vectors: hash, gather the ``k`` rows, dot with the queries, in one kernel.

Two scores share the kernel, chosen by ``FROM_ROW_SCORES``:

- the Bloom embedding's (tied output, top-k): ``score(q, i) = q . v_i``,
  ``v_i`` the id's vector as the lookup gives it (the sum of its ``k`` rows,
  each times its sign and importance weight, rounded to the table's dtype);
- the Bloom output layer's decoder (Serra & Karatzoglou 2017):
  ``score(q, i) = sum_j P[q, h_j(i)]``, ``P`` the ``(queries, num_rows)``
  log-probabilities of the output units.

Each program owns ``BLOCK_Q`` queries x ``BLOCK_N`` ids, a ``(BLOCK_Q,
BLOCK_N)`` tile stored along the ids (a row of scores is contiguous).  The
ids enter the lookup's helpers as ``(BLOCK_N, 1)`` (the gathered vectors'
rows) and the product ``queries @ vectors.T`` lays them along the tile's
columns; the decoder reads them as ``(1, BLOCK_N)`` directly.  The product
runs on tensor cores in TF32 where queries and table are 16-bit (their
values, and so the products, are exact in TF32), in IEEE float32 FMAs for
other float32 scores, and as a broadcast sum in float64 (exact scores).  Not
tuned: the block sizes follow the shape (``_config``).
"""

import torch
import triton
import triton.language as tl

from .hashing import bloom_rows
from .launch import launch
from .lookup import accumulator, aligned, gather_sum, hashing_args, id_hashes, load_ids, padding_args, row_contiguous
from .quantized import _common_args as _quantized_args
from .quantized import _id_vectors, used_words


@triton.jit
def _score_tile(
    QUERIES,
    IDS,
    SEEDS,
    W,
    IMPORTANCE,
    HOT,
    start,
    offs_q,
    nq,
    n,
    dim,
    num_rows,
    stride_w,
    stride_q,
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
    FROM_ROW_SCORES: tl.constexpr,
    DOT: tl.constexpr,
    VEC_ACC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The ``(BLOCK_Q, BLOCK_N)`` scores of the queries ``offs_q``
    (``(BLOCK_Q, 1)``) against the ids at ``start ..``, in ``ACC``."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=ACC)
    if FROM_ROW_SCORES:
        # Ids along the tile's columns: each row score is read where it lies.
        offs_n = start + tl.arange(0, BLOCK_N)[None, :]
        ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
        mixed_lo, mixed_hi, _, _ = id_hashes(
            ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
        )
        # A loop, not unrolled, as in the lookups: k gathers in flight at once
        # would hold k tiles in registers.
        for j in range(K):
            rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
            acc += tl.load(W + offs_q * stride_w + rows, mask=live & (offs_q < nq), other=0.0).to(ACC)
    else:
        # Ids along the rows, as the lookup's helpers take them.
        offs_n = start + tl.arange(0, BLOCK_N)[:, None]
        ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
        mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
            ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
        )
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)[None, :]
            vectors = gather_sum(
                ids,
                live,
                mixed_lo,
                mixed_hi,
                imp_rows,
                hot,
                IDS,
                offs_n,
                SEEDS,
                W,
                IMPORTANCE,
                offs_d,
                live & (offs_d < dim),
                num_rows,
                stride_w,
                K,
                False,
                SIGNED,
                HAS_IMPORTANCE,
                HAS_HOT,
                WIDE_IDS,
                VEC_ACC,
            )
            # Summed and rounded as the lookup sums and rounds its output, so
            # that a score is the dot product with the vector the embedding
            # returns, whatever the dot products accumulate in.
            vectors = vectors.to(W.dtype.element_ty)
            queries = tl.load(QUERIES + offs_q * stride_q + offs_d, mask=(offs_q < nq) & (offs_d < dim), other=0.0)
            acc = _add_products(acc, queries, vectors, DOT, ACC)
    return acc


@triton.jit
def _add_products(acc, queries, vectors, DOT: tl.constexpr, ACC: tl.constexpr):
    """``acc + queries @ vectors.T`` (``(BLOCK_Q, C)`` by ``(BLOCK_N, C)``) by
    the ``DOT`` mode of :func:`_dot_mode`."""
    if DOT == 2:
        # 16-bit queries and vectors are exact in TF32 (an 8-bit exponent,
        # 10 bits of mantissa): tensor cores, products exact, sums in
        # float32.  (Not a 16-bit tl.dot: Triton 3.9's interpreter
        # multiplies bfloat16's raw bits.)
        acc += tl.dot(queries.to(ACC), tl.trans(vectors.to(ACC)), input_precision="tf32")
    elif DOT == 1:
        # IEEE float32, not TF32: rankings must match the PyTorch path's.
        acc += tl.dot(queries.to(ACC), tl.trans(vectors.to(ACC)), input_precision="ieee")
    else:
        acc += tl.sum(queries.to(ACC)[:, None, :] * vectors.to(ACC)[None, :, :], axis=2)
    return acc


@triton.jit
def _bloom_scores_kernel(
    QUERIES,  # (nq, dim) queries, rows `stride_q` apart (unused with FROM_ROW_SCORES)
    IDS,  # (n,) int32/int64 ids of the chunk
    SEEDS,  # (49,) int32 murmurhash3 seeds
    W,  # (num_rows, dim) table; with FROM_ROW_SCORES the (nq, num_rows) row scores
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    OUT,  # (nq, n) scores, rows `stride_out` apart
    nq,  # number of queries
    n,  # number of ids
    dim,  # embedding_dim
    num_rows,  # the modulus of the hash
    stride_w,  # elements between two rows of W
    stride_q,  # elements between two queries
    stride_out,  # elements between two rows of OUT
    importance_rows,
    hot_count,  # ids in HOT
    padding_idx,  # id whose vector is zero (ignored unless HAS_PADDING)
    K: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,
    HOT_STEPS: tl.constexpr,  # halvings of the binary search over HOT
    WIDE_IDS: tl.constexpr,
    FROM_ROW_SCORES: tl.constexpr,  # the decoder's score instead of the dot product
    DOT: tl.constexpr,  # 2: tl.dot, TF32 (16-bit operands); 1: tl.dot, IEEE float32; 0: a broadcast sum (float64)
    VEC_ACC: tl.constexpr,  # the lookup's accumulator for the k-sum of a vector
    ACC: tl.constexpr,  # the dot products' accumulator
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
    acc = _score_tile(
        QUERIES,
        IDS,
        SEEDS,
        W,
        IMPORTANCE,
        HOT,
        start,
        offs_q,
        nq,
        n,
        dim,
        num_rows,
        stride_w,
        stride_q,
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
        FROM_ROW_SCORES,
        DOT,
        VEC_ACC,
        ACC,
        BLOCK_Q,
        BLOCK_N,
        BLOCK_D,
    )
    offs_n = start + tl.arange(0, BLOCK_N)[None, :]
    tl.store(OUT + offs_q * stride_out + offs_n, acc.to(OUT.dtype.element_ty), mask=(offs_q < nq) & (offs_n < n))


@triton.jit
def _quantized_scores_kernel(
    QUERIES,  # (nq, dim) queries, rows `stride_q` apart
    IDS,  # (n,) int32/int64 ids of the chunk
    SEEDS,  # (49,) int32 murmurhash3 seeds
    CODES,  # (rows, row_words) int32: the uint8 codes, four to a word (kernels/quantized.py)
    SCALE_CODES,  # (rows,) uint8 scale codes
    GRID,  # (2,) float32: the scale grid's lo and step
    COLUMN_OFFSET,  # (dim,) float32
    IMPORTANCE,  # (importance_rows, K) float32, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted hot ids, read only when HAS_HOT
    OUT,  # (nq, n) scores, rows `stride_out` apart
    nq,
    n,
    dim,
    num_rows,  # shared rows: the hash's modulus
    row_words,  # words between two rows of CODES, a multiple of 4 (16-byte rows)
    stride_q,
    stride_out,
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
    DOT: tl.constexpr,  # 1: tl.dot, IEEE float32; 0: a broadcast sum (float64)
    ACC: tl.constexpr,  # the dot products' accumulator
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words of a row a step; BLOCK_W * 32 // BITS columns
):
    """The quantized table's scores: each id's vector is the quantized
    lookup's (``kernels/quantized.py``'s ``_id_vectors``: the ``k`` rows of
    codes gathered, dequantised and summed in float32, the same operations
    in the same order, so the same float32 vector), dotted with the queries
    a block of words at a time."""
    COLS: tl.constexpr = BLOCK_W * (32 // BITS)
    row_words = aligned(row_words, 4)
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
    lo = tl.load(GRID)
    step = tl.load(GRID + 1)
    q_rows = QUERIES + offs_q * stride_q
    q_live = offs_q < nq
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=ACC)
    # Each step hashes the ids again: the registers go to the tile, not to
    # the k rows' hashes kept between steps.
    for w0 in range(0, (dim * BITS + 31) // 32, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        offs_c = w0 * (32 // BITS) + tl.arange(0, COLS)
        offset = tl.load(COLUMN_OFFSET + offs_c, mask=offs_c < dim, other=0.0)
        vectors, _ = _id_vectors(
            offs_n,
            offs_n < n,
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
        # Columns past dim hold finite values, met by queries read as 0.
        cols = offs_c[None, :]
        queries = tl.load(q_rows + cols, mask=q_live & (cols < dim), other=0.0)
        acc = _add_products(acc, queries, vectors, DOT, ACC)
    offs_out = start + tl.arange(0, BLOCK_N)[None, :]
    tl.store(OUT + offs_q * stride_out + offs_out, acc.to(OUT.dtype.element_ty), mask=q_live & (offs_out < n))


def _dot_mode(queries, table, acc_dtype):
    """The ``DOT`` constexpr: TF32 tensor cores where queries and table are
    both 16-bit and the scores float32 (exact products), IEEE float32 for
    other float32 scores, the broadcast sum for float64."""
    if acc_dtype == torch.float64:
        return 0
    half = (torch.float16, torch.bfloat16)
    if queries.dtype in half and table.dtype in half:
        return 2
    return 1


def _config(nq, dim, dot, from_row_scores):
    """Block sizes from the shape: as many queries as there are (up to 64)
    per program, 64 ids, 32 columns per step of the loop over the row, and
    smaller tiles for float64, whose accumulator takes two registers.

    A tile of 64 queries takes eight warps (sm_90, Triton 3.9, the compile
    check): with four, the float32 product took 128 registers a thread (25%
    occupancy) and the decoder's 64 x 128 tile 189 (12.5%); with eight, 80
    (37.5%), and the decoder 40 at 32 ids.  The TF32 product steps 16 columns at a
    time: 57 registers (50%) against 76 at 32.  (Float32 at 64 x 32 ids
    spilled at eight warps and took 71 registers at four.)"""
    # tl.dot needs every block dimension to be at least 16.
    block_q = min(64, max(16, triton.next_power_of_2(nq)))
    block_d = min(32, max(16, triton.next_power_of_2(dim)))
    block_n, warps = 64, 4
    if dot == 0:
        # 16 columns: at 32, the (16, 16, 32) float64 product took 168
        # registers and a stack frame on sm_80.
        block_q, block_n, block_d = min(block_q, 16), 16, 16
    elif block_q == 64:
        warps = 8
        if from_row_scores:
            block_n = 32
        elif dot == 2:
            block_d = 16
    elif not from_row_scores:
        # At 16 queries, 32 columns a step spilled 8 bytes (64 registers) in
        # some specializations on sm_80 and sm_90, and the TF32 product at
        # four warps one on sm_80 (Triton 3.9): 16 columns, two warps for TF32.
        block_d = 16
        if dot == 2:
            warps = 2
    return {"kwargs": {"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d}, "num_warps": warps, "num_stages": 1}


def _launch(
    queries,
    ids,
    table,
    seeds,
    *,
    num_hash_functions,
    padding_idx,
    wide_ids,
    signed,
    importance,
    hot,
    from_row_scores,
    dim,
    acc_dtype,
    out_dtype,
):
    nq, n = queries.shape[0], ids.numel()
    out = torch.empty((nq, n), dtype=out_dtype, device=table.device)
    if nq == 0 or n == 0:
        return out
    if dim == 0:
        return out.zero_()
    table = row_contiguous(table)
    queries = row_contiguous(queries)
    dot = 1 if from_row_scores and acc_dtype == torch.float32 else _dot_mode(queries, table, acc_dtype)
    args = dict(
        QUERIES=queries,
        IDS=ids.reshape(-1).contiguous(),
        SEEDS=seeds,
        OUT=out,
        nq=nq,
        n=n,
        dim=dim,
        stride_q=queries.stride(0),
        stride_out=out.stride(0),
        FROM_ROW_SCORES=from_row_scores,
        DOT=dot,
        VEC_ACC=accumulator(table.dtype),
        ACC=accumulator(acc_dtype),
        **_common_args(table, num_hash_functions, wide_ids, signed, importance, hot, padding_idx),
    )
    if from_row_scores:
        args["num_rows"] = table.shape[1]  # the row scores' columns are the output units

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(nq, meta["BLOCK_Q"]))

    launch(_bloom_scores_kernel, grid, args, table.device, config=_config(nq, dim, dot, from_row_scores))
    return out


def _common_args(table, num_hash_functions, wide_ids, signed, importance, hot, padding_idx):
    return dict(
        **hashing_args(
            table,
            num_hash_functions=num_hash_functions,
            wide_ids=wide_ids,
            signed=signed,
            importance=importance,
            hot=hot,
            absent=table,
        ),
        **padding_args(padding_idx),
    )


def bloom_scores(
    queries,
    ids,
    weight,
    seeds,
    *,
    num_hash_functions,
    padding_idx=None,
    wide_ids=True,
    signed=False,
    importance=None,
    hot=None,
    exact=False,
):
    """``(nq, n)`` dot products of every query with every id's Bloom vector.

    Args:
        queries (Tensor): ``(nq, dim)`` floating point.
        ids (Tensor): ``(n,)`` int32/int64 ids; validated by the caller.
        weight (Tensor): the ``(num_rows, dim)`` table.
        seeds (Tensor): int32 seeds on ``weight``'s device.
        num_hash_functions (int): ``k``.
        padding_idx (int, optional): id whose vector, and so score, is zero.
        wide_ids (bool): whether ids may reach ``2**31``.
        signed (bool), importance (Tensor, optional), hot (Tensor, optional):
            the variants, as in ``bloom_forward``.
        exact (bool): a float32 score is the float64 dot product rounded
            once, so that it depends on the query and the vector alone.  A
            float32 ``tl.dot`` sums in an order that may depend on where the
            pair sits in the block (under the interpreter it is the BLAS
            kernel's order, which changes with the CPU), and two ids with the
            same vector must tie for ranks to count ties.

    Returns:
        Tensor ``(nq, n)``: float64 when ``queries`` or ``weight`` is float64,
        else float32.
    """
    out_dtype = torch.float64 if torch.float64 in (queries.dtype, weight.dtype) else torch.float32
    acc_dtype = torch.float64 if exact else out_dtype
    return _launch(
        queries,
        ids,
        weight,
        seeds,
        num_hash_functions=num_hash_functions,
        padding_idx=padding_idx,
        wide_ids=wide_ids,
        signed=signed,
        importance=importance,
        hot=hot,
        from_row_scores=False,
        dim=weight.shape[1],
        acc_dtype=acc_dtype,
        out_dtype=out_dtype,
    )


def bloom_row_score_sums(row_scores, ids, seeds, *, num_hash_functions, wide_ids=True):
    """``(nq, n)``: for every query and id, the sum of ``row_scores[q, h_j(id)]``
    over the id's ``k`` rows (the Bloom output layer's decoder).

    Args:
        row_scores (Tensor): ``(nq, num_rows)`` floating point, e.g. log-probabilities.
        ids (Tensor): ``(n,)`` int32/int64 ids; validated by the caller.
        seeds (Tensor): int32 seeds on ``row_scores``' device.
        num_hash_functions (int): ``k``.
        wide_ids (bool): whether ids may reach ``2**31``.

    Returns:
        Tensor ``(nq, n)``, float32 (float64 for float64 ``row_scores``).
    """
    acc_dtype = torch.float64 if row_scores.dtype == torch.float64 else torch.float32
    return _launch(
        row_scores,
        ids,
        row_scores,
        seeds,
        num_hash_functions=num_hash_functions,
        padding_idx=None,
        wide_ids=wide_ids,
        signed=False,
        importance=None,
        hot=None,
        from_row_scores=True,
        dim=1,
        acc_dtype=acc_dtype,
        out_dtype=acc_dtype,
    )


def _quantized_config(nq, dim, bits, dot):
    """Block sizes of the quantized scores: the float scores' query and id
    blocks (:func:`_config`: 64 ids, up to 64 queries, eight warps at 64),
    and 32 columns a step (``BITS`` words of codes: two 16-byte loads a row
    at int8, one at int4).  Float64 takes the float kernel's small tiles: 16
    queries, 16 ids, 16 columns a step.

    Registers on the compile check (Triton 3.9, sm_80 / sm_90): at 64
    columns a step (the lookup's tile) the 64-query tiles took 182-255 / 102-126
    registers, and four warps at dim 33 225 at int4 on sm_80; at 32, 80-112
    / 106-128, and 96 / 80-94 at four warps.  At 16 columns int8 at
    ``k = 24`` spilled 8 bytes on sm_80; 32 columns at four warps for 64
    queries took 128-200.  Past 32 columns each step hashes the ids again."""
    block_q = min(64, max(16, triton.next_power_of_2(nq)))
    block_w = max(4, min(triton.next_power_of_2(used_words(dim, bits)), bits))
    block_n, warps = 64, 4
    if dot == 0:
        block_q, block_n, block_w = min(block_q, 16), 16, bits // 2
    elif block_q == 64:
        warps = 8
    return {"kwargs": {"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_W": block_w}, "num_warps": warps, "num_stages": 1}


def quantized_scores(
    queries,
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
    padding_idx=None,
    wide_ids=True,
    signed=False,
    importance=None,
    hot=None,
    exact=False,
):
    """``(nq, n)`` dot products of every query with every id's dequantised
    Bloom vector (a quantized table's: ``triton_bloom/quantized_ops.py``),
    the vectors never written.

    Args:
        queries (Tensor): ``(nq, dim)`` floating point.
        ids (Tensor): ``(n,)`` int32/int64 ids; validated by the caller.
        codes, scale_codes, scale_grid, column_offset (Tensor): the table,
            as ``kernels.quantized.quantized_forward`` takes it.
        seeds (Tensor): int32 seeds on the table's device.
        bits (int): 8 or 4.
        dim (int): columns of the table.
        num_hash_functions, padding_idx, wide_ids, signed, importance, hot:
            as in :func:`bloom_scores` (``importance`` float32).
        exact (bool): as in :func:`bloom_scores`: a float32 score is the
            float64 dot product of the query with the float32 vector,
            rounded once.

    Returns:
        Tensor ``(nq, n)``: float64 for float64 ``queries``, else float32.
    """
    out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    acc_dtype = torch.float64 if exact else out_dtype
    nq, n = queries.shape[0], ids.numel()
    out = torch.empty((nq, n), dtype=out_dtype, device=codes.device)
    if nq == 0 or n == 0:
        return out
    queries = row_contiguous(queries)
    dot = 0 if acc_dtype == torch.float64 else 1
    args = _quantized_args(
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
        QUERIES=queries,
        OUT=out,
        nq=nq,
        n=n,
        stride_q=queries.stride(0),
        stride_out=out.stride(0),
        DOT=dot,
        ACC=accumulator(acc_dtype),
        **padding_args(padding_idx),
    )

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(nq, meta["BLOCK_Q"]))

    launch(_quantized_scores_kernel, grid, args, codes.device, config=_quantized_config(nq, dim, bits, dot))
    return out
