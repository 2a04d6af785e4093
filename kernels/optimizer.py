"""Fused sparse optimizers: each touched row's gradient summed and the row
updated in one kernel, in registers, in place; neither a dense gradient nor
the ``(touched rows, dim)`` sums ever reach memory.  Rows are taken in the
order of their segments' lengths, as ``segment.py`` sums them.

Half-precision tables may be stochastically rounded (see
``triton_bloom/rounding.py``, whose bits these kernels reproduce).
"""

import torch
import triton
import triton.language as tl

from .. import constants
from ..constants import accumulation_dtype
from .hashing import _fmix32
from .launch import launch
from .lookup import accumulator
from .segment import SEGMENT_BLOCK_S, SEGMENT_BLOCK_S_WIDE, segment_sums, sorted_entries

# The optimizer codes of triton_bloom/constants.py, as the kernel reads them.
FUSED_ROWWISE_ADAGRAD = tl.constexpr(constants.FUSED_ROWWISE_ADAGRAD)

# Columns a program takes at a time.  Row-wise Adagrad needs a row's whole
# gradient before updating it: up to STEP_WHOLE_ROW_D columns the program
# keeps the row's sums in registers, wider rows are summed twice (once for
# the accumulator, once for the update).
STEP_BLOCK_D = 64
STEP_WHOLE_ROW_D = 128


