"""Bloom embedding bag backward: scatter-add each bag's output gradient into
the ``k`` rows of its ids (sum, mean), or of each column's arg-max id (max);
and the gradient of the per-sample weights."""

import torch
import triton
import triton.language as tl

from .autotune import Tuning
from .launch import launch
from .bag_forward import BAG_TUNING_KEY, MODE_MAX, MODE_SUM
from .hashing import bloom_rows, importance_row, premix_ids, row_factor


@triton.jit
def _bloom_bag_backward_kernel(
    IDS,  # (n,) int32/int64 ids of all bags
    OFFSETS,  # (B + 1,) int64 bag starts, then n
    PSW,  # (n,) per-sample weights, read only when HAS_PSW
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) the table, read only when PSW_GRAD or HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    GRAD_OUT,  # (B, dim) gradient of the pooled output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64 for float64 tables) accumulator, zeroed
    GRAD_PSW,  # (n,) float32 (float64) accumulator for the per-sample weights, zeroed
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    padding_idx,  # id left out of the pooling (ignored unless HAS_PADDING)
    K: tl.constexpr,
    MODE: tl.constexpr,  # 0 sum, 1 mean
    HAS_PSW: tl.constexpr,
    PSW_GRAD: tl.constexpr,  # also compute the per-sample weights' gradient
    HAS_PADDING: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    start = tl.load(OFFSETS + bag)
    end = tl.load(OFFSETS + bag + 1)
    grad = tl.load(GRAD_OUT + bag * dim + offs_d, mask=mask_d, other=0.0).to(GRAD_W.dtype.element_ty)

    if MODE == 1:
        # The mean divides by the bag's live ids: count them first (ids only).
        live_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first in range(start, end, BLOCK_N):
            offs_n = first + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            live = mask_n
            if HAS_PADDING:
                ids = tl.load(IDS + offs_n, mask=mask_n, other=0).to(tl.int64)
                live = live & (ids != padding_idx)
            live_count += live.to(tl.float32)
        grad = grad / tl.maximum(tl.sum(live_count, axis=0), 1.0).to(grad.dtype)

    for first in range(start, end, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        ids = tl.load(IDS + offs_n, mask=mask_n, other=0).to(tl.int64)
        live = mask_n
        if HAS_PADDING:
            live = live & (ids != padding_idx)
        mask = live[:, None] & mask_d[None, :]
        contrib = tl.broadcast_to(grad[None, :], (BLOCK_N, BLOCK_D))
        if HAS_PSW:
            psw = tl.load(PSW + offs_n, mask=live, other=0.0).to(grad.dtype)
            contrib = contrib * psw[:, None]
        if PSW_GRAD:
            vectors = tl.zeros((BLOCK_N, BLOCK_D), dtype=grad.dtype)
        mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
        imp_rows = ids
        if HAS_IMPORTANCE:
            imp_rows = importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS)
        for j in tl.static_range(K):
            rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
            row_contrib = contrib
            factor = tl.full((BLOCK_N,), 1.0, tl.float32)
            if SIGNED or HAS_IMPORTANCE:
                sign, factor = row_factor(ids, mixed_lo, mixed_hi, SEEDS, IMPORTANCE, imp_rows, live, j, K,
                                          SIGNED, HAS_IMPORTANCE, WIDE_IDS)  # fmt: skip
                row_contrib = contrib * factor.to(grad.dtype)[:, None]
            tl.atomic_add(GRAD_W + rows[:, None] * dim + offs_d[None, :], row_contrib, mask=mask, sem="relaxed")
            if PSW_GRAD or HAS_IMPORTANCE:
                vals = tl.load(W + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
                vals = vals.to(grad.dtype)
                if PSW_GRAD:
                    vectors += vals * factor.to(grad.dtype)[:, None]
                if HAS_IMPORTANCE:
                    # d out[bag] / d importance[r, j] = weight_i * sign * <grad, W[row_j]>.
                    partial = tl.sum(contrib * vals, axis=1) * sign.to(grad.dtype)
                    tl.atomic_add(GRAD_IMPORTANCE + imp_rows * K + j, partial, mask=live, sem="relaxed")
        if PSW_GRAD:
            # d out[bag] / d psw[i] = the id's vector: dot it with the gradient,
            # one partial sum per column block.
            partial = tl.sum(vectors * grad[None, :], axis=1)
            tl.atomic_add(GRAD_PSW + offs_n, partial, mask=live, sem="relaxed")


@triton.jit
def _bloom_bag_max_backward_kernel(
    IDS,  # (n,) int32/int64 ids of all bags
    ARGMAX,  # (B, dim) int64 position in IDS of each column's max, -1 for none
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    W,  # (num_rows, dim) the table, read only when HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    GRAD_OUT,  # (B, dim) gradient of the pooled output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64) accumulator, zeroed
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    num_bags,  # B
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    K: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # bags per program
    BLOCK_D: tl.constexpr,
):
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile = offs_b[:, None] * dim + offs_d[None, :]
    in_range = (offs_b < num_bags)[:, None] & (offs_d < dim)[None, :]
    pos = tl.load(ARGMAX + tile, mask=in_range, other=-1)
    mask = in_range & (pos >= 0)
    # Each column of a bag has its own arg-max id: hash a tile of ids.
    ids = tl.load(IDS + pos, mask=mask, other=0).to(tl.int64)
    grad = tl.load(GRAD_OUT + tile, mask=mask, other=0.0).to(GRAD_W.dtype.element_ty)
    mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
    imp_rows = ids
    if HAS_IMPORTANCE:
        imp_rows = importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS)
    for j in tl.static_range(K):
        rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
        contrib = grad
        if SIGNED or HAS_IMPORTANCE:
            sign, factor = row_factor(ids, mixed_lo, mixed_hi, SEEDS, IMPORTANCE, imp_rows, mask, j, K, SIGNED,
                                      HAS_IMPORTANCE, WIDE_IDS)  # fmt: skip
            contrib = grad * factor.to(grad.dtype)
        tl.atomic_add(GRAD_W + rows * dim + offs_d[None, :], contrib, mask=mask, sem="relaxed")
        if HAS_IMPORTANCE:
            vals = tl.load(W + rows * stride_w + offs_d[None, :], mask=mask, other=0.0).to(grad.dtype)
            tl.atomic_add(GRAD_IMPORTANCE + imp_rows * K + j, grad * vals * sign.to(grad.dtype), mask=mask,
                          sem="relaxed")  # fmt: skip


