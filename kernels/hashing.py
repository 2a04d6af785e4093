"""murmurhash3 (x86_32) of integer ids inside Triton kernels.

The Triton twin of ``triton_bloom/hashing.py``: the same bits, computed in
registers on uint32 values, where multiplication and shifts wrap as the
algorithm wants.  ``bloom_rows`` gives the row each id takes under one seed;
``bloom_hash`` runs it alone, for tests and for hashing on the GPU.
"""

import torch
import triton
import triton.language as tl

from .. import hashing as reference_hashing
from .launch import launch


@triton.jit
def _rotl32(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))


@triton.jit
def murmur3_mix_block(block):
    """Scramble one 4-byte block (uint32); independent of the seed, so kernels
    compute it once per id and reuse it for all ``k`` seeds."""
    block = block * 0xCC9E2D51
    block = _rotl32(block, 15)
    return block * 0x1B873593


@triton.jit
def _round(h, mixed_block):
    h = h ^ mixed_block
    h = _rotl32(h, 13)
    return h * 5 + 0xE6546B64


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def premix_ids(ids, WIDE_IDS: tl.constexpr):
    """The mixed low and high 4-byte blocks of int64 ids (high is only used
    when ``WIDE_IDS``: ids of ``2**31`` and above hash as 8 bytes)."""
    lo = murmur3_mix_block((ids & 0xFFFFFFFF).to(tl.uint32))
    if WIDE_IDS:
        hi = murmur3_mix_block(((ids >> 32) & 0xFFFFFFFF).to(tl.uint32))
    else:
        hi = lo
    return lo, hi


@triton.jit
def murmur3_signed(ids, mixed_lo, mixed_hi, seed, WIDE_IDS: tl.constexpr):
    """The signed 32-bit murmurhash3 of each id under ``seed`` (int32)."""
    h = _round(seed.to(tl.uint32), mixed_lo)
    h_narrow = _fmix32(h ^ 4)
    if WIDE_IDS:
        h_wide = _fmix32(_round(h, mixed_hi) ^ 8)
        h_narrow = tl.where(ids >= 2147483648, h_wide, h_narrow)
    return h_narrow.to(tl.int32, bitcast=True)


@triton.jit
def floor_mod(hashes, modulus):
    """Floor modulo of int32 hashes, as numpy's ``%`` does in Spotlight
    (Triton's ``%`` truncates), as int64 row indices.

    The remainder is taken in 32 bits whenever the modulus fits in 32 (Triton
    passes it as i32 then): a 64-bit remainder is a subroutine call on the
    GPU, which costs tens of instructions and a stack frame.  A modulus of
    ``2**31`` or more arrives as i64 and promotes the hashes.
    """
    rows = hashes % modulus
    return tl.where(rows < 0, rows + modulus, rows).to(tl.int64)


@triton.jit
def bloom_rows(ids, mixed_lo, mixed_hi, seed, num_rows, WIDE_IDS: tl.constexpr):
    """Row index (int64, in ``[0, num_rows)``) of each id under ``seed``."""
    return floor_mod(murmur3_signed(ids, mixed_lo, mixed_hi, seed, WIDE_IDS), num_rows)


# Where the variants' seeds sit in the seed tensor.
SIGN_SEED_OFFSET = tl.constexpr(reference_hashing.SIGN_SEED_OFFSET)
IMPORTANCE_SEED_INDEX = tl.constexpr(reference_hashing.IMPORTANCE_SEED_INDEX)


@triton.jit
def importance_row(ids, mixed_lo, mixed_hi, SEEDS, importance_rows, WIDE_IDS: tl.constexpr):
    """The row of the importance table each id reads."""
    seed = tl.load(SEEDS + IMPORTANCE_SEED_INDEX)
    return floor_mod(murmur3_signed(ids, mixed_lo, mixed_hi, seed, WIDE_IDS), importance_rows)


@triton.jit
def row_factor(
    ids,
    mixed_lo,
    mixed_hi,
    SEEDS,
    IMPORTANCE,
    imp_rows,
    hashed,
    j,
    K: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    ONE_OUTSIDE: tl.constexpr = False,
):
    """``(sign, factor)`` of row ``j`` of each id: the sign hash's +-1 (1 when
    not ``SIGNED``), float32, and sign * importance weight, in the importance
    weights' dtype (float32 without them).  The importance weights of ids
    outside ``hashed`` are not read; with ``ONE_OUTSIDE`` those ids (hot
    ids, which read a private row) get ``(1, 1)``.  (Folded into the loads
    rather than selected after the product: Triton 3.6's ptxas spilled the
    product's operand across the select.)"""
    sign = tl.full(ids.shape, 1.0, tl.float32)
    if SIGNED:
        h = murmur3_signed(ids, mixed_lo, mixed_hi, tl.load(SEEDS + SIGN_SEED_OFFSET + j), WIDE_IDS)
        negative = h < 0
        if ONE_OUTSIDE:
            negative = negative & hashed
        sign = tl.where(negative, -1.0, 1.0)
    factor = sign
    if HAS_IMPORTANCE:
        weights = tl.load(IMPORTANCE + imp_rows * K + j, mask=hashed, other=1.0 if ONE_OUTSIDE else 0.0)
        factor = sign.to(weights.dtype) * weights
    return sign, factor


@triton.jit
def _bloom_hash_kernel(
    IDS,  # (n,) int32/int64 ids
    SEEDS,  # (>= K,) int32 seeds
    ROWS,  # (n, K) int64 output rows
    n,  # number of ids
    num_rows,  # modulus
    K: tl.constexpr,
    WIDE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    ids = tl.load(IDS + offs, mask=mask, other=0).to(tl.int64)
    mixed_lo, mixed_hi = premix_ids(ids, WIDE_IDS)
    for j in tl.static_range(K):
        rows = bloom_rows(ids, mixed_lo, mixed_hi, tl.load(SEEDS + j), num_rows, WIDE_IDS)
        tl.store(ROWS + offs * K + j, rows, mask=mask)


def bloom_hash(ids, seeds, *, num_hash_functions, num_rows, wide_ids=True):
    """The ``(*, k)`` int64 rows of ``ids``, hashed by the kernels' own device
    function (what the forward and backward kernels compute in registers)."""
    rows = torch.empty((*ids.shape, num_hash_functions), dtype=torch.int64, device=ids.device)
    n = ids.numel()
    if n:
        args = dict(
            IDS=ids.reshape(-1).contiguous(),
            SEEDS=seeds,
            ROWS=rows,
            n=n,
            num_rows=num_rows,
            K=num_hash_functions,
            WIDE_IDS=wide_ids,
        )
        launch(
            _bloom_hash_kernel,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
            args,
            ids.device,
            config={"kwargs": {"BLOCK_N": 128}},
        )
    return rows
