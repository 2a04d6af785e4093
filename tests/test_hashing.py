"""Hashing: the torch and Triton implementations against scikit-learn and mmh3."""

import mmh3
import numpy as np
import pytest
import torch
from oracle import SPOTLIGHT_SEEDS, sklearn_rows
from support import DEVICE, require_kernels

from triton_bloom import SEEDS, bloom_hash
from triton_bloom.hashing import murmurhash3_32 as torch_murmurhash3_32
from triton_bloom.hashing import seed_tensor

NUM_ROWS = [1, 2, 7, 1024, 2**20, 999_983, 2**30, 2**31 - 1, 2**31, 3 * 2**31 + 5]


def int32_range_sample(n, generator):
    """Ids spread over all of [0, 2**31), with the edges of every power of two."""
    edges = sorted({v for p in range(31) for v in (2**p - 1, 2**p, 2**p + 1) if v < 2**31} | {0, 2**31 - 1})
    spread = torch.randint(0, 2**31, (n,), generator=generator)
    return torch.cat([torch.tensor(edges), spread])


def test_seeds_are_spotlights():
    assert list(SEEDS) == SPOTLIGHT_SEEDS


@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bloom_hash_matches_sklearn(num_rows, dtype):
    g = torch.Generator().manual_seed(num_rows)
    ids = int32_range_sample(50_000, g)
    rows = bloom_hash(ids.to(dtype), 24, num_rows)
    assert rows.dtype == torch.int64 and rows.shape == (ids.numel(), 24)
    np.testing.assert_array_equal(rows.numpy(), sklearn_rows(ids.numpy(), 24, num_rows))


def test_bloom_hash_keeps_shape_and_prefix():
    ids = torch.randint(0, 2**31, (3, 4, 5))
    rows = bloom_hash(ids, 6, 1000)
    assert rows.shape == (3, 4, 5, 6)
    # Hash function j is SEEDS[j] whatever k is: k=3 is a prefix of k=6.
    assert torch.equal(bloom_hash(ids, 3, 1000), rows[..., :3])
    assert bloom_hash(torch.empty(0, dtype=torch.int64), 4, 10).shape == (0, 4)


def test_wide_ids_match_mmh3_of_8_bytes():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.tensor([2**31, 2**32, 2**32 + 2**31, 2**63 - 1]), torch.randint(2**31, 2**62, (300,), generator=g)]
    )
    hashes = torch_murmurhash3_32(ids, torch.tensor(SEEDS))
    expected = [[mmh3.hash(int(i).to_bytes(8, "little"), s, signed=True) for s in SPOTLIGHT_SEEDS] for i in ids]
    assert hashes.tolist() == expected


def test_narrow_ids_match_mmh3_of_4_bytes():
    # sklearn's int32 hash is mmh3 of the 4 little-endian bytes: the two
    # widths are one algorithm, switched at 2**31.
    ids = torch.tensor([0, 1, 12345, 2**31 - 1])
    hashes = torch_murmurhash3_32(ids, torch.tensor(SEEDS[:2]))
    expected = [[mmh3.hash(int(i).to_bytes(4, "little"), s, signed=True) for s in SPOTLIGHT_SEEDS[:2]] for i in ids]
    assert hashes.tolist() == expected


def test_bloom_hash_errors():
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="at most 24 hash functions"):
        bloom_hash(ids, 25, 10)
    with pytest.raises(ValueError, match="at least 1"):
        bloom_hash(ids, 0, 10)
    with pytest.raises(ValueError, match="num_rows"):
        bloom_hash(ids, 2, 0)
    with pytest.raises(TypeError, match="float"):
        bloom_hash(torch.tensor([1.0]), 2, 10)
    with pytest.raises(TypeError, match="bool"):
        bloom_hash(torch.tensor([True]), 2, 10)
    with pytest.raises(IndexError, match="-3"):
        bloom_hash(torch.tensor([4, -3]), 2, 10)


# The kernels' device function, run alone through the kernels' hash launcher.


@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_triton_hash_matches_sklearn(num_rows, dtype):
    kernels = require_kernels()
    g = torch.Generator().manual_seed(num_rows + 1)
    ids = int32_range_sample(3_000, g)
    rows = kernels.bloom_hash(
        ids.to(dtype).to(DEVICE), seed_tensor(DEVICE), num_hash_functions=24, num_rows=num_rows, wide_ids=False
    )
    np.testing.assert_array_equal(rows.cpu().numpy(), sklearn_rows(ids.numpy(), 24, num_rows))


@pytest.mark.parametrize("num_rows", [1, 999_983, 2**31 - 1, 2**33])
def test_triton_hash_wide_ids_match_torch(num_rows):
    kernels = require_kernels()
    g = torch.Generator().manual_seed(7)
    ids = torch.cat(
        [torch.randint(0, 2**31, (500,), generator=g), torch.randint(2**31, 2**63 - 1, (500,), generator=g)]
    )
    rows = kernels.bloom_hash(
        ids.to(DEVICE), seed_tensor(DEVICE), num_hash_functions=24, num_rows=num_rows, wide_ids=True
    )
    assert torch.equal(rows.cpu(), bloom_hash(ids, 24, num_rows))