def bloom_bag_backward(grad_out, ids, offsets, weight, seeds, num_hash_functions, mode=MODE_SUM,
                       per_sample_weights=None, argmax=None, padding_idx=None, wide_ids=True,
                       psw_grad=False, signed=False, importance=None):  # fmt: skip
    """Gradients of :func:`bloom_bag_forward`.

    Args:
        grad_out (Tensor): ``(B, dim)`` gradient of the pooled output.
        ids, offsets, weight, seeds, num_hash_functions, mode, per_sample_weights,
        padding_idx, wide_ids: as given to the forward (``weight`` is read
            only for ``psw_grad``).
        argmax (Tensor, optional): the forward's ``(B, dim)`` arg-max (max mode).
        psw_grad (bool): also return the per-sample weights' gradient.
        signed (bool), importance (Tensor, optional): the forward's variants.

    Returns:
        ``(grad_weight, grad_per_sample_weights, grad_importance)``: the dense
        ``(num_rows, dim)`` gradient in ``weight``'s dtype, accumulated in
        float32 (float64 for float64) and cast once; the ``(n,)`` gradient or
        ``None``; the importance weights' gradient or ``None``.
    """
    num_rows, dim = weight.shape
    num_bags = offsets.numel() - 1
    n = ids.numel()
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_w = torch.zeros((num_rows, dim), dtype=acc_dtype, device=weight.device)
    grad_psw = torch.zeros((n,), dtype=acc_dtype, device=weight.device) if psw_grad else None
    grad_imp = torch.zeros(importance.shape, dtype=acc_dtype, device=weight.device) if importance is not None else None
    if num_bags and dim and n:
        grad_out = grad_out.contiguous()
        ids = ids.reshape(-1).contiguous()
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        variants = dict(
            IMPORTANCE=importance.contiguous() if importance is not None else grad_w,
            GRAD_IMPORTANCE=grad_imp if grad_imp is not None else grad_w,
            importance_rows=importance.shape[0] if importance is not None else 1,
            SIGNED=signed,
            HAS_IMPORTANCE=importance is not None,
        )
        if mode == MODE_MAX:
            args = dict(IDS=ids, ARGMAX=argmax.contiguous(), SEEDS=seeds, W=weight, GRAD_OUT=grad_out, GRAD_W=grad_w,
                        num_bags=num_bags, dim=dim, num_rows=num_rows, stride_w=weight.stride(0),
                        K=num_hash_functions, WIDE_IDS=wide_ids, **variants)  # fmt: skip

            def grid(meta):
                return (triton.cdiv(num_bags, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

            launch(_bloom_bag_max_backward_kernel, grid, args, weight.device,
                   tuning=Tuning(reset_to_zero=("GRAD_W", "GRAD_IMPORTANCE")))
        else:
            args = dict(
                IDS=ids,
                OFFSETS=offsets.contiguous(),
                PSW=per_sample_weights.contiguous() if per_sample_weights is not None else grad_w,
                SEEDS=seeds,
                W=weight,
                GRAD_OUT=grad_out,
                GRAD_W=grad_w,
                GRAD_PSW=grad_psw if grad_psw is not None else grad_w,
                dim=dim,
                num_rows=num_rows,
                stride_w=weight.stride(0),
                padding_idx=-1 if padding_idx is None else padding_idx,
                K=num_hash_functions,
                MODE=mode,
                HAS_PSW=per_sample_weights is not None,
                PSW_GRAD=psw_grad,
                HAS_PADDING=padding_idx is not None,
                WIDE_IDS=wide_ids,
                **variants,
            )

            def grid(meta):
                return (num_bags, triton.cdiv(dim, meta["BLOCK_D"]))

            launch(_bloom_bag_backward_kernel, grid, args, weight.device,
                   tuning=Tuning(reset_to_zero=("GRAD_W", "GRAD_PSW", "GRAD_IMPORTANCE"), key=BAG_TUNING_KEY))
    grad_w = grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)
    if grad_psw is not None and per_sample_weights is not None and grad_psw.dtype != per_sample_weights.dtype:
        grad_psw = grad_psw.to(per_sample_weights.dtype)
    if grad_imp is not None:
        grad_imp = grad_imp.to(importance.dtype)
    return grad_w, grad_psw, grad_imp
