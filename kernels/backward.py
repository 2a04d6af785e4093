"""Bloom embedding backward: scatter-add the output gradient into the ``k`` rows."""

import torch
import triton
import triton.language as tl

from .autotune import Tuning
from .launch import launch
from .hashing import bloom_rows, importance_row, premix_ids, row_factor


@triton.jit
def _bloom_backward_kernel(
    IDS,  # (n,) int32/int64 ids
    ROWS,  # (n, K) int32/int64 row indices, read only when PRECOMPUTED
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    GRAD_OUT,  # (n, dim) gradient of the output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64 for float64 tables) accumulator, contiguous, zeroed
    W,  # (num_rows, dim) the table, read only when HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    n,  # number of ids
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    padding_idx,  # id that adds no gradient (ignored unless HAS_PADDING)
    K: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < dim

    ids = tl.load(IDS + offs_n, mask=mask_n, other=0).to(tl.int64)
    live = mask_n
    if HAS_PADDING:
        live = live & (ids != padding_idx)
    mask = live[:, None] & mask_d[None, :]
    grad = tl.load(GRAD_OUT + offs_n[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
    grad = grad.to(GRAD_W.dtype.element_ty)
    mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
    imp_rows = ids
    if HAS_IMPORTANCE:
        imp_rows = importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS)

    for j in tl.static_range(K):
        if PRECOMPUTED:
            rows = tl.load(ROWS + offs_n * K + j, mask=live, other=0).to(tl.int64)
        else:
            rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
        contrib = grad
        if SIGNED or HAS_IMPORTANCE:
            sign, factor = row_factor(ids, mixed_lo, mixed_hi, SEEDS, IMPORTANCE, imp_rows, live, j, K, SIGNED,
                                      HAS_IMPORTANCE, WIDE_IDS)  # fmt: skip
            contrib = grad * factor.to(grad.dtype)[:, None]
        # Relaxed: the adds commute, and nothing reads GRAD_W until the kernel ends.
        tl.atomic_add(GRAD_W + rows[:, None] * dim + offs_d[None, :], contrib, mask=mask, sem="relaxed")
        if HAS_IMPORTANCE:
            # d out / d importance[r, j] = sign * <grad, W[row_j]>, one partial
            # sum per column block.
            vals = tl.load(W + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
            partial = tl.sum(grad * vals.to(grad.dtype), axis=1) * sign.to(grad.dtype)
            tl.atomic_add(GRAD_IMPORTANCE + imp_rows * K + j, partial, mask=live, sem="relaxed")


def bloom_backward(grad_out, ids, seeds, num_rows, num_hash_functions, padding_idx=None, rows=None,
                   wide_ids=True, dtype=None, signed=False, weight=None, importance=None):
    """Gradient of the Bloom forward with respect to the table.

    Args:
        grad_out (Tensor): ``(*, dim)`` gradient of the forward's output.
        ids (Tensor): the forward's ``(*)`` ids.
        seeds (Tensor): int32 seeds on the ids' device.
        num_rows (int): rows of the table.
        num_hash_functions (int): ``k``.
        padding_idx (int, optional): id that contributes no gradient.
        rows (Tensor, optional): precomputed ``(*, k)`` rows (hash cache).
        wide_ids (bool): whether ids may reach ``2**31``.
        dtype (torch.dtype, optional): dtype of the result (the table's);
            accumulation is in float32 (float64 for float64), cast once at the end.
        signed (bool), importance (Tensor, optional): the forward's variants;
            ``importance`` also needs the table, ``weight``.

    Returns:
        ``(grad_weight, grad_importance)``: the dense ``(num_rows, dim)``
        gradient, and the importance weights' (``None`` without them).
    """
    dim = grad_out.shape[-1]
    dtype = dtype or grad_out.dtype
    # Half-precision atomics are emulated with compare-and-swap loops and
    # contend badly: accumulate in float32 and cast once.
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_w = torch.zeros((num_rows, dim), dtype=acc_dtype, device=grad_out.device)
    grad_imp = None
    if importance is not None:
        grad_imp = torch.zeros(importance.shape, dtype=acc_dtype, device=grad_out.device)
    n = ids.numel()
    if n and dim:
        grad_out = grad_out.reshape(n, dim).contiguous()
        if weight is not None and weight.stride(1) != 1:
            weight = weight.contiguous()
        ids = ids.reshape(-1).contiguous()  # a strided 1-D view reshapes to itself
        rows = rows.reshape(n, num_hash_functions).contiguous() if rows is not None else None
        args = dict(
            IDS=ids,
            ROWS=rows if rows is not None else ids,
            SEEDS=seeds,
            GRAD_OUT=grad_out,
            GRAD_W=grad_w,
            W=weight if weight is not None else grad_w,
            IMPORTANCE=importance.contiguous() if importance is not None else grad_w,
            GRAD_IMPORTANCE=grad_imp if grad_imp is not None else grad_w,
            n=n,
            dim=dim,
            num_rows=num_rows,
            stride_w=weight.stride(0) if weight is not None else dim,
            importance_rows=importance.shape[0] if importance is not None else 1,
            padding_idx=-1 if padding_idx is None else padding_idx,
            K=num_hash_functions,
            HAS_PADDING=padding_idx is not None,
            PRECOMPUTED=rows is not None,
            SIGNED=signed,
            HAS_IMPORTANCE=importance is not None,
            WIDE_IDS=wide_ids,
        )

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

        launch(_bloom_backward_kernel, grid, args, grad_out.device,
               tuning=Tuning(reset_to_zero=("GRAD_W", "GRAD_IMPORTANCE")))
    grad_w = grad_w if dtype == acc_dtype else grad_w.to(dtype)
    if grad_imp is not None:
        grad_imp = grad_imp.to(importance.dtype)
    return grad_w, grad_imp