@triton.jit
def _round_bfloat16(x, bits):
    # The low 16 random bits carry into the kept half with probability (x - lo) / (hi - lo).
    raw = x.to(tl.uint32, bitcast=True)
    rounded = ((raw + (bits & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded).to(tl.bfloat16)


@triton.jit
def _nearest_bfloat16(x):
    # Round to nearest, ties to even, spelled out: a GPU's conversion does
    # this, but Triton's interpreter truncates (and ignores
    # fp_downcast_rounding), which would bias every interpreted step toward zero.
    raw = x.to(tl.uint32, bitcast=True)
    rounded = ((raw + 0x7FFF + ((raw >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded).to(tl.bfloat16)


@triton.jit
def _round_float16(x, bits):
    nearest = x.to(tl.float16)
    near = nearest.to(tl.float32)
    magnitude = tl.abs(x)
    away = tl.abs(near) > magnitude
    # The neighbour on the other side of x: one step of the int16 bits toward or away from zero.
    other_bits = nearest.to(tl.int16, bitcast=True).to(tl.int32) + tl.where(away, -1, 1)
    other = other_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    lo = tl.abs(tl.where(away, other, near))
    hi = tl.abs(tl.where(away, near, other))
    uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2 ** -24
    up = uniform * (hi - lo) < magnitude - lo
    chosen = tl.where(up == away, near, other)
    return tl.where(tl.abs(near) < float("inf"), chosen, near).to(tl.float16)


@triton.jit
def _store_rows(W, rows, offs_d, mask, updated, row_keys, stride_w, ROUND: tl.constexpr):
    """Store the ``(BLOCK_S, BLOCK_D)`` updated rows into the table, rounded
    stochastically with the element's bits when ``ROUND``."""
    ptrs = W + rows * stride_w + offs_d
    if ROUND:
        bits = _fmix32(row_keys ^ offs_d.to(tl.uint32))
        if W.dtype.element_ty == tl.bfloat16:
            out = _round_bfloat16(updated.to(tl.float32), bits)
        else:
            out = _round_float16(updated.to(tl.float32), bits)
    elif W.dtype.element_ty == tl.bfloat16:
        out = _nearest_bfloat16(updated.to(tl.float32))
    else:
        out = updated.to(W.dtype.element_ty)
    tl.store(ptrs, out, mask=mask)


@triton.jit
def _update(W, rows, offs_d, mask, sums, step, row_keys, stride_w, ROUND: tl.constexpr):
    w = tl.load(W + rows * stride_w + offs_d, mask=mask, other=0.0)
    _store_rows(W, rows, offs_d, mask, w.to(sums.dtype) - step * sums, row_keys, stride_w, ROUND)


@triton.jit
def _bloom_segment_step_kernel(
    ORDER,  # (u,) int64 the segments by length: program p takes ORDER[p * BLOCK_S:(p + 1) * BLOCK_S]
    SEGMENTS,  # (u + 1,) int64: entries SEGMENTS[r]:SEGMENTS[r + 1] belong to unique row r
    SOURCES,  # (m,) int64 row of GRAD each entry adds, sorted by destination row
    SCALES,  # (m,) float scale of each entry, read only when HAS_SCALE
    GRAD,  # (s, dim) per-source gradients, contiguous
    ROWS,  # (u,) int64 the unique rows
    W,  # (num_rows, dim) the table, updated in place; rows `stride_w` apart
    STATE,  # (num_rows,) float32 row-wise Adagrad sums of mean squared gradients
    ROUNDING,  # (2,) int64 stochastic rounding's seed and step, read only when ROUND
    u,  # unique rows
    dim,  # embedding_dim
    stride_w,  # elements between two rows of W
    lr,  # learning rate
    eps,  # Adagrad's denominator floor
    HAS_SCALE: tl.constexpr,
    OPTIMIZER: tl.constexpr,  # FUSED_SGD or FUSED_ROWWISE_ADAGRAD
    ROUND: tl.constexpr,  # stochastic rounding into a bfloat16 or float16 W
    ACC: tl.constexpr,  # float32 (float64 for float64 gradients)
    WHOLE_ROW: tl.constexpr,  # BLOCK_D >= dim (Adagrad: keep the row's sums)
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    mask_s = block < u
    offs_s = tl.load(ORDER + block, mask=mask_s, other=0)
    rows = tl.load(ROWS + offs_s, mask=mask_s, other=0)
    row_keys = rows.to(tl.uint32)
    if ROUND:
        base = _fmix32(_fmix32(tl.load(ROUNDING).to(tl.uint32)) ^ tl.load(ROUNDING + 1).to(tl.uint32))
        row_keys = _fmix32(base ^ rows.to(tl.uint32))
    arange_d = tl.arange(0, BLOCK_D)[None, :]
    if OPTIMIZER == FUSED_ROWWISE_ADAGRAD:
        if WHOLE_ROW:
            mask_d = arange_d < dim
            sums = segment_sums(SEGMENTS, SOURCES, SCALES, GRAD, offs_s, mask_s, arange_d, mask_d, dim, HAS_SCALE, ACC)
            sums32 = sums.to(tl.float32)
            squares = tl.sum(sums32 * sums32, axis=1)[:, None]
        else:
            squares = tl.zeros((BLOCK_S, 1), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + arange_d
                part = segment_sums(
                    SEGMENTS, SOURCES, SCALES, GRAD, offs_s, mask_s, offs_d, offs_d < dim, dim, HAS_SCALE, ACC
                ).to(tl.float32)
                squares += tl.sum(part * part, axis=1)[:, None]
        state = tl.load(STATE + rows, mask=mask_s, other=0.0) + squares / dim
        tl.store(STATE + rows, state, mask=mask_s)
        step = lr / (tl.sqrt(state) + eps)
        if WHOLE_ROW:
            _update(W, rows, arange_d, mask_s & mask_d, sums, step, row_keys, stride_w, ROUND)
        else:
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + arange_d
                mask_d = offs_d < dim
                sums = segment_sums(
                    SEGMENTS, SOURCES, SCALES, GRAD, offs_s, mask_s, offs_d, mask_d, dim, HAS_SCALE, ACC
                )
                _update(W, rows, offs_d, mask_s & mask_d, sums, step, row_keys, stride_w, ROUND)
    else:
        offs_d = tl.program_id(1) * BLOCK_D + arange_d
        mask_d = offs_d < dim
        sums = segment_sums(SEGMENTS, SOURCES, SCALES, GRAD, offs_s, mask_s, offs_d, mask_d, dim, HAS_SCALE, ACC)
        step = tl.full((BLOCK_S, 1), lr, tl.float32)
        _update(W, rows, offs_d, mask_s & mask_d, sums, step, row_keys, stride_w, ROUND)


def step_config(dim, acc_dtype, optimizer):
    """The step kernel's fixed tiling: ``BLOCK_S`` rows x ``BLOCK_D`` columns
    (Adagrad: the whole row up to ``STEP_WHOLE_ROW_D`` columns)."""
    block_s = SEGMENT_BLOCK_S_WIDE if acc_dtype == torch.float64 else SEGMENT_BLOCK_S
    width = max(16, triton.next_power_of_2(dim))
    whole = optimizer == constants.FUSED_ROWWISE_ADAGRAD and width <= STEP_WHOLE_ROW_D
    block_d = width if whole else min(STEP_BLOCK_D, width)
    if optimizer == constants.FUSED_ROWWISE_ADAGRAD and not whole:
        # Summed twice, the row's two loops spilled at 32 rows (Triton 3.6, sm_80): half the rows.
        block_s = SEGMENT_BLOCK_S_WIDE
    return {
        "kwargs": {"BLOCK_S": block_s, "BLOCK_D": block_d, "WHOLE_ROW": block_d >= dim},
        "num_warps": 4,
        "num_stages": 1,
    }


def _launch_step(weight, unique_rows, segments, sources, scales, order, grad, *, optimizer, lr, eps, state, rounding):
    dim = weight.shape[1]
    u = unique_rows.numel()
    if u and dim:
        if weight.stride(1) != 1:
            raise ValueError("fused optimizers update the table in place: its rows must be contiguous")
        args = dict(
            ORDER=order,
            SEGMENTS=segments,
            SOURCES=sources,
            SCALES=scales if scales is not None else segments,
            GRAD=grad.contiguous(),
            ROWS=unique_rows.contiguous(),
            W=weight,
            STATE=state if state is not None else segments,
            ROUNDING=rounding if rounding is not None else segments,
            u=u,
            dim=dim,
            stride_w=weight.stride(0),
            lr=float(lr),
            eps=float(eps),
            HAS_SCALE=scales is not None,
            OPTIMIZER=optimizer,
            ROUND=rounding is not None and weight.dtype in (torch.bfloat16, torch.float16),
            ACC=accumulator(grad.dtype),
        )
        adagrad = optimizer == constants.FUSED_ROWWISE_ADAGRAD
        launch(
            _bloom_segment_step_kernel,
            lambda meta: (triton.cdiv(u, meta["BLOCK_S"]), 1 if adagrad else triton.cdiv(dim, meta["BLOCK_D"])),
            args,
            weight.device,
            config=step_config(dim, accumulation_dtype(grad.dtype), optimizer),
        )
    if rounding is not None:
        # One step, one key: the next step draws fresh bits (even when this one touched no row).
        rounding[1] += 1


def bloom_segment_step(
    weight, rows, sources, grad, *, scales=None, keep=None, optimizer, lr, eps=0.0, state=None, rounding=None
):
    """One fused optimizer step from the entries' gradients: each touched
    row's gradient summed (as ``bloom_row_gradients`` sums it) and the row
    updated, in one kernel.

    Args:
        weight (Tensor): the ``(num_rows, dim)`` table, updated in place.
        rows, sources, grad, scales, keep: the entries, as
            ``bloom_row_gradients`` takes them.
        optimizer (int): ``FUSED_SGD`` or ``FUSED_ROWWISE_ADAGRAD``.
        lr (float), eps (float): the optimizer's.
        state (Tensor, optional): ``(num_rows,)`` float32 row-wise Adagrad
            state, updated in place.
        rounding (Tensor, optional): ``(2,)`` int64 seed and step of
            stochastic rounding (bfloat16 and float16 tables; ignored for
            others); its step is incremented.
    """
    unique_rows, segments, sorted_sources, sorted_scales, by_length = sorted_entries(rows, sources, scales, keep)
    _launch_step(
        weight,
        unique_rows,
        segments,
        sorted_sources,
        sorted_scales,
        by_length,
        grad,
        optimizer=optimizer,
        lr=lr,
        eps=eps,
        state=state,
        rounding=rounding,
    )


def bloom_rowwise_update(weight, rows, values, *, optimizer, lr, eps=0.0, state=None, rounding=None):
    """Apply one optimizer step to ``weight``'s ``rows``, in place.

    Args:
        weight (Tensor): the ``(num_rows, dim)`` table.
        rows (Tensor): ``(u,)`` unique rows (from ``bloom_row_gradients``).
        values (Tensor): their ``(u, dim)`` gradients.
        optimizer, lr, eps, state, rounding: as :func:`bloom_segment_step`.
    """
    u = rows.numel()
    # Each row a segment of one entry: the step kernel's sums are the values themselves.
    positions = torch.arange(u + 1, dtype=torch.int64, device=rows.device)
    _launch_step(
        weight,
        rows.to(torch.int64),
        positions,
        positions[:u],
        None,
        positions[:u],
        values,
        optimizer=optimizer,
        lr=lr,
        eps=eps,
        state=state,
        rounding=rounding,
    )
