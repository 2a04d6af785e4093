"""Spotlight-compatible murmurhash3 row hashing, in plain PyTorch.

Row ``j`` of id ``i`` is ``murmurhash3_32(i, seed=SEEDS[j])`` read as a signed
int32, then floor-modulo ``num_rows``, which is exactly what Spotlight's
``BloomEmbedding`` computes with ``sklearn.utils.murmurhash3_32`` and numpy.
Ids below ``2**31`` hash their 4 little-endian bytes (as sklearn does for an
int32); larger ids hash their 8 little-endian bytes with the same
murmur3_x86_32 algorithm, which is what ``mmh3.hash(id.to_bytes(8, "little"))``
gives.

:func:`murmurhash3_32` is the definition in PyTorch ops, the same on every
device.  On the CPU, :func:`hash_rows` runs the compiled loop of
``triton_bloom.native`` instead when it is built (one pass instead of about
forty elementwise ops; :func:`hash_rows_torch` is the ops' version).  The
Triton twin is ``kernels/hashing.py``; the tests hold all three to
scikit-learn and ``mmh3`` bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from . import native

__all__ = [
    "SEEDS",
    "SIGN_SEEDS",
    "IMPORTANCE_SEED",
    "MAX_HASH_FUNCTIONS",
    "bloom_hash",
    "hot_rows",
    "bloom_signs",
    "importance_rows",
    "hash_rows",
    "hash_rows_torch",
    "seed_tensor",
    "check_num_hash_functions",
]

# Spotlight's seeds, in Spotlight's order: hash function j uses SEEDS[j].
SEEDS = (
    179424941,
    179425457,
    179425907,
    179426369,
    179424977,
    179425517,
    179425943,
    179426407,
    179424989,
    179425529,
    179425993,
    179426447,
    179425003,
    179425537,
    179426003,
    179426453,
    179425019,
    179425559,
    179426029,
    179426491,
    179425027,
    179425579,
    179426081,
    179426549,
)
MAX_HASH_FUNCTIONS = len(SEEDS)

# The variants' own hashes, independent of the rows' (other seeds): the sign
# of row j of an id (Weinberger et al. 2009) is the sign of its hash under
# SIGN_SEEDS[j]; its importance weights (hash embeddings, Svenstrup et al.
# 2017) are the row of a second table its hash under IMPORTANCE_SEED picks.
SIGN_SEEDS = tuple(seed ^ 0x5BD1E995 for seed in SEEDS)
IMPORTANCE_SEED = 0x2545F491
# Where they sit in `seed_tensor`, which the kernels index.
SIGN_SEED_OFFSET = MAX_HASH_FUNCTIONS
IMPORTANCE_SEED_INDEX = 2 * MAX_HASH_FUNCTIONS

_MASK32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35
_N = 0xE6546B64
# Ids from here on are hashed as 8 bytes; below it, as sklearn's int32.
WIDE_ID_START = 2**31


def check_num_hash_functions(num_hash_functions: int) -> None:
    """Raise ``ValueError`` unless ``num_hash_functions`` is in ``1..24``."""
    if isinstance(num_hash_functions, bool) or not isinstance(num_hash_functions, int):
        raise TypeError(f"num_hash_functions must be an int, got {num_hash_functions!r}")
    if num_hash_functions > MAX_HASH_FUNCTIONS:
        # Spotlight's wording, so its users recognise the error.
        raise ValueError(f"Can use at most {MAX_HASH_FUNCTIONS} hash functions ({num_hash_functions} requested)")
    if num_hash_functions < 1:
        raise ValueError(f"num_hash_functions must be at least 1, got {num_hash_functions}")


def _s32(c: int) -> int:
    # A 32-bit constant as the int32 value with the same bits.
    return c - 2**32 if c >= 2**31 else c


def _to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    # The low 32 bits of an int64 tensor as int32, without relying on how a
    # narrowing cast treats out-of-range values.
    x = x.bitwise_and(_MASK32)
    return (x - (x >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _shr(x: torch.Tensor, r: int) -> torch.Tensor:
    # Logical right shift of int32 bits: ``>>`` is arithmetic on signed types.
    return (x >> r).bitwise_and_((1 << (32 - r)) - 1)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return torch.bitwise_left_shift(x, r).bitwise_or_(_shr(x, 32 - r))


# The hash runs on int32 tensors: multiplication and addition wrap modulo
# 2**32 in PyTorch's integer kernels on every device (the tests check every
# seed against scikit-learn), and int32 halves the memory traffic of int64.
def _mix_block(block: torch.Tensor) -> torch.Tensor:
    return _rotl(block * _s32(_C1), 15).mul_(_s32(_C2))


def _round(h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    return _rotl(torch.bitwise_xor(h, mixed), 13).mul_(5).add_(_s32(_N))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h.bitwise_xor_(_shr(h, 16)).mul_(_s32(_F1))
    h = h.bitwise_xor_(_shr(h, 13)).mul_(_s32(_F2))
    return h.bitwise_xor_(_shr(h, 16))


@lru_cache(maxsize=None)
def seed_tensor(device: torch.device) -> torch.Tensor:
    """Every seed as an int32 tensor on ``device`` (cached per device): the 24
    row seeds, the 24 sign seeds, then the importance seed."""
    return torch.tensor(SEEDS + SIGN_SEEDS + (IMPORTANCE_SEED,), dtype=torch.int32, device=device)


def murmurhash3_32(ids: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Signed murmurhash3_32 of every id under every seed.

    Args:
        ids (Tensor): non-negative integer ids of any shape ``(*)``.
        seeds (Tensor): seeds of shape ``(k,)``, each below ``2**31``.

    Returns:
        int32 Tensor of shape ``(*, k)``: the signed hashes, as
        ``sklearn.utils.murmurhash3_32`` returns them.
    """
    ids = ids.unsqueeze(-1)
    seeds = seeds.to(device=ids.device, dtype=torch.int32)
    if ids.dtype == torch.int32:
        # Every non-negative int32 is a narrow id: its bits are the block.
        return _fmix32(_round(seeds, _mix_block(ids)).bitwise_xor_(4))
    ids = ids.to(torch.int64)
    h = _round(seeds, _mix_block(_to_int32_bits(ids)))
    narrow = _fmix32(h.bitwise_xor(4))
    is_wide = ids >= WIDE_ID_START
    if ids.numel() and bool(is_wide.any()):
        wide = _fmix32(_round(h, _mix_block(_to_int32_bits(ids >> 32))).bitwise_xor_(8))
        narrow = torch.where(is_wide, wide, narrow)
    return narrow


