"""Scores of a chunk of ids against a batch of queries, without writing the
ids' vectors: hash, gather the ``k`` rows, dot with the queries, in one kernel.

Two scores share the kernel, chosen by ``FROM_ROW_SCORES``:

- the Bloom embedding's (tied output, top-k): ``score(q, i) = q . v_i``,
  ``v_i`` the id's vector as the lookup gives it (the sum of its ``k`` rows,
  each times its sign and importance weight, rounded to the table's dtype);
- the Bloom output layer's decoder (Serra & Karatzoglou 2017):
  ``score(q, i) = sum_j P[q, h_j(i)]``, ``P`` the ``(queries, num_rows)``
  log-probabilities of the output units.

Each program owns ``BLOCK_N`` ids x ``BLOCK_Q`` queries.  The tile is laid
out ids-first, ``(BLOCK_N, BLOCK_Q)``, so that the lookup's helpers (which
take ids as ``(BLOCK_N, 1)``) apply unchanged and the store needs no
transpose.  Not tuned: the block sizes follow the shape (``_config``).
"""

import torch
import triton
import triton.language as tl

from .hashing import bloom_rows
from .launch import launch
from .lookup import accumulator, gather_sum, hashing_args, id_hashes, load_ids, padding_args, row_contiguous


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
    USE_DOT: tl.constexpr,  # tl.dot (float32); else a broadcast sum (float64)
    VEC_ACC: tl.constexpr,  # the lookup's accumulator for the k-sum of a vector
    ACC: tl.constexpr,  # the dot products' accumulator
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=ACC)
    if FROM_ROW_SCORES:
        # A loop, not unrolled, as in the lookups: k gathers in flight at once
        # would hold k tiles in registers.
        for j in range(K):
            rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
            acc += tl.load(W + offs_q * stride_w + rows, mask=live & (offs_q < nq), other=0.0).to(ACC)
    else:
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
            vectors = vectors.to(W.dtype.element_ty).to(ACC)
            offs_qd = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
            queries = tl.load(
                QUERIES + offs_qd * stride_q + offs_d, mask=(offs_qd < nq) & (offs_d < dim), other=0.0
            ).to(ACC)
            if USE_DOT:
                # IEEE float32, not TF32: rankings must match the PyTorch path's.
                acc += tl.dot(vectors, tl.trans(queries), input_precision="ieee")
            else:
                acc += tl.sum(vectors[:, None, :] * queries[None, :, :], axis=2)
    tl.store(OUT + offs_q * stride_out + offs_n, acc.to(OUT.dtype.element_ty), mask=(offs_n < n) & (offs_q < nq))


def _config(nq, dim, wide_acc, from_row_scores):
    """Block sizes from the shape: as many queries as there are (up to 64)
    per program, 32 columns per step of the loop over the row, and smaller
    tiles for float64, whose accumulator takes two registers.  At 64 queries
    a 64-column step spills on sm_90 (255 registers; the compile check)."""
    # tl.dot needs every block dimension to be at least 16.
    block_q = min(64, max(16, triton.next_power_of_2(nq)))
    block_d = min(32, max(16, triton.next_power_of_2(dim)))
    block_n = 64
    if wide_acc:
        # 16 columns: at 32, the (16, 16, 32) float64 product took 168
        # registers and a stack frame on sm_80.
        block_q, block_n, block_d = min(block_q, 16), 16, 16
    elif from_row_scores:
        block_n = 128
    return {"kwargs": {"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d}, "num_warps": 4, "num_stages": 1}


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
    acc = accumulator(acc_dtype)
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
        USE_DOT=acc_dtype == torch.float32,
        VEC_ACC=accumulator(table.dtype),
        ACC=acc,
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
    if from_row_scores:
        args["num_rows"] = table.shape[1]  # the row scores' columns are the output units

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(nq, meta["BLOCK_Q"]))

    config = _config(nq, dim, acc_dtype == torch.float64, from_row_scores)
    launch(_bloom_scores_kernel, grid, args, table.device, config=config)
    return out


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
