"""Quantized Bloom tables: the row format, and the lookups as custom ops.

The format (``LAYOUT``), per row of the table, asymmetric and row-wise as
FBGEMM's serving tables are:

- ``codes``: ``(rows, row_bytes)`` uint8.  int8 keeps one code a byte; int4
  packs two, column ``2c`` in the low nibble of byte ``c`` and ``2c + 1`` in
  the high one.  ``row_bytes`` is the codes' bytes rounded up to a multiple
  of 16, so every row starts 16-byte aligned and the kernel gathers it with
  128-bit loads (at the usual widths, multiples of 32, nothing is padded).
- ``scale_offset``: ``(rows, 2)`` bfloat16, the row's offset then its scale;
  a value is ``code * scale + offset``.  Apart from the codes rather than
  inline (FBGEMM's layout): four bytes at the end of a 32-byte int4 row of
  width 64 would either break the rows' 16-byte alignment or pad each row
  to 48 bytes.  bfloat16, not float16: it has float32's range, so no row's
  scale underflows or overflows; its 8-bit mantissa costs nothing, since
  the codes are computed against the rounded scale and offset (the offset
  rounded down, the scale up, so the codes still span the row).

Every lookup dequantises the rows it gathers (never the whole table) and
sums in float32.  Whether the Triton kernels (``kernels/quantized.py``) or
the PyTorch path below computes it follows ``dispatch.use_triton``, as for
the float lookups.  The tables are for inference: the ops' autograd formula
raises :data:`TRAINING_ERROR`.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_id_range, check_offsets
from .constants import MODES
from .hashing import WIDE_ID_START, hash_rows, hot_rows, seed_tensor
from .reference import row_factors, with_hot_rows

__all__ = [
    "BITS",
    "LAYOUT",
    "TRAINING_ERROR",
    "row_bytes",
    "quantize_rows",
    "dequantize_rows",
    "quantized_forward",
    "quantized_bag_forward",
]

BITS = (8, 4)
LAYOUT = "rowwise-asymmetric/uint8-codes-16B-rows/bf16-offset-scale"
ROW_ALIGNMENT = 16
TRAINING_ERROR = (
    "a quantized Bloom table is for inference only: its int{bits} rows cannot be trained (no parameters, "
    "no gradient). Train the float module (BloomEmbedding / BloomEmbeddingBag) and quantize it again with "
    "triton_bloom.quantize(module, bits={bits}), or call .dequantize() on this module to get a float "
    "module to fine-tune"
)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return bits


def row_bytes(dim: int, bits: int) -> int:
    """Bytes between two rows of the codes: ``dim`` codes of ``bits`` bits,
    rounded up to a multiple of 16."""
    used = -(-dim * bits // 8)
    return -(-used // ROW_ALIGNMENT) * ROW_ALIGNMENT


def _bf16_toward(values: torch.Tensor, direction: float) -> torch.Tensor:
    """``values`` (float64) as bfloat16, rounded toward ``direction`` (+-inf)."""
    rounded = values.to(torch.bfloat16)
    wrong = rounded.double() < values if direction > 0 else rounded.double() > values
    stepped = torch.nextafter(rounded, torch.full_like(rounded, direction))
    return torch.where(wrong, stepped, rounded)


def quantize_rows(weight: torch.Tensor, bits: int):
    """``(codes, scale_offset)`` of a float ``(rows, dim)`` table: each row's
    values mapped onto ``2**bits`` levels between its minimum and maximum
    (nearest level), in the format above.

    Raises:
        ValueError: ``bits`` is not 8 or 4, or the table holds NaN or infinity.
    """
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float table, got dtype {weight.dtype} and shape {tuple(weight.shape)}")
    w = weight.detach().double()
    if w.numel() and not bool(torch.isfinite(w).all()):
        row = int(torch.nonzero(~torch.isfinite(w))[0, 0])
        raise ValueError(f"row {row} of the table holds NaN or infinity: it cannot be quantized")
    rows, dim = w.shape
    levels = 2**bits - 1
    if dim:
        low, high = w.amin(1), w.amax(1)
    else:
        low = high = w.new_zeros(rows)
    offset = _bf16_toward(low, float("-inf"))
    scale = _bf16_toward((high - offset.double()) / levels, float("inf"))
    step = scale.double()[:, None]
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.where(step > 0, torch.round((w - offset.double()[:, None]) / safe), torch.zeros_like(w))
    codes = codes.clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        if dim % 2:
            codes = F.pad(codes, (0, 1))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    packed = torch.zeros((rows, row_bytes(dim, bits)), dtype=torch.uint8, device=weight.device)
    packed[:, : codes.shape[1]] = codes
    return packed, torch.stack([offset, scale], dim=1).contiguous()


def _unpack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The codes (any leading shape, bytes last) as one uint8 code per column."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    return codes[..., :dim]


def dequantize_rows(codes: torch.Tensor, scale_offset: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The float32 values of the rows (any leading shape): ``code * scale + offset``."""
    meta = scale_offset.float()
    return _unpack(codes, bits, dim).float() * meta[..., 1:2] + meta[..., 0:1]