def native_allowed(ids: torch.Tensor) -> bool:
    """Whether ``ids`` may go to the compiled loop of :mod:`triton_bloom.native`:
    a plain CPU tensor, outside ``torch.compile``'s tracing and any dispatch
    mode (fake tensors have no data for it to read)."""
    return (
        type(ids) is torch.Tensor
        and ids.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def hash_rows(ids: torch.Tensor, num_hash_functions: int, num_rows: int) -> torch.Tensor:
    """:func:`bloom_hash` without argument checks, in the narrowest index type.

    Returns int32 rows when ``num_rows`` fits in int32 (``embedding_bag`` and
    ``index_add_`` take them, and they halve the traffic), int64 otherwise.
    On the CPU the compiled loop of :mod:`triton_bloom.native` computes them
    when it is built; elsewhere, or without it, :func:`hash_rows_torch` does.
    """
    if native_allowed(ids):
        result = native.rows(ids, SEEDS[:num_hash_functions], num_rows)
        if result is not None:
            return result[0]
    return hash_rows_torch(ids, num_hash_functions, num_rows)


def hash_rows_torch(ids: torch.Tensor, num_hash_functions: int, num_rows: int) -> torch.Tensor:
    """:func:`hash_rows` in PyTorch ops, on any device: :func:`murmurhash3_32`,
    then the floor modulo."""
    hashes = murmurhash3_32(ids, seed_tensor(ids.device)[:num_hash_functions])
    if num_rows >= 2**31:
        # A negative int32 hash maps to num_rows + hash, past int32's range.
        hashes = hashes.to(torch.int64)
    return torch.remainder(hashes, num_rows)


def bloom_signs(ids: torch.Tensor, num_hash_functions: int) -> torch.Tensor:
    """``(*, k)`` signs (+1 or -1) of the ids' rows, for ``signed=True``."""
    seeds = seed_tensor(ids.device)[SIGN_SEED_OFFSET : SIGN_SEED_OFFSET + num_hash_functions]
    return torch.where(murmurhash3_32(ids, seeds) < 0, -1, 1).to(torch.int8)


def importance_rows(ids: torch.Tensor, num_importance_rows: int) -> torch.Tensor:
    """``(*)`` int64 row of the importance table each id reads."""
    seed = seed_tensor(ids.device)[IMPORTANCE_SEED_INDEX : IMPORTANCE_SEED_INDEX + 1]
    hashes = murmurhash3_32(ids, seed).squeeze(-1).to(torch.int64)
    return torch.remainder(hashes, num_importance_rows)


def hot_rows(ids: torch.Tensor, hot_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each id's private row, or -1: ``num_rows + p`` for the id at position
    ``p`` of the sorted ``hot_ids``, -1 for every other id.

    A binary search of the ``(H,)`` sorted hot ids, as the kernels do it: the
    hot set costs memory in ``H``, never in the size of the id space.

    Shape:
        - ids: :math:`(*)`; output: :math:`(*)`, int64
    """
    hot_ids = hot_ids.to(device=ids.device, dtype=torch.int64)
    ids = ids.to(torch.int64)
    if hot_ids.numel() == 0:
        return torch.full_like(ids, -1)
    position = torch.searchsorted(hot_ids, ids)
    found = hot_ids.index_select(0, position.clamp_max(hot_ids.numel() - 1).reshape(-1)).view_as(ids) == ids
    return torch.where(found, position + num_rows, -1)


def bloom_hash(ids: torch.Tensor, num_hash_functions: int, num_rows: int) -> torch.Tensor:
    """Row indices of every id under the first ``num_hash_functions`` hashes.

    Args:
        ids (Tensor): integer ids in ``[0, 2**63)``, any shape ``(*)``.
        num_hash_functions (int): ``k``, how many hashes (1 to 24).
        num_rows (int): rows of the compressed table; the result is in
            ``[0, num_rows)``.

    Shape:
        - Input: :math:`(*)`
        - Output: :math:`(*, k)`, int64

    Examples::

        >>> ids = torch.tensor([1, 2, 3])
        >>> bloom_hash(ids, num_hash_functions=2, num_rows=1000).shape
        torch.Size([3, 2])
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    check_num_hash_functions(num_hash_functions)
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    if ids.numel() and bool((ids < 0).any()):
        raise IndexError(f"ids must be non-negative, got {int(ids.min())}")
    return hash_rows(ids, num_hash_functions, num_rows).to(torch.int64)
