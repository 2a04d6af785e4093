"""Bloom embedding forward: hash, gather the ``k`` rows, sum, write once."""

import torch
import triton
import triton.language as tl

from .autotune import Tuning
from .launch import launch
from .hashing import bloom_rows, importance_row, premix_ids, row_factor


@triton.jit
def _bloom_forward_kernel(
    IDS,  # (n,) int32/int64 ids, or unused when PRECOMPUTED
    ROWS,  # (n, K) int32/int64 row indices, read only when PRECOMPUTED
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) compressed table; rows `stride_w` apart, columns contiguous
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    OUT,  # (n, dim) output, contiguous
    n,  # number of ids
    dim,  # embedding_dim
    num_rows,  # rows of W, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    padding_idx,  # id that maps to a zero vector (ignored unless HAS_PADDING)
    K: tl.constexpr,  # hash functions per id
    HAS_PADDING: tl.constexpr,
    PRECOMPUTED: tl.constexpr,  # rows come from a hash cache, not from hashing
    SIGNED: tl.constexpr,  # each row enters with its sign hash's +-1
    HAS_IMPORTANCE: tl.constexpr,  # ... times the id's learned importance weight
    WIDE_IDS: tl.constexpr,  # ids may be >= 2**31 (8-byte hashing)
    ACC: tl.constexpr,  # accumulator dtype: float64 for float64 tables, else float32
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 offsets throughout: n * dim and num_rows * dim may pass 2**31.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < dim

    ids = tl.load(IDS + offs_n, mask=mask_n, other=0).to(tl.int64)
    live = mask_n
    if HAS_PADDING:
        live = live & (ids != padding_idx)
    mask = live[:, None] & mask_d[None, :]
    # The variants hash the ids even when the rows come from a cache.
    mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
    imp_rows = ids
    if HAS_IMPORTANCE:
        imp_rows = importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for j in tl.static_range(K):
        if PRECOMPUTED:
            rows = tl.load(ROWS + offs_n * K + j, mask=live, other=0).to(tl.int64)
        else:
            rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
        vals = tl.load(W + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        if SIGNED or HAS_IMPORTANCE:
            _, factor = row_factor(ids, mixed_lo, mixed_hi, SEEDS, IMPORTANCE, imp_rows, live, j, K, SIGNED,
                                   HAS_IMPORTANCE, WIDE_IDS)  # fmt: skip
            vals = vals * factor.to(ACC)[:, None]
        acc += vals

    out_ptrs = OUT + offs_n[:, None] * dim + offs_d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


def bloom_forward(ids, weight, seeds, num_hash_functions, padding_idx=None, rows=None, wide_ids=True,
                  signed=False, importance=None):  # fmt: skip
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

    Returns:
        Tensor of shape ``(*, dim)`` and ``weight``'s dtype.
    """
    num_rows, dim = weight.shape
    out = torch.empty((*ids.shape, dim), dtype=weight.dtype, device=weight.device)
    n = ids.numel()
    if n == 0 or dim == 0:
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    ids = ids.reshape(-1).contiguous()  # a strided 1-D view reshapes to itself
    rows = rows.reshape(n, num_hash_functions).contiguous() if rows is not None else None
    args = dict(
        IDS=ids,
        ROWS=rows if rows is not None else ids,
        SEEDS=seeds,
        W=weight,
        IMPORTANCE=importance.contiguous() if importance is not None else weight,
        OUT=out,
        n=n,
        dim=dim,
        num_rows=num_rows,
        stride_w=weight.stride(0),
        importance_rows=importance.shape[0] if importance is not None else 1,
        padding_idx=-1 if padding_idx is None else padding_idx,
        K=num_hash_functions,
        HAS_PADDING=padding_idx is not None,
        PRECOMPUTED=rows is not None,
        SIGNED=signed,
        HAS_IMPORTANCE=importance is not None,
        WIDE_IDS=wide_ids,
        ACC=tl.float64 if weight.dtype == torch.float64 else tl.float32,
    )

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

    launch(_bloom_forward_kernel, grid, args, weight.device, tuning=Tuning())
    return out
