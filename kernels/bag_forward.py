"""Bloom embedding bag forward: per bag, hash its ids, sum each id's ``k``
rows, and pool the id vectors (sum, mean or max) without writing them out."""

import torch
import triton
import triton.language as tl

from .. import constants
from .autotune import BAG_TILES, TUNING_KEY, Tuning
from .launch import launch
from .lookup import (
    accumulator,
    aligned,
    alignment_args,
    gather_sum,
    hashing_args,
    id_hashes,
    load_ids,
    padding_args,
    row_contiguous,
)

# The pooling codes of triton_bloom/constants.py, as the kernels read them.
MODE_MEAN = tl.constexpr(constants.MODE_MEAN)
MODE_MAX = tl.constexpr(constants.MODE_MAX)
# Each pooling mode is a different kernel: tune them apart.
BAG_TUNING = Tuning(key=TUNING_KEY + ("MODE",), tiles=BAG_TILES, max_per_thread=(8, 8))


@triton.jit
def _bloom_bag_forward_kernel(
    IDS,  # (n,) int32/int64 ids of all bags, bag after bag
    OFFSETS,  # (B + 1,) int64: bag b is IDS[OFFSETS[b]:OFFSETS[b + 1]]
    PSW,  # (n,) per-sample weights, read only when HAS_PSW
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) compressed table; rows `stride_w` apart, columns contiguous
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    OUT,  # (B, dim) pooled output, contiguous
    ARGMAX,  # (B, dim) int64 position in IDS of each column's max (MODE_MAX), -1 if none
    dim,  # embedding_dim
    num_rows,  # rows of W, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    hot_count,  # ids in HOT
    padding_idx,  # id left out of the pooling (ignored unless HAS_PADDING)
    K: tl.constexpr,
    MODE: tl.constexpr,  # MODE_SUM, MODE_MEAN or MODE_MAX
    HAS_PSW: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,  # the ids in HOT read their private rows instead of hashing
    HOT_STEPS: tl.constexpr,  # halvings of the binary search over HOT
    WIDE_IDS: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: float64 for float64 tables, else float32
    ROW_ALIGN: tl.constexpr,  # dim and stride_w are multiples of it (lookup.alignment_args)
    BLOCK_N: tl.constexpr,  # ids of the bag handled per step
    BLOCK_D: tl.constexpr,
):
    dim = aligned(dim, ROW_ALIGN)
    stride_w = aligned(stride_w, ROW_ALIGN)
    bag = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    start = tl.load(OFFSETS + bag)
    end = tl.load(OFFSETS + bag + 1)

    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    best = tl.full((BLOCK_D,), float("-inf"), dtype=ACC)
    best_pos = tl.full((BLOCK_D,), -1, dtype=tl.int64)
    live_count = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)[:, None]
        ids, live = load_ids(IDS, offs_n, offs_n < end, padding_idx, HAS_PADDING)
        mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
            ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
        )
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
            offs_d[None, :],
            live & mask_d[None, :],
            num_rows,
            stride_w,
            K,
            False,
            SIGNED,
            HAS_IMPORTANCE,
            HAS_HOT,
            WIDE_IDS,
            ACC,
        )
        if MODE == MODE_MAX:
            vectors = tl.where(live, vectors, float("-inf"))
            step_best = tl.max(vectors, axis=0)
            step_pos = first + tl.argmax(vectors, axis=0).to(tl.int64)
            # Strictly greater: the first id reaching the max keeps it, as in
            # nn.EmbeddingBag, so the gradient goes to one id per column.
            better = step_best > best
            best = tl.where(better, step_best, best)
            best_pos = tl.where(better, step_pos, best_pos)
        else:
            weights = live.to(ACC)
            if HAS_PSW:
                weights *= tl.load(PSW + offs_n, mask=live, other=0.0).to(ACC)
            acc += tl.sum(vectors * weights, axis=0)
            live_count += live.to(tl.float32)

    if MODE == MODE_MAX:
        acc = tl.where(best_pos >= 0, best, 0.0)
        tl.store(ARGMAX + bag * dim + offs_d, best_pos, mask=mask_d)
    if MODE == MODE_MEAN:
        acc = acc / tl.maximum(tl.sum(live_count), 1.0).to(ACC)
    tl.store(OUT + bag * dim + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)


def bloom_bag_forward(
    ids,
    offsets,
    weight,
    seeds,
    *,
    num_hash_functions,
    mode=constants.MODE_SUM,
    per_sample_weights=None,
    padding_idx=None,
    wide_ids=True,
    signed=False,
    importance=None,
    hot=None,
):
    """Pooled Bloom vectors of bags of ids.

    Args:
        ids (Tensor): ``(n,)`` int32/int64 ids, validated by the caller.
        offsets (Tensor): ``(B + 1,)`` int64 bag starts, then ``n``.
        weight (Tensor): the ``(num_rows, dim)`` table.
        seeds (Tensor): int32 seeds on ``weight``'s device.
        num_hash_functions (int): ``k``.
        mode (int): ``MODE_SUM``, ``MODE_MEAN`` or ``MODE_MAX``.
        per_sample_weights (Tensor, optional): ``(n,)`` weights (sum mode).
        padding_idx (int, optional): id left out of the pooling.
        wide_ids (bool): whether ids may reach ``2**31``.
        signed (bool), importance (Tensor, optional), hot (Tensor, optional):
            as in ``bloom_forward``.

    Returns:
        ``(out, argmax)``: the ``(B, dim)`` pooled output in ``weight``'s dtype,
        and for max mode the ``(B, dim)`` int64 position of each column's
        maximum (-1 for a bag with no live id); an empty tensor otherwise.
    """
    dim = weight.shape[1]
    num_bags = offsets.numel() - 1
    out = torch.empty((num_bags, dim), dtype=weight.dtype, device=weight.device)
    argmax_shape = (num_bags, dim) if mode == constants.MODE_MAX else (0,)
    argmax = torch.empty(argmax_shape, dtype=torch.int64, device=weight.device)
    if num_bags == 0 or dim == 0:
        return out, argmax
    weight = row_contiguous(weight)
    ids = ids.reshape(-1).contiguous()
    offsets = offsets.contiguous()
    args = dict(
        IDS=ids,
        OFFSETS=offsets,
        PSW=per_sample_weights.contiguous() if per_sample_weights is not None else weight,
        SEEDS=seeds,
        OUT=out,
        ARGMAX=argmax,
        dim=dim,
        MODE=mode,
        HAS_PSW=per_sample_weights is not None,
        ACC=accumulator(weight.dtype),
        **alignment_args(weight, dim),
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
        return (num_bags, triton.cdiv(dim, meta["BLOCK_D"]))

    launch(_bloom_bag_forward_kernel, grid, args, weight.device, tuning=BAG_TUNING)
    return out, argmax