def _kernels():
    """``kernels/quantized.py``, loaded beside the other kernels (lazily: Triton may be absent)."""
    return importlib.import_module(".quantized", dispatch.kernels().__name__)


# The PyTorch path. ---------------------------------------------------------------


def _vectors(ids, codes, scale_offset, importance, hot, *, bits, dim, num_hash_functions, padding_idx, signed):
    """The flattened ids' ``(n, dim)`` float32 vectors, padding ids zero.

    Only the gathered rows are dequantised, and without a ``(n, k, dim)``
    pass per step: ``sum_j f_j (code_j * scale_j + offset_j)`` is one batched
    product of the codes with the weights ``f_j * scale_j``, plus
    ``sum_j f_j * offset_j`` (``f_j``: the variants' factors, else 1)."""
    flat = ids.reshape(-1)
    n, k = flat.numel(), num_hash_functions
    num_rows = codes.shape[0] - (hot.numel() if hot is not None else 0)
    private = hot_rows(flat, hot, num_rows) if hot is not None else None
    rows = with_hot_rows(hash_rows(flat, k, num_rows).to(torch.int64), private).reshape(-1)
    factors, _, _ = row_factors(flat, k, signed=signed, importance=importance, hot=private)
    meta = scale_offset.index_select(0, rows).float().view(n, k, 2)
    offset, scale = meta[..., 0], meta[..., 1]
    if padding_idx is not None:
        # A padding id's rows weigh nothing: its vector comes out zero.
        live = (flat != padding_idx).float()[:, None]
        factors = live if factors is None else factors.float() * live
    if factors is not None:
        factors = factors.float()
        offset, scale = offset * factors, scale * factors
    gathered = codes.index_select(0, rows)  # (n * k, row_bytes)
    if bits == 8:
        vectors = torch.einsum("nk,nkd->nd", scale, gathered[:, :dim].float().view(n, k, dim))
    else:
        half = -(-dim // 2)
        gathered = gathered[:, :half]
        # The low nibbles are the even columns, the high ones the odd columns.
        low = torch.einsum("nk,nkd->nd", scale, (gathered & 15).float().view(n, k, half))
        high = torch.einsum("nk,nkd->nd", scale, (gathered >> 4).float().view(n, k, half))
        vectors = torch.stack([low, high], dim=-1).view(n, 2 * half)[:, :dim]
    return vectors + offset.sum(1, keepdim=True)


def _torch_bag(vectors, ids, offsets, per_sample_weights, *, mode, padding_idx):
    """Pool the ids' vectors into bags, leaving padding ids out (of the mean's count too)."""
    n = ids.numel()
    positions = torch.arange(n, device=ids.device)
    if padding_idx is not None:
        # Padding ids point at an extra zero row that embedding_bag leaves out.
        positions = torch.where(ids == padding_idx, n, positions)
    table = torch.cat([vectors, vectors.new_zeros((1, vectors.shape[1]))])
    return F.embedding_bag(
        positions,
        table,
        offsets,
        mode=MODES[mode],
        per_sample_weights=per_sample_weights,
        include_last_offset=True,
        padding_idx=n if padding_idx is not None else None,
    )


# The custom ops. -----------------------------------------------------------------


def _wide_ids(ids: torch.Tensor, num_embeddings: Optional[int]) -> bool:
    return ids.dtype == torch.int64 and (num_embeddings is None or num_embeddings > WIDE_ID_START)


@torch.library.custom_op("triton_bloom::quantized_forward", mutates_args=())
def quantized_forward(
    ids: torch.Tensor,
    codes: torch.Tensor,
    scale_offset: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    bits: int,
    dim: int,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> torch.Tensor:
    """``(*)`` ids to the ``(*, dim)`` float32 sums of their dequantised Bloom
    rows of the quantized table ``(codes, scale_offset)``; the variants as in
    ``ops.bloom_forward``."""
    check_id_range(ids, num_embeddings)
    options = dict(bits=bits, dim=dim, num_hash_functions=num_hash_functions, padding_idx=padding_idx, signed=signed)
    if use_triton:
        return _kernels().quantized_forward(
            ids,
            codes,
            scale_offset,
            seed_tensor(codes.device),
            wide_ids=_wide_ids(ids, num_embeddings),
            importance=importance,
            hot=hot,
            **options,
        )
    vectors = _vectors(ids, codes, scale_offset, importance, hot, **options)
    return vectors.reshape(*ids.shape, dim)


@quantized_forward.register_fake
def _(ids, codes, scale_offset, importance, hot, *, dim, **options):
    return codes.new_empty((*ids.shape, dim), dtype=torch.float32)


@torch.library.custom_op("triton_bloom::quantized_bag_forward", mutates_args=())
def quantized_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    codes: torch.Tensor,
    scale_offset: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    mode: int,
    bits: int,
    dim: int,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: Optional[int],
    signed: bool,
    use_triton: bool,
) -> torch.Tensor:
    """``(B, dim)`` float32 pooled (``mode`` a code from ``constants``)
    dequantised Bloom vectors of the bags ``ids[offsets[b]:offsets[b + 1]]``."""
    check_id_range(ids, num_embeddings)
    check_offsets(offsets, ids.numel())
    options = dict(bits=bits, dim=dim, num_hash_functions=num_hash_functions, padding_idx=padding_idx, signed=signed)
    if use_triton:
        return _kernels().quantized_bag_forward(
            ids,
            offsets,
            codes,
            scale_offset,
            seed_tensor(codes.device),
            mode=mode,
            per_sample_weights=per_sample_weights,
            wide_ids=_wide_ids(ids, num_embeddings),
            importance=importance,
            hot=hot,
            **options,
        )
    vectors = _vectors(ids, codes, scale_offset, importance, hot, **options)
    return _torch_bag(vectors, ids, offsets, per_sample_weights, mode=mode, padding_idx=padding_idx)


@quantized_bag_forward.register_fake
def _(ids, offsets, codes, scale_offset, per_sample_weights, importance, hot, *, dim, **options):
    return codes.new_empty((offsets.shape[0] - 1, dim), dtype=torch.float32)


def _refuse_backward(ctx, grad):
    raise RuntimeError(TRAINING_ERROR.format(bits=ctx.bits))


def _remember_bits(ctx, inputs, keyword_only_inputs, output):
    ctx.bits = keyword_only_inputs["bits"]


# Registered so that a backward through a lookup (a float input made to
# require grad) names the fix instead of PyTorch's "no autograd kernel".
for _op in (quantized_forward, quantized_bag_forward):
    _op.register_autograd(_refuse_backward, setup_context=_remember_bits)
