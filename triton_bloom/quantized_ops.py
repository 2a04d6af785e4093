"""Quantized Bloom tables: the row format, and the lookups as custom ops.

The format (``LAYOUT``): each row symmetric around the table's column
offsets, with one byte of scale per row, so that an int4 row of width 64
costs 33 bytes (0.129 of its 256 fp32 bytes):

- ``codes``: ``(rows, row_bytes)`` uint8 codes ``u`` in ``[0, 2**bits - 1]``.
  int8 keeps one code a byte; int4 packs two, column ``2c`` in the low
  nibble of byte ``c`` and ``2c + 1`` in the high one.  ``row_bytes`` is the
  codes' bytes rounded up to a multiple of 16, so every row starts 16-byte
  aligned and the kernel gathers it with 128-bit loads (at the usual
  widths, multiples of 32, nothing is padded).
- ``scale_codes``: ``(rows,)`` uint8, the row's scale on a logarithmic grid:
  code ``e`` is the scale ``2 ** (lo + (e - 1) * step)`` (float32), and 0 is
  a scale of 0 (a row equal to the column offsets).
- ``scale_grid``: ``(2,)`` float32, the table's ``lo`` and ``step``: 254
  steps from a quarter below the smallest row's range to the largest
  row's, at most 1/16 octave apart (so the grid costs a row at most 4.4 %
  of precision; at a trained table's spread of row ranges, under 1 %).
- ``column_offset``: ``(dim,)`` float32, the table's mean row.

A value is ``(u - (2**bits - 1) / 2) * scale + column_offset``: the levels
lie symmetric around the column offset (no level at 0, all ``2**bits``
used).  A per-row offset in the old format's bfloat16 (four bytes a row with
the scale) would put an int4 row of width 64 at 36 bytes, 0.141 of fp32;
symmetric rows over the mean row, with the scale each row picks to
minimise its squared error (clipping its largest value when that pays),
reconstruct a trained table almost as well (``bench/results/quantized_format_cpu.md``).
The per-row bytes sit apart from the codes (not inline as in FBGEMM's
rows), so the rows stay 16-byte aligned.

Every lookup dequantises the rows it gathers (never the whole table) and
sums in float32.  Whether the Triton kernels (``kernels/quantized.py``) or
the PyTorch path below computes it follows ``dispatch.use_triton``, as for
the float lookups.  The tables are for inference: the ops' autograd formula
raises :data:`TRAINING_ERROR`.
"""

from __future__ import annotations

import importlib
import math
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
    "table_bytes",
    "quantize_rows",
    "row_scales",
    "dequantize_rows",
    "quantized_forward",
    "quantized_bag_forward",
]

