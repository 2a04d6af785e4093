"""Bloom embedding bag backward: scatter-add each bag's output gradient into
the ``k`` rows of its ids (sum, mean), or of each column's arg-max id (max);
and the gradient of the per-sample weights."""

import dataclasses

import torch
import triton
import triton.language as tl

from .. import constants
from .autotune import TUNING_KEY, Tuning, bag_bucket
from .bag_forward import BAG_TUNING, MODE_MEAN
from .hashing import bloom_rows
from .launch import launch
from .lookup import (
    aligned,
    alignment_args,
    hashing_args,
    id_hashes,
    load_ids,
    padding_args,
    row_contiguous,
    scatter_sum,
    variant_factor,
)

# The max-pooled backward's tile is bags by columns, each column with an id
# of its own: its one tiling, which compiled without spills everywhere.
MAX_BACKWARD_TUNING = Tuning(
    key=TUNING_KEY, tiles=((32, 64, 8),), max_per_thread=(8, 8), reset_to_zero=("GRAD_W", "GRAD_IMPORTANCE")
)


@triton.jit(do_not_specialize=["bag_bucket"])
def _bloom_bag_backward_kernel(
    IDS,  # (n,) int32/int64 ids of all bags
    OFFSETS,  # (B + 1,) int64 bag starts, then n
    PSW,  # (n,) per-sample weights, read only when HAS_PSW
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) the table, read only when PSW_GRAD or HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    GRAD_OUT,  # (B, dim) gradient of the pooled output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64 for float64 tables) accumulator, zeroed
    GRAD_PSW,  # (n,) float32 (float64) accumulator for the per-sample weights, zeroed
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    hot_count,  # ids in HOT
    padding_idx,  # id left out of the pooling (ignored unless HAS_PADDING)
    bag_bucket,  # the tuning key's bag length (never read)
    K: tl.constexpr,
    MODE: tl.constexpr,  # MODE_SUM or MODE_MEAN
    HAS_PSW: tl.constexpr,
    PSW_GRAD: tl.constexpr,  # also compute the per-sample weights' gradient
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,  # the ids in HOT read their private rows instead of hashing
    HOT_STEPS: tl.constexpr,  # halvings of the binary search over HOT
    WIDE_IDS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # dim and stride_w are multiples of it (lookup.alignment_args)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dim = aligned(dim, ROW_ALIGN)
    stride_w = aligned(stride_w, ROW_ALIGN)
    bag = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    start = tl.load(OFFSETS + bag)
    end = tl.load(OFFSETS + bag + 1)
    acc_dtype = GRAD_W.dtype.element_ty
    grad = tl.load(GRAD_OUT + bag * dim + offs_d, mask=mask_d, other=0.0).to(acc_dtype)
    lanes = tl.arange(0, BLOCK_N)

    if MODE == MODE_MEAN:
        # The mean divides by the bag's live ids: count them first (ids only).
        live_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first in range(start, end, BLOCK_N):
            offs_n = first + lanes
            _, live = load_ids(IDS, offs_n, offs_n < end, padding_idx, HAS_PADDING)
            live_count += live.to(tl.float32)
        grad = grad / tl.maximum(tl.sum(live_count), 1.0).to(acc_dtype)

    # As in the forward, the rows of the tile are (id, hash function) pairs,
    # K per id in order, each hashed by one thread.
    for first in range(start * K, end * K, BLOCK_N):
        pair = first + lanes
        offs_n = pair // K
        j = (pair % K).to(tl.int32)
        ids, live = load_ids(IDS, offs_n, pair < end * K, padding_idx, HAS_PADDING)
        mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
            ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
        )
        rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j, mask=live, other=0), num_rows, WIDE_IDS)
        row_live = live
        if HAS_HOT:
            # A hot id writes its private row once, as its first pair.
            rows = tl.where(hot >= 0, num_rows + hot.to(tl.int64), rows)
            row_live = live & ((j == 0) | (hot < 0))
        mask = row_live[:, None] & mask_d[None, :]
        # d out / d W[row] = psw * sign * importance times the bag's gradient.
        psw = tl.full((BLOCK_N,), 1.0, acc_dtype)
        if HAS_PSW:
            psw = tl.load(PSW + offs_n, mask=live, other=0.0).to(acc_dtype)
        variant = tl.full((BLOCK_N,), 1.0, acc_dtype)
        sign = variant
        if SIGNED or HAS_IMPORTANCE:
            sign_f32, variant_w = variant_factor(
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
            variant = variant_w.to(acc_dtype)
            sign = sign_f32.to(acc_dtype)
        if HAS_PSW or SIGNED or HAS_IMPORTANCE:
            contrib = grad[None, :] * (psw * variant)[:, None]
        else:
            contrib = tl.broadcast_to(grad[None, :], (BLOCK_N, BLOCK_D))
        # Relaxed: the adds commute, and nothing reads GRAD_W until the kernel ends.
        tl.atomic_add(GRAD_W + (rows * dim)[:, None] + offs_d[None, :], contrib, mask=mask, sem="relaxed")
        if PSW_GRAD or HAS_IMPORTANCE:
            vals = tl.load(W + (rows * stride_w)[:, None] + offs_d[None, :], mask=mask, other=0.0).to(acc_dtype)
            # <W[row], grad> on this block of columns, one partial sum per pair.
            dot = tl.sum(vals * grad[None, :], axis=1)
            if PSW_GRAD:
                # d out[bag] / d psw[i] = sum_j variant_j <W[row_j], grad>.
                tl.atomic_add(GRAD_PSW + offs_n, dot * variant, mask=live, sem="relaxed")
            if HAS_IMPORTANCE:
                # d out / d importance[r, j] = sign * psw * <W[row_j], grad>.
                imp_live = live
                if HAS_HOT:
                    imp_live = live & (hot < 0)
                tl.atomic_add(GRAD_IMPORTANCE + imp_rows * K + j, dot * psw * sign, mask=imp_live, sem="relaxed")


@triton.jit
def _bloom_bag_max_backward_kernel(
    IDS,  # (n,) int32/int64 ids of all bags
    ARGMAX,  # (B, dim) int64 position in IDS of each column's max, -1 for none
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) the table, read only when HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    GRAD_OUT,  # (B, dim) gradient of the pooled output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64) accumulator, zeroed
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    num_bags,  # B
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    hot_count,  # ids in HOT
    K: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    HAS_HOT: tl.constexpr,  # the ids in HOT read their private rows instead of hashing
    HOT_STEPS: tl.constexpr,  # halvings of the binary search over HOT
    WIDE_IDS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # dim and stride_w are multiples of it (lookup.alignment_args)
    BLOCK_N: tl.constexpr,  # bags per program
    BLOCK_D: tl.constexpr,
):
    dim = aligned(dim, ROW_ALIGN)
    stride_w = aligned(stride_w, ROW_ALIGN)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tile = offs_b * dim + offs_d
    pos = tl.load(ARGMAX + tile, mask=(offs_b < num_bags) & (offs_d < dim), other=-1)
    # Each column of a bag has its own arg-max id: hash a tile of ids.
    ids, live = load_ids(IDS, pos, pos >= 0, -1, False)
    grad = tl.load(GRAD_OUT + tile, mask=live, other=0.0).to(GRAD_W.dtype.element_ty)
    mixed_lo, mixed_hi, imp_rows, hot = id_hashes(
        ids, SEEDS, importance_rows, HOT, hot_count, HOT_STEPS, HAS_IMPORTANCE, HAS_HOT, WIDE_IDS
    )
    scatter_sum(
        grad,
        ids,
        live,
        mixed_lo,
        mixed_hi,
        imp_rows,
        hot,
        IDS,
        pos,
        SEEDS,
        W,
        IMPORTANCE,
        GRAD_W,
        GRAD_IMPORTANCE,
        offs_d,
        live,
        dim,
        num_rows,
        stride_w,
        K,
        False,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        WIDE_IDS,
        True,
        False,
    )


