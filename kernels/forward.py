"""Bloom embedding forward: hash, gather the ``k`` rows, sum, write once."""

import torch
import triton
import triton.language as tl

from .autotune import Tuning
from .launch import launch
from .lookup import (
    accumulator,
    aligned,
    alignment_args,
    gather_sum,
    hashing_args,
    id_args,
    id_hashes,
    load_ids,
    padding_args,
    row_contiguous,
)


@triton.jit
def _bloom_forward_kernel(
    IDS,  # (n,) int32/int64 ids
    ROWS,  # (n, K) int32/int64 row indices, read only when PRECOMPUTED
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) compressed table; rows `stride_w` apart, columns contiguous
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    OUT,  # (n, dim) output, contiguous
    n,  # number of ids
    dim,  # embedding_dim
    num_rows,  # rows of W, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    hot_count,  # ids in HOT
    padding_idx,  # id that maps to a zero vector (ignored unless HAS_PADDING)
    K: tl.constexpr,  # hash functions per id
    HAS_PADDING: tl.constexpr,
    PRECOMPUTED: tl.constexpr,  # rows come from a hash cache, not from hashing
    SIGNED: tl.constexpr,  # each row enters with its sign hash's +-1
    HAS_IMPORTANCE: tl.constexpr,  # ... times the id's learned importance weight
    HAS_HOT: tl.constexpr,  # the ids in HOT read their private rows instead of hashing
    HOT_STEPS: tl.constexpr,  # halvings of the binary search over HOT
    WIDE_IDS: tl.constexpr,  # ids may be >= 2**31 (8-byte hashing)
    ACC: tl.constexpr,  # accumulator dtype: float64 for float64 tables, else float32
    ROW_ALIGN: tl.constexpr,  # dim and stride_w are multiples of it (lookup.alignment_args)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dim = aligned(dim, ROW_ALIGN)
    stride_w = aligned(stride_w, ROW_ALIGN)
    # int64 offsets throughout: n * dim and num_rows * dim may pass 2**31.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    in_range = (offs_n < n) & (offs_d < dim)
    ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
    # The variants hash the ids even when the rows come from a cache.
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    acc = gather_sum(
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
        live & (offs_d < dim),
        num_rows,
        stride_w,
        K,
        PRECOMPUTED,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        WIDE_IDS,
        ACC,
    )
    tl.store(OUT + offs_n * dim + offs_d, acc.to(OUT.dtype.element_ty), mask=in_range)


def bloom_forward(
    ids,
    weight,
    seeds,
    *,
    num_hash_functions,
    padding_idx=None,
    rows=None,
    wide_ids=True,
    signed=False,
    importance=None,
    hot=None,
):
    """Sum of the ``k`` Bloom rows of every id.

    Args:
        ids (Tensor): int32/int64 ids, any shape ``(*)``; validated by the caller.
        weight (Tensor): the ``(num_rows, dim)`` table.
        seeds (Tensor): int32 seeds on ``weight``'s device.
        num_hash_functions (int): ``k``.
        padding_idx (int, optional): id whose output is zero.
        rows (Tensor, optional): precomputed ``(*, k)`` rows (hash cache).
        wide_ids (bool): whether ids may reach ``2**31``; ``False`` drops the
            8-byte hashing from the kernel.
        signed (bool): multiply each row by its sign hash's +-1.
        importance (Tensor, optional): ``(importance_rows, k)`` weights of
            the ``k`` rows, read at the id's importance hash.
        hot (Tensor, optional): ``(H,)`` sorted ids that read the private
            rows at the end of ``weight`` (the first ``num_rows - H`` rows
            are hashed into).

    Returns:
        Tensor of shape ``(*, dim)`` and ``weight``'s dtype.
    """
    dim = weight.shape[1]
    out = torch.empty((*ids.shape, dim), dtype=weight.dtype, device=weight.device)
    n = ids.numel()
    if n == 0 or dim == 0:
        return out
    weight = row_contiguous(weight)
    args = dict(
        SEEDS=seeds,
        OUT=out,
        n=n,
        dim=dim,
        ACC=accumulator(weight.dtype),
        **alignment_args(weight, dim),
        **id_args(ids, rows, num_hash_functions),
        **hashing_args(
            weight,
            num_hash_functions=num_hash_functions,
            wide_ids=wide_ids,
            signed=signed,
            importance=importance,
            hot=hot,
            absent=weight,
        ),
        **padding_args(padding_idx),
    )

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

    # 16 elements a thread: at 32, Triton 3.6 keeps two of the output's
    # offsets in local memory across the k loop (all variants and hot rows on).
    launch(_bloom_forward_kernel, grid, args, weight.device, tuning=Tuning(max_per_thread=(16, 8)))
    return out