BITS = (8, 4)
LAYOUT = "rowwise-symmetric/uint8-codes-16B-rows/u8-log2-scale/f32-column-offset"
ROW_ALIGNMENT = 16
SCALE_LEVELS = 255  # scale codes 1..255; 0 is a scale of 0
MAX_SCALE_STEP = 1 / 16  # octaves between two scale codes, at most
# How far below a row's full range (in octaves) its scale may go to clip its
# largest values: down to 0.75 of the range, past which clipping never paid
# on the trained tables measured.
CLIP_ROOM = math.log2(4 / 3)
_QUANTIZE_CHUNK = 8192  # rows quantized at a time (float64 temporaries)
TRAINING_ERROR = (
    "a quantized Bloom table is for inference only: its int{bits} rows cannot be trained (no parameters, "
    "no gradient; an optimizer built over the quantized module alone fails with PyTorch's "
    "'optimizer got an empty parameter list'). Train the float module (BloomEmbedding / BloomEmbeddingBag) "
    "and quantize it again with triton_bloom.quantize(module, bits={bits}), or call .dequantize() on this "
    "module to get a float module to fine-tune"
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


def table_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a quantized table of ``rows`` rows of width ``dim``, as
    :func:`~triton_bloom.embedding_bytes` counts them: the codes, a scale
    byte a row, the scale grid (two float32) and the column offsets
    (``dim`` float32).  Hot-id indexes and importance weights are extra."""
    check_bits(bits)
    return rows * (row_bytes(dim, bits) + 1) + 2 * 4 + dim * 4


def row_scales(scale_codes: torch.Tensor, scale_grid: torch.Tensor) -> torch.Tensor:
    """The float32 scales of ``scale_codes`` (any shape) on the grid
    ``(lo, step)``: ``2 ** (lo + (e - 1) * step)``, and 0 for code 0."""
    grid = scale_grid.float()
    codes = scale_codes.to(torch.float32)
    scales = torch.exp2(grid[0] + (codes - 1) * grid[1])
    return torch.where(scale_codes > 0, scales, torch.zeros_like(scales))


def _scale_grid(ideal: torch.Tensor) -> tuple[float, float]:
    """``(lo, step)`` of a table whose rows' full-range scales are ``ideal``."""
    positive = ideal[ideal > 0]
    if positive.numel() == 0:
        return 0.0, 0.0
    top, bottom = math.log2(float(positive.max())), math.log2(float(positive.min())) - CLIP_ROOM
    step = min((top - bottom) / (SCALE_LEVELS - 1), MAX_SCALE_STEP)
    # A hair above the largest row's scale: its float32 rounding must not
    # fall below it (the top code would then clip that row).
    lo = top - (SCALE_LEVELS - 1) * step + 2**-20
    return lo, step


def quantize_rows(weight: torch.Tensor, bits: int):
    """``(codes, scale_codes, scale_grid, column_offset)`` of a float
    ``(rows, dim)`` table, in the format above.  Each row's scale is the
    grid's scale, from its full range down to :data:`CLIP_ROOM` below it,
    that minimises the row's squared error with its values rounded to the
    nearest level (ties to the larger scale).

    Raises:
        ValueError: ``bits`` is not 8 or 4, or the table holds NaN or infinity.
    """
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float table, got dtype {weight.dtype} and shape {tuple(weight.shape)}")
    w = weight.detach()
    if w.numel() and not bool(torch.isfinite(w).all()):
        row = int(torch.nonzero(~torch.isfinite(w))[0, 0])
        raise ValueError(f"row {row} of the table holds NaN or infinity: it cannot be quantized")
    rows, dim = w.shape
    levels = 2**bits - 1
    half = levels / 2
    column_offset = w.double().mean(0).float() if rows else w.new_zeros(dim, dtype=torch.float32)
    mean = column_offset.double()
    ideal = (
        torch.cat(
            [(w[i : i + _QUANTIZE_CHUNK].double() - mean).abs().amax(1) / half for i in range(0, rows, _QUANTIZE_CHUNK)]
        )
        if rows and dim
        else w.new_zeros(rows, dtype=torch.float64)
    )
    lo, step = _scale_grid(ideal)
    scale_grid = torch.tensor([lo, step], dtype=torch.float32, device=w.device)
    # The scales every code gives, as the lookups compute them (float32).
    grid = row_scales(torch.arange(1, SCALE_LEVELS + 1, device=w.device), scale_grid).double()
    searched = min(64, math.ceil(CLIP_ROOM / step) + 1) if step > 0 else 1
    codes = torch.zeros((rows, dim), dtype=torch.uint8, device=w.device)
    scale_codes = torch.zeros(rows, dtype=torch.uint8, device=w.device)
    for start in range(0, rows, _QUANTIZE_CHUNK):
        d = w[start : start + _QUANTIZE_CHUNK].double() - mean
        top = torch.searchsorted(grid, ideal[start : start + _QUANTIZE_CHUNK]).clamp_(max=SCALE_LEVELS - 1)
        lowest = (top - (searched - 1)).clamp(min=0)

        def error_at(index):
            scale = grid[index][:, None]
            return ((torch.round(d / scale + half).clamp_(0, levels) - half) * scale - d).square_().sum(1)

        # Every 4th scale from the top, then the 3 on either side of the
        # best: 22 passes instead of 64, the best kept against its neighbours.
        best, best_error = top, error_at(top)
        for back in range(4, searched, 4):
            index = (top - back).clamp(min=0)
            error = error_at(index)
            better = error < best_error
            best, best_error = torch.where(better, index, best), torch.where(better, error, best_error)
        centre = best
        for shift in (3, 2, 1, -1, -2, -3):
            index = torch.maximum(torch.minimum(centre + shift, top), lowest)
            error = error_at(index)
            # Ties go to the larger scale (the larger code).
            better = (error < best_error) | ((error == best_error) & (index > best))
            best, best_error = torch.where(better, index, best), torch.where(better, error, best_error)
        live = ideal[start : start + _QUANTIZE_CHUNK] > 0
        scale = torch.where(live, grid[best], 1.0)[:, None]
        u = torch.where(live[:, None], torch.round(d / scale + half).clamp_(0, levels), 0.0)
        codes[start : start + d.shape[0]] = u.to(torch.uint8)
        scale_codes[start : start + d.shape[0]] = torch.where(live, best + 1, 0).to(torch.uint8)
    if bits == 4:
        if dim % 2:
            codes = F.pad(codes, (0, 1))
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    packed = torch.zeros((rows, row_bytes(dim, bits)), dtype=torch.uint8, device=w.device)
    packed[:, : codes.shape[1]] = codes
    return packed, scale_codes, scale_grid, column_offset


def _unpack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The codes (any leading shape, bytes last) as one uint8 code per column."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    return codes[..., :dim]


def dequantize_rows(codes, scale_codes, scale_grid, column_offset, bits: int, dim: int) -> torch.Tensor:
    """The float32 values of the rows (any leading shape):
    ``(u - (2**bits - 1) / 2) * scale + column_offset``."""
    scale = row_scales(scale_codes, scale_grid)[..., None]
    return (_unpack(codes, bits, dim).float() - (2**bits - 1) / 2) * scale + column_offset.float()


def _kernels():
    """``kernels/quantized.py``, loaded beside the other kernels (lazily: Triton may be absent)."""
    return importlib.import_module(".quantized", dispatch.kernels().__name__)


# The PyTorch path. ---------------------------------------------------------------


def _vectors(ids, table, importance, hot, *, bits, dim, num_hash_functions, padding_idx, signed):
    """The flattened ids' ``(n, dim)`` float32 vectors, padding ids zero.

    Only the gathered rows are dequantised: ``sum_j f_j ((u_j - h) s_j + c)``
    is the codes times the weights ``f_j s_j``, accumulated hash by hash
    (one ``(n, dim)`` pass each: a batched product or one ``(n, k, dim)``
    float pass costs several times more on CPU), minus ``h sum_j f_j s_j``,
    plus the column offsets ``c`` times ``sum_j f_j`` (``f_j``: the
    variants' factors, else 1; ``h = (2**bits - 1) / 2``)."""
    codes, scale_codes, scale_grid, column_offset = table
    flat = ids.reshape(-1)
    n, k = flat.numel(), num_hash_functions
    num_rows = codes.shape[0] - (hot.numel() if hot is not None else 0)
    private = hot_rows(flat, hot, num_rows) if hot is not None else None
    rows = with_hot_rows(hash_rows(flat, k, num_rows).to(torch.int64), private).reshape(-1)
    factors, _, _ = row_factors(flat, k, signed=signed, importance=importance, hot=private)
    if factors is None:
        factors = torch.ones((n, k), dtype=torch.float32, device=codes.device)
    factors = factors.float()
    if padding_idx is not None:
        # A padding id's rows weigh nothing: its vector comes out zero.
        factors = factors * (flat != padding_idx).float()[:, None]
    scale = row_scales(scale_codes.index_select(0, rows), scale_grid).view(n, k) * factors
    # Rows are multiples of 16 bytes: gathered (and int4 unpacked) as int32
    # words, four bytes an operation.
    words = codes.contiguous().view(torch.int32).index_select(0, rows)
    used, width = -(-dim * bits // 8), codes.shape[1]
    if bits == 8:
        planes = [words.view(torch.uint8).view(n, k, width)[..., :dim]]
    else:
        # The low nibbles are the even columns, the high ones the odd columns.
        nibbles = torch.tensor(0x0F0F0F0F, dtype=torch.int32, device=words.device)
        planes = [(w & nibbles).view(torch.uint8).view(n, k, width)[..., :used] for w in (words, words >> 4)]
    sums = []
    for plane in planes:
        acc = plane[:, 0].float().mul_(scale[:, :1])
        for j in range(1, k):
            acc.addcmul_(plane[:, j].float(), scale[:, j : j + 1])
        sums.append(acc)
    vectors = sums[0] if bits == 8 else torch.stack(sums, dim=-1).view(n, 2 * used)[:, :dim]
    centre = (2**bits - 1) / 2
    return vectors - centre * scale.sum(1, keepdim=True) + factors.sum(1, keepdim=True) * column_offset.float()


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
    scale_codes: torch.Tensor,
    scale_grid: torch.Tensor,
    column_offset: torch.Tensor,
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
    rows of the quantized table ``(codes, scale_codes, scale_grid, column_offset)``; the variants as in
    ``ops.bloom_forward``."""
    check_id_range(ids, num_embeddings)
    options = dict(bits=bits, dim=dim, num_hash_functions=num_hash_functions, padding_idx=padding_idx, signed=signed)
    if use_triton:
        return _kernels().quantized_forward(
            ids,
            codes,
            scale_codes,
            scale_grid,
            column_offset,
            seed_tensor(codes.device),
            wide_ids=_wide_ids(ids, num_embeddings),
            importance=importance,
            hot=hot,
            **options,
        )
    vectors = _vectors(ids, (codes, scale_codes, scale_grid, column_offset), importance, hot, **options)
    return vectors.reshape(*ids.shape, dim)


@quantized_forward.register_fake
def _(ids, codes, scale_codes, scale_grid, column_offset, importance, hot, *, dim, **options):
    return codes.new_empty((*ids.shape, dim), dtype=torch.float32)


@torch.library.custom_op("triton_bloom::quantized_bag_forward", mutates_args=())
def quantized_bag_forward(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    scale_grid: torch.Tensor,
    column_offset: torch.Tensor,
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
            scale_codes,
            scale_grid,
            column_offset,
            seed_tensor(codes.device),
            mode=mode,
            per_sample_weights=per_sample_weights,
            wide_ids=_wide_ids(ids, num_embeddings),
            importance=importance,
            hot=hot,
            **options,
        )
    vectors = _vectors(ids, (codes, scale_codes, scale_grid, column_offset), importance, hot, **options)
    return _torch_bag(vectors, ids, offsets, per_sample_weights, mode=mode, padding_idx=padding_idx)


@quantized_bag_forward.register_fake
def _(
    ids, offsets, codes, scale_codes, scale_grid, column_offset, per_sample_weights, importance, hot, *, dim, **options
):
    return codes.new_empty((offsets.shape[0] - 1, dim), dtype=torch.float32)


def _refuse_backward(ctx, grad):
    raise RuntimeError(TRAINING_ERROR.format(bits=ctx.bits))


def _remember_bits(ctx, inputs, keyword_only_inputs, output):
    ctx.bits = keyword_only_inputs["bits"]


# Registered so that a backward through a lookup (a float input made to
# require grad) names the fix instead of PyTorch's "no autograd kernel".
for _op in (quantized_forward, quantized_bag_forward):
    _op.register_autograd(_refuse_backward, setup_context=_remember_bits)
