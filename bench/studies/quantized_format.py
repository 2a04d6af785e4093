"""The first quantized format, kept to compare with the current one on the
same trained tables: row-wise asymmetric codes between each row's minimum
and maximum, with a bfloat16 offset and scale per row (4 bytes a row beside
the codes, so an int4 row of width 64 took 36 bytes, 0.141 of fp32).  The
current format (``triton_bloom/quantized_ops.py``) stores one scale byte a
row instead (33 bytes, 0.129) and centres the levels on the column offsets.

Used by ``quantized_open.py`` and ``quantized_ml100k.py``: a float module's
table is replaced by its round trip through the old format (what its
lookups returned), and the relative error of either format's round trip.
"""

from __future__ import annotations

import copy

import torch

from triton_bloom.quantized_ops import dequantize_rows, quantize_rows, row_bytes

OLD_LAYOUT = "rowwise-asymmetric/uint8-codes-16B-rows/bf16-offset-scale"


def _bf16_toward(values: torch.Tensor, direction: float) -> torch.Tensor:
    rounded = values.to(torch.bfloat16)
    wrong = rounded.double() < values if direction > 0 else rounded.double() > values
    return torch.where(wrong, torch.nextafter(rounded, torch.full_like(rounded, direction)), rounded)


def old_round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (rows, dim) through the old format: float32 values of its
    nearest levels between each row's (bfloat16-rounded) minimum and maximum."""
    w = weight.detach().double()
    levels = 2**bits - 1
    offset = _bf16_toward(w.amin(1), float("-inf")).double()
    scale = _bf16_toward((w.amax(1) - offset) / levels, float("inf")).double()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    codes = torch.where(scale[:, None] > 0, torch.round((w - offset[:, None]) / safe), torch.zeros_like(w))
    return (codes.clamp(0, levels) * scale.float().double()[:, None] + offset[:, None]).float()


def old_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a ``rows`` x ``dim`` table in the old format."""
    return rows * (row_bytes(dim, bits) + 4)


def new_round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` through the current format (what ``quantize``'s lookups read)."""
    return dequantize_rows(*quantize_rows(weight, bits), bits, weight.shape[1])


def relative_error(weight: torch.Tensor, round_trip: torch.Tensor) -> float:
    """``||W - Q|| / ||W||`` (Frobenius)."""
    w = weight.detach().double()
    return float((w - round_trip.double()).norm() / w.norm())


def with_old_rows(module, bits: int):
    """A copy of a float Bloom module (or model) whose tables (the Bloom
    modules' ``embeddings`` tables in it) hold the old format's round trip."""
    copied = copy.deepcopy(module)
    for sub in copied.modules():
        table = getattr(sub, "embeddings", None)
        if isinstance(table, torch.nn.Embedding) and hasattr(sub, "num_hash_functions"):
            with torch.no_grad():
                table.weight.copy_(old_round_trip(table.weight, bits))
    return copied
