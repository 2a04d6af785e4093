"""Stochastic rounding of float32 updates into half-precision tables.

Round-to-nearest loses every update smaller than half a unit in the last
place of the stored value: a bf16 weight of 1.0 keeps 8 bits of mantissa, so
an update of 0.001 is rounded away, step after step, and the row stops
learning.  Stochastic rounding stores the float32 result ``x`` as the
half-precision neighbour above it with probability ``(x - lo) / (hi - lo)``
and the one below otherwise: the stored value is ``x`` in expectation, so
small updates add up.

The random bits are a hash, not a generator's stream: ``fmix32`` (murmur3's
finaliser) of the optimizer's seed, its step count, the row and the column::

    base = fmix32(fmix32(seed) ^ step)
    bits = fmix32(fmix32(base ^ row) ^ column)

so the Triton kernels (``kernels/optimizer.py``) and this PyTorch path draw
the same bits for the same element, whatever the tiling, and a run is
reproducible from the seed.  The rounding itself:

- bfloat16 (the top 16 bits of a float32): add the low 16 random bits to the
  float32's bits and drop the low 16 bits; the carry happens with probability
  ``(x - lo) / (hi - lo)`` exactly.
- float16 (a narrower exponent, so no such bit trick across its subnormals):
  take the round-to-nearest value and its neighbour on the other side of
  ``x``, and keep the upper one when ``u * (hi - lo) < |x| - lo`` for ``u``
  uniform on 24 bits; every operation there is exact in float32.

Magnitudes are rounded, so a negative value's rounding is the mirror of its
absolute value's: unbiased either way.  NaN and infinity stay what they are.
Past the largest finite value: a float32 value that round-to-nearest takes
to a float16 infinity is stored as that infinity; bfloat16 (whose largest
finite value is about 3.4e38, as float32's) rounds between its largest
finite value and infinity as between any two neighbours.
"""

from __future__ import annotations

import torch

from .hashing import _fmix32, _s32, _to_int32_bits

__all__ = ["ROUNDED_DTYPES", "check_seed", "random_bits", "stochastic_round", "base_key"]

ROUNDED_DTYPES = (torch.bfloat16, torch.float16)
"""Table dtypes whose fused updates are stochastically rounded."""

_MASK32 = 0xFFFFFFFF


def check_seed(seed) -> int:
    """``seed`` as an int in ``[0, 2**32)``; ``ValueError`` naming it otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid stochastic rounding seed: {seed!r} (must be an int in [0, 2**32))")
    return seed


def _fmix32_int(h: int) -> int:
    # The same finaliser on a Python int, for the per-step key.
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def base_key(seed: int, step: int) -> int:
    """The step's key ``fmix32(fmix32(seed) ^ step)`` (both taken modulo 2**32)."""
    return _fmix32_int(_fmix32_int(seed & _MASK32) ^ (step & _MASK32))


def random_bits(base: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``(u, dim)`` int32 random bits of ``rows``' elements under the key ``base``."""
    key = torch.full_like(rows, _s32(base), dtype=torch.int32)
    per_row = _fmix32(key.bitwise_xor_(_to_int32_bits(rows.to(torch.int64)))).unsqueeze(1)
    columns = torch.arange(dim, dtype=torch.int32, device=rows.device)
    return _fmix32(torch.bitwise_xor(per_row, columns))


def _round_bfloat16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # int32 addition wraps; only NaN patterns can carry into the sign bit, and they are kept aside.
    low = bits.bitwise_and(0xFFFF)
    rounded = x.view(torch.int32).add(low).bitwise_and_(_s32(0xFFFF0000)).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def _round_float16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    nearest = x.to(torch.float16)
    near = nearest.float()
    magnitude = x.abs()
    # Round-to-nearest went away from zero: the other neighbour is one step
    # toward zero, else one step away (sign-magnitude bits: +-1 on the int16).
    away = near.abs() > magnitude
    step = torch.where(away, -1, 1).to(torch.int16)
    other = nearest.view(torch.int16).add(step).view(torch.float16).float()
    lo = torch.where(away, other, near).abs()
    hi = torch.where(away, near, other).abs()
    uniform = (bits >> 8).bitwise_and_(0xFFFFFF).float().mul_(2.0**-24)
    up = uniform * (hi - lo) < magnitude - lo
    chosen = torch.where(up == away, near, other)
    # up == away: the upper neighbour when round-to-nearest went up, the lower one when it went down.
    return torch.where(torch.isfinite(near), chosen, near).to(torch.float16)


def stochastic_round(x: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) stochastically rounded to ``dtype`` (bfloat16 or
    float16) with the int32 random ``bits`` of the same shape."""
    x = x.to(torch.float32).contiguous()
    if dtype == torch.bfloat16:
        return _round_bfloat16(x, bits)
    if dtype == torch.float16:
        return _round_float16(x, bits)
    raise ValueError(f"stochastic rounding stores bfloat16 or float16, not {dtype}")
