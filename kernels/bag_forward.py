"""Bloom embedding bag forward: per bag, hash its ids, sum each id's ``k``
rows, and pool the id vectors (sum, mean or max) without writing them out."""

import torch
import triton
import triton.language as tl

from .. import constants
from .autotune import BAG_TILES, TUNING_KEY, Tuning, bag_bucket, bag_order
from .launch import launch
from .lookup import (
    accumulator,
    aligned,
    alignment_args,
    hashing_args,
    id_hashes,
    load_ids,
    padding_args,
    pair_rows,
    row_contiguous,
    row_index,
    variant_factor,
)

# The pooling codes of triton_bloom/constants.py, as the kernels read them.
MODE_MEAN = tl.constexpr(constants.MODE_MEAN)
MODE_MAX = tl.constexpr(constants.MODE_MAX)
# Each pooling mode is a different kernel, and the bag length decides the
# tiling: tune them apart.
BAG_TUNING = Tuning(key=TUNING_KEY + ("MODE", "bag_bucket"), tiles=BAG_TILES, max_per_thread=(64, 32), order=bag_order)


@triton.jit(do_not_specialize=["bag_bucket"])
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
    bag_bucket,  # the tuning key's bag length (never read)
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

    if MODE == MODE_MAX:
        out = _max_pool(
            IDS,
            SEEDS,
            W,
            IMPORTANCE,
            HOT,
            ARGMAX,
            bag,
            start,
            end,
            offs_d,
            mask_d,
            dim,
            num_rows,
            stride_w,
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
            ACC,
            BLOCK_N,
            BLOCK_D,
        )
    else:
        out = _sum_pool(
            IDS,
            PSW,
            SEEDS,
            W,
            IMPORTANCE,
            HOT,
            start,
            end,
            offs_d,
            mask_d,
            num_rows,
            stride_w,
            importance_rows,
            hot_count,
            padding_idx,
            K,
            MODE,
            HAS_PSW,
            HAS_PADDING,
            SIGNED,
            HAS_IMPORTANCE,
            HAS_HOT,
            HOT_STEPS,
            WIDE_IDS,
            ACC,
            BLOCK_N,
            BLOCK_D,
        )
    tl.store(OUT + bag * dim + offs_d, out.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _pair_block(
    offs_n,
    j,
    in_bag,
    IDS,
    SEEDS,
    W,
    IMPORTANCE,
    HOT,
    offs_d,
    mask_d,
    num_rows,
    stride_w,
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
    ACC: tl.constexpr,
):
    """The rows of the (id, hash function) pairs ``(offs_n, j)`` (positions
    in ``IDS``, int32 hash functions) on the columns ``offs_d``, each times
    its sign and importance weight, zero where ``in_bag`` is off or the id is
    padding; and which pairs are live.  Each pair is hashed by one thread
    (``lookup.pair_rows``, shared with the quantized bags)."""
    rows, row_live, live, variant = pair_rows(
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
        K,
        HAS_PADDING,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        HOT_STEPS,
        WIDE_IDS,
    )
    vals = tl.load(
        W + (rows * stride_w)[:, None] + offs_d[None, :], mask=row_live[:, None] & mask_d[None, :], other=0.0
    ).to(ACC)
    if SIGNED or HAS_IMPORTANCE:
        vals = vals * variant.to(ACC)[:, None]
    return vals, live


@triton.jit
def _sum_pool(
    IDS,
    PSW,
    SEEDS,
    W,
    IMPORTANCE,
    HOT,
    start,
    end,
    offs_d,
    mask_d,
    num_rows,
    stride_w,
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
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The bag's sum (or mean) on the columns ``offs_d``.

    The rows of the tile are (id, hash function) pairs, ``K`` per id in
    order: each thread hashes one pair, a bag of 20 ids at ``K = 4`` fills 80
    of 96 rows, and every row is one load of the table."""
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    live_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lanes = tl.arange(0, BLOCK_N)
    for first in range(start * K, end * K, BLOCK_N):
        pair = first + lanes
        offs_n = pair // K
        j = (pair % K).to(tl.int32)
        vals, live = _pair_block(
            offs_n,
            j,
            pair < end * K,
            IDS,
            SEEDS,
            W,
            IMPORTANCE,
            HOT,
            offs_d,
            mask_d,
            num_rows,
            stride_w,
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
            ACC,
        )
        if HAS_PSW:
            vals = vals * tl.load(PSW + offs_n, mask=live, other=0.0).to(ACC)[:, None]
        acc += tl.sum(vals, axis=0)
        if MODE == MODE_MEAN:
            live_count += (live & (j == 0)).to(tl.float32)
    if MODE == MODE_MEAN:
        acc = acc / tl.maximum(tl.sum(live_count), 1.0).to(ACC)
    return acc


@triton.jit
def _max_pool(
    IDS,
    SEEDS,
    W,
    IMPORTANCE,
    HOT,
    ARGMAX,
    bag,
    start,
    end,
    offs_d,
    mask_d,
    dim,
    num_rows,
    stride_w,
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
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The bag's column-wise max on the columns ``offs_d``, its positions
    stored into ``ARGMAX``: an id's vector is the sum of its ``K`` rows, so the
    rows of the tile are ids, each hashed by one thread."""
    best = tl.full((BLOCK_D,), float("-inf"), dtype=ACC)
    best_pos = tl.full((BLOCK_D,), -1, dtype=tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    if BLOCK_N % K == 0 and (K & (K - 1)) == 0:
        # K a power of two that divides the block: a block of pairs holds
        # BLOCK_N // K whole ids, hash function major, so that an id's K rows
        # lie BLOCK_N // K rows apart, in one thread in the layouts Triton
        # picks: its vector is summed in registers.
        for first in range(start, end, BLOCK_N // K):
            offs_n = first + lanes % (BLOCK_N // K)
            vals, live = _pair_block(
                offs_n,
                (lanes // (BLOCK_N // K)).to(tl.int32),
                offs_n < end,
                IDS,
                SEEDS,
                W,
                IMPORTANCE,
                HOT,
                offs_d,
                mask_d,
                num_rows,
                stride_w,
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
                ACC,
            )
            vectors = tl.sum(tl.reshape(vals, (K, BLOCK_N // K, BLOCK_D)), axis=0)
            id_live = tl.max(tl.reshape(live.to(tl.int32), (K, BLOCK_N // K)), axis=0) > 0
            vectors = tl.where(id_live[:, None], vectors, float("-inf"))
            step_best = tl.max(vectors, axis=0)
            step_pos = first + tl.argmax(vectors, axis=0).to(tl.int64)
            better = step_best > best
            best = tl.where(better, step_best, best)
            best_pos = tl.where(better, step_pos, best_pos)
    else:
        for first in range(start, end, BLOCK_N):
            offs_n = first + lanes
            ids, live = load_ids(IDS, offs_n, offs_n < end, padding_idx, HAS_PADDING)
            mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
                ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
            )
            vectors = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
            for j in range(K):
                rows, row_live = row_index(
                    ids,
                    live,
                    mixed_lo,
                    mixed_hi,
                    hot,
                    IDS,
                    offs_n,
                    SEEDS,
                    j,
                    num_rows,
                    live,
                    K,
                    False,
                    HAS_HOT,
                    WIDE_IDS,
                )
                vals = tl.load(
                    W + (rows * stride_w)[:, None] + offs_d[None, :],
                    mask=row_live[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(ACC)
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
                    vals = vals * factor.to(ACC)[:, None]
                vectors += vals
            vectors = tl.where(live[:, None], vectors, float("-inf"))
            step_best = tl.max(vectors, axis=0)
            step_pos = first + tl.argmax(vectors, axis=0).to(tl.int64)
            # Strictly greater: the first id reaching the max keeps it, as in
            # nn.EmbeddingBag, so the gradient goes to one id per column.
            better = step_best > best
            best = tl.where(better, step_best, best)
            best_pos = tl.where(better, step_pos, best_pos)
    tl.store(ARGMAX + bag * dim + offs_d, best_pos, mask=mask_d)
    return tl.where(best_pos >= 0, best, 0.0)


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
        bag_bucket=bag_bucket(ids.numel(), num_bags),
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
