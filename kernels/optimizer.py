"""Fused sparse optimizers: update only the touched rows of the table, from
their aggregated gradients, in place; no dense gradient ever exists."""

import triton
import triton.language as tl

from .. import constants
from .launch import launch

# The optimizer codes of triton_bloom/constants.py, as the kernel reads them.
FUSED_ROWWISE_ADAGRAD = tl.constexpr(constants.FUSED_ROWWISE_ADAGRAD)


# Rows a program updates, and the most columns it takes at a time: a block of
# rows per program, since one row is a few hundred bytes.
UPDATE_BLOCK_S = 16
UPDATE_BLOCK_D = 128


@triton.jit
def _bloom_rowwise_update_kernel(
    ROWS,  # (u,) int64 unique touched rows
    VALUES,  # (u, dim) float32/float64 their summed gradients, contiguous
    W,  # (num_rows, dim) the table, updated in place; rows `stride_w` apart
    STATE,  # (num_rows,) float32 row-wise Adagrad sums of mean squared gradients
    u,  # touched rows
    dim,  # embedding_dim
    stride_w,  # elements between two rows of W
    lr,  # learning rate
    eps,  # Adagrad's denominator floor
    OPTIMIZER: tl.constexpr,  # FUSED_SGD or FUSED_ROWWISE_ADAGRAD
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < u
    rows = tl.load(ROWS + offs_s, mask=mask_s, other=0)
    step = tl.full((BLOCK_S,), lr, tl.float32)
    if OPTIMIZER == FUSED_ROWWISE_ADAGRAD:
        # Row-wise Adagrad needs the whole row's gradient before any update.
        squares = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_s[:, None] & (offs_d < dim)[None, :]
            g = tl.load(VALUES + offs_s[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            squares += g * g
        state = tl.load(STATE + rows, mask=mask_s, other=0.0) + tl.sum(squares, axis=1) / dim
        tl.store(STATE + rows, state, mask=mask_s)
        step = lr / (tl.sqrt(state) + eps)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_s[:, None] & (offs_d < dim)[None, :]
        g = tl.load(VALUES + offs_s[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
        ptrs = W + rows[:, None] * stride_w + offs_d[None, :]
        w = tl.load(ptrs, mask=mask, other=0.0)
        acc_ty = VALUES.dtype.element_ty
        tl.store(ptrs, (w.to(acc_ty) - step[:, None] * g).to(W.dtype.element_ty), mask=mask)


def bloom_rowwise_update(weight, rows, values, *, optimizer, lr, eps=0.0, state=None):
    """Apply one optimizer step to ``weight``'s ``rows``, in place.

    Args:
        weight (Tensor): the ``(num_rows, dim)`` table.
        rows (Tensor): ``(u,)`` unique rows (from ``bloom_row_gradients``).
        values (Tensor): their ``(u, dim)`` gradients.
        optimizer (int): ``FUSED_SGD`` or ``FUSED_ROWWISE_ADAGRAD``.
        lr (float): learning rate.
        eps (float): row-wise Adagrad's ``eps``.
        state (Tensor, optional): ``(num_rows,)`` float32 row-wise Adagrad state,
            updated in place.
    """
    dim = weight.shape[1]
    if rows.numel() == 0 or dim == 0:
        return
    if weight.stride(1) != 1:
        raise ValueError("fused optimizers update the table in place: its rows must be contiguous")
    args = dict(
        ROWS=rows.contiguous(),
        VALUES=values.contiguous(),
        W=weight,
        STATE=state if state is not None else values,
        u=rows.numel(),
        dim=dim,
        stride_w=weight.stride(0),
        lr=float(lr),
        eps=float(eps),
        OPTIMIZER=optimizer,
    )
    launch(
        _bloom_rowwise_update_kernel,
        lambda meta: (triton.cdiv(rows.numel(), meta["BLOCK_S"]),),
        args,
        weight.device,
        config={
            "kwargs": {"BLOCK_S": UPDATE_BLOCK_S, "BLOCK_D": min(UPDATE_BLOCK_D, triton.next_power_of_2(dim))},
            "num_warps": 4,
            "num_stages": 1,
        },
    )