def bloom_bag_backward(
    grad_out,
    ids,
    offsets,
    weight,
    seeds,
    *,
    num_hash_functions,
    mode=constants.MODE_SUM,
    per_sample_weights=None,
    argmax=None,
    padding_idx=None,
    wide_ids=True,
    psw_grad=False,
    signed=False,
    importance=None,
    hot=None,
):
    """Gradients of :func:`bloom_bag_forward`.

    Args:
        grad_out (Tensor): ``(B, dim)`` gradient of the pooled output.
        ids, offsets, weight, seeds, num_hash_functions, mode, per_sample_weights,
        padding_idx, wide_ids: as given to the forward (``weight`` is read
            only for ``psw_grad``).
        argmax (Tensor, optional): the forward's ``(B, dim)`` arg-max (max mode).
        psw_grad (bool): also return the per-sample weights' gradient.
        signed (bool), importance (Tensor, optional), hot (Tensor, optional):
            the forward's variants.

    Returns:
        ``(grad_weight, grad_per_sample_weights, grad_importance)``: the dense
        ``(num_rows, dim)`` gradient in ``weight``'s dtype, accumulated in
        float32 (float64 for float64) and cast once; the ``(n,)`` gradient or
        ``None``; the importance weights' gradient or ``None``.
    """
    num_rows, dim = weight.shape
    num_bags = offsets.numel() - 1
    n = ids.numel()
    acc_dtype = constants.accumulation_dtype(weight.dtype)
    grad_w = torch.zeros((num_rows, dim), dtype=acc_dtype, device=weight.device)
    grad_psw = torch.zeros((n,), dtype=acc_dtype, device=weight.device) if psw_grad else None
    grad_imp = torch.zeros(importance.shape, dtype=acc_dtype, device=weight.device) if importance is not None else None
    if num_bags and dim and n:
        grad_out = grad_out.contiguous()
        ids = ids.reshape(-1).contiguous()
        weight = row_contiguous(weight)
        common = dict(
            SEEDS=seeds,
            GRAD_OUT=grad_out,
            GRAD_W=grad_w,
            GRAD_IMPORTANCE=grad_imp if grad_imp is not None else grad_w,
            dim=dim,
            **alignment_args(weight, dim),
            **hashing_args(
                weight,
                num_hash_functions=num_hash_functions,
                wide_ids=wide_ids,
                signed=signed,
                importance=importance,
                hot=hot,
                absent=grad_w,
            ),
        )
        if mode == constants.MODE_MAX:
            args = dict(IDS=ids, ARGMAX=argmax.contiguous(), num_bags=num_bags, **common)

            def grid(meta):
                return (triton.cdiv(num_bags, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

            launch(
                _bloom_bag_max_backward_kernel,
                grid,
                args,
                weight.device,
                tuning=MAX_BACKWARD_TUNING,
            )
        else:
            args = dict(
                IDS=ids,
                OFFSETS=offsets.contiguous(),
                PSW=per_sample_weights.contiguous() if per_sample_weights is not None else grad_w,
                GRAD_PSW=grad_psw if grad_psw is not None else grad_w,
                MODE=mode,
                HAS_PSW=per_sample_weights is not None,
                PSW_GRAD=psw_grad,
                bag_bucket=bag_bucket(n, num_bags),
                **common,
                **padding_args(padding_idx),
            )

            def grid(meta):
                return (num_bags, triton.cdiv(dim, meta["BLOCK_D"]))

            launch(
                _bloom_bag_backward_kernel,
                grid,
                args,
                weight.device,
                tuning=dataclasses.replace(BAG_TUNING, reset_to_zero=("GRAD_W", "GRAD_PSW", "GRAD_IMPORTANCE")),
            )
    grad_w = grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)
    if grad_psw is not None and per_sample_weights is not None and grad_psw.dtype != per_sample_weights.dtype:
        grad_psw = grad_psw.to(per_sample_weights.dtype)
    if grad_imp is not None:
        grad_imp = grad_imp.to(importance.dtype)
    return grad_w, grad_psw, grad_imp
