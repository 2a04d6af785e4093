"""Bloom embedding backward: scatter-add the output gradient into the ``k`` rows."""

import torch
import triton
import triton.language as tl

from ..constants import accumulation_dtype
from .autotune import Tuning
from .launch import launch
from .lookup import (
    aligned,
    alignment_args,
    hashing_args,
    id_args,
    id_hashes,
    load_ids,
    padding_args,
    row_contiguous,
    scatter_sum,
)


@triton.jit
def _bloom_backward_kernel(
    IDS,  # (n,) int32/int64 ids
    ROWS,  # (n, K) int32/int64 row indices, read only when PRECOMPUTED
    SEEDS,  # (49,) int32 murmurhash3 seeds: rows, signs, importance
    GRAD_OUT,  # (n, dim) gradient of the output, contiguous
    GRAD_W,  # (num_rows, dim) float32 (float64 for float64 tables) accumulator, contiguous, zeroed
    W,  # (num_rows, dim) the table, read only when HAS_IMPORTANCE
    IMPORTANCE,  # (importance_rows, K) importance weights, read only when HAS_IMPORTANCE
    HOT,  # (hot_count,) sorted ids with private rows num_rows.., read only when HAS_HOT
    GRAD_IMPORTANCE,  # (importance_rows, K) float32 (float64) accumulator, zeroed
    n,  # number of ids
    dim,  # embedding_dim
    num_rows,  # rows of the table, the modulus of the hash
    stride_w,  # elements between two rows of W
    importance_rows,  # rows of IMPORTANCE
    hot_count,  # ids in HOT
    padding_idx,  # id that adds no gradient (ignored unless HAS_PADDING)
    K: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
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
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    ids, live = load_ids(IDS, offs_n, offs_n < n, padding_idx, HAS_PADDING)
    mask = live & (offs_d < dim)
    grad = tl.load(GRAD_OUT + offs_n * dim + offs_d, mask=mask, other=0.0).to(GRAD_W.dtype.element_ty)
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
        ROWS,
        offs_n,
        SEEDS,
        W,
        IMPORTANCE,
        GRAD_W,
        GRAD_IMPORTANCE,
        offs_d,
        mask,
        dim,
        num_rows,
        stride_w,
        K,
        PRECOMPUTED,
        SIGNED,
        HAS_IMPORTANCE,
        HAS_HOT,
        WIDE_IDS,
        False,
        False,
    )


def bloom_backward(
    grad_out,
    ids,
    seeds,
    *,
    num_rows,
    num_hash_functions,
    padding_idx=None,
    rows=None,
    wide_ids=True,
    dtype=None,
    signed=False,
    weight=None,
    importance=None,
    hot=None,
):
    """Gradient of the Bloom forward with respect to the table.

    Args:
        grad_out (Tensor): ``(*, dim)`` gradient of the forward's output.
        ids (Tensor): the forward's ``(*)`` ids.
        seeds (Tensor): int32 seeds on the ids' device.
        num_rows (int): rows of the table (private rows included).
        num_hash_functions (int): ``k``.
        padding_idx (int, optional): id that contributes no gradient.
        rows (Tensor, optional): precomputed ``(*, k)`` rows (hash cache).
        wide_ids (bool): whether ids may reach ``2**31``.
        dtype (torch.dtype, optional): dtype of the result (the table's);
            accumulation is in float32 (float64 for float64), cast once at the end.
        signed (bool), importance (Tensor, optional): the forward's variants;
            ``importance`` also needs the table, ``weight``.
        hot (Tensor, optional): the forward's ``(H,)`` sorted hot ids.

    Returns:
        ``(grad_weight, grad_importance)``: the dense ``(num_rows, dim)``
        gradient, and the importance weights' (``None`` without them).
    """
    dim = grad_out.shape[-1]
    dtype = dtype or grad_out.dtype
    # Half-precision atomics are emulated with compare-and-swap loops and
    # contend badly: accumulate in float32 and cast once.
    acc_dtype = accumulation_dtype(dtype)
    grad_w = torch.zeros((num_rows, dim), dtype=acc_dtype, device=grad_out.device)
    grad_imp = None
    if importance is not None:
        grad_imp = torch.zeros(importance.shape, dtype=acc_dtype, device=grad_out.device)
    n = ids.numel()
    if n and dim:
        grad_out = grad_out.reshape(n, dim).contiguous()
        # The table is read only for the importance weights' gradient; the
        # accumulator, of the table's shape, stands in for it otherwise (and
        # then a strided table does not narrow ROW_ALIGN).
        table = row_contiguous(weight) if weight is not None and importance is not None else grad_w
        args = dict(
            SEEDS=seeds,
            GRAD_OUT=grad_out,
            GRAD_W=grad_w,
            GRAD_IMPORTANCE=grad_imp if grad_imp is not None else grad_w,
            n=n,
            dim=dim,
            **id_args(ids, rows, num_hash_functions),
            **alignment_args(table, dim),
            **hashing_args(
                table,
                num_hash_functions=num_hash_functions,
                wide_ids=wide_ids,
                signed=signed,
                importance=importance,
                hot=hot,
                absent=grad_w,
            ),
            **padding_args(padding_idx),
        )

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(dim, meta["BLOCK_D"]))

        launch(
            _bloom_backward_kernel,
            grid,
            args,
            grad_out.device,
            tuning=Tuning(reset_to_zero=("GRAD_W", "GRAD_IMPORTANCE")),
        )
    grad_w = grad_w if dtype == acc_dtype else grad_w.to(dtype)
    if grad_imp is not None:
        grad_imp = grad_imp.to(importance.dtype)
    return grad_w, grad_imp
