"""The CPU path's fast pieces held to independent implementations, bit for bit.

- the compiled hash loop (``triton_bloom.native``) and the PyTorch-ops hash
  against scikit-learn (ids below 2**31) and ``mmh3`` (wider ids), every k;
- the eager lookup (plain dense lookups on the CPU skip the custom op)
  against a numpy lookup that sums each id's rows left to right in the
  table's dtype and scatters the gradient id by id, hash function by hash
  function: the order the reference path's ``embedding_bag`` and
  ``index_add_`` use, so the results must be identical, not just close;
- the eager lookup against the custom op, which the compiled path takes;
- the reused gradient buffer: retained, accumulated and tied gradients stay right.
"""

import gc
import os
import shutil

import numpy as np
import pytest
import torch
from property_oracle import rows as oracle_rows

from triton_bloom import BloomEmbedding, eager, native, ops
from triton_bloom import reference as reference_module
from triton_bloom.functional import bloom_embedding, op_options
from triton_bloom.hashing import SEEDS, hash_rows, hash_rows_torch

NUM_ROWS = [1, 2, 7, 1000, 999_983, 2**31 - 1]


def native_rows(ids, k, num_rows, pad=None):
    result = native.rows(ids, SEEDS[:k], num_rows, pad)
    assert result is not None, native.build_error()
    return result


def mixed_ids(g, n, wide):
    """Ids over [0, 2**31) with the edges of int32, plus (``wide``) ids up to 2**63."""
    parts = [torch.tensor([0, 1, 2**31 - 1]), torch.randint(0, 2**31, (n,), generator=g)]
    if wide:
        parts += [torch.tensor([2**31, 2**32, 2**63 - 1]), torch.randint(2**31, 2**63 - 1, (n,), generator=g)]
    ids = torch.cat(parts)
    return ids[torch.randperm(ids.numel(), generator=g)]


def test_native_loop_builds_here():
    # Wherever a C compiler is at hand, the fast path must be the one under test.
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here: the PyTorch-ops path runs instead")
    assert native.available(), native.build_error()


@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("wide", [False, True])
def test_hashes_match_sklearn_and_mmh3(num_rows, wide):
    g = torch.Generator().manual_seed(num_rows + wide)
    ids = mixed_ids(g, 150, wide)
    expected = oracle_rows(ids.numpy(), 24, num_rows)
    id_dtypes = [torch.int64] if wide else [torch.int32, torch.int64]
    for dtype in id_dtypes:
        for k in range(1, 25):
            # Every k: the compiled loop has a separate pass per hash function.
            got, _ = native_rows(ids.to(dtype), k, num_rows)
            assert got.dtype == torch.int32 and got.shape == (ids.numel(), k)
            np.testing.assert_array_equal(got.numpy(), expected[:, :k], err_msg=f"k={k} {dtype}")
        np.testing.assert_array_equal(hash_rows_torch(ids.to(dtype), 24, num_rows).numpy(), expected)
        np.testing.assert_array_equal(hash_rows(ids.to(dtype), 24, num_rows).numpy(), expected)


def test_native_stats_and_shapes():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (7, 9, 2), generator=g)[:, ::2]  # non-contiguous, 3-D
    rows, (low, high, pads) = native_rows(ids, 3, 17, pad=int(ids[0, 0, 0]))
    assert rows.shape == (*ids.shape, 3)
    assert torch.equal(rows, hash_rows_torch(ids, 3, 17))
    assert (low, high, pads) == (int(ids.min()), int(ids.max()), int((ids == ids[0, 0, 0]).sum()))
    empty, _ = native_rows(torch.empty(0, 4, dtype=torch.int32), 2, 5)
    assert empty.shape == (0, 4, 2)
    # Wide rows past int32 are not the loop's: the caller falls back.
    assert native.rows(ids, SEEDS[:3], 2**31) is None


def test_hash_rows_falls_back_without_the_loop(monkeypatch):
    g = torch.Generator().manual_seed(4)
    ids = mixed_ids(g, 100, True)
    expected = hash_rows(ids, 5, 1234)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", True)
    assert native.rows(ids, SEEDS[:5], 1234) is None
    assert torch.equal(hash_rows(ids, 5, 1234), expected)


# The lookup against a numpy oracle in the table's own arithmetic.


def numpy_lookup(ids, weight, k, padding_idx, grad_out):
    """``(out, grad)`` summed in the reference path's order: each id's rows
    left to right; the gradient hash function by hash function, id by id."""
    w = weight.numpy()
    r = oracle_rows(ids.numpy(), k, w.shape[0])
    out = w[r[:, 0]].copy()
    for j in range(1, k):
        out += w[r[:, j]]
    flat_ids = ids.numpy().reshape(-1)
    g = grad_out.numpy().reshape(-1, w.shape[1]).copy()
    if padding_idx is not None:
        out[flat_ids == padding_idx] = 0
        g[flat_ids == padding_idx] = 0
    grad = np.zeros_like(w)
    for j in range(k):
        np.add.at(grad, r[:, j], g)  # unbuffered: one id after another
    return out.reshape(*ids.shape, w.shape[1]), grad


CASES = [
    # (shape, num_embeddings, num_rows, dim, padding_idx)
    ((300,), 10_000, 97, 16, 0),  # padding id drawn below
    ((40, 8), 1_000_000, 5000, 64, None),
    ((3, 5, 7), 50, 7, 3, 49),  # heavy collisions
    ((64,), None, 1000, 8, None),  # wide ids
    ((600, 8), 100_000, 3000, 32, 0),  # above the one-thread sum's size: embedding_bag
    ((0,), 100, 10, 4, 0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 24])
def test_eager_lookup_is_bit_identical_to_numpy(case, dtype, k):
    shape, num_embeddings, num_rows, dim, padding_idx = CASES[case]
    g = torch.Generator().manual_seed(case * 100 + k)
    high = num_embeddings if num_embeddings is not None else 2**63 - 1
    ids = torch.randint(0, high, shape, generator=g)
    if padding_idx is not None and ids.numel():
        ids.view(-1)[::5] = padding_idx
    weight = torch.randn(num_rows, dim, generator=g, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(*shape, dim, generator=g, dtype=dtype)
    for id_dtype in [torch.int64] if num_embeddings is None else [torch.int32, torch.int64]:
        assert eager.eager_path(ids, weight)
        out = bloom_embedding(ids.to(id_dtype), weight, k, padding_idx, num_embeddings=num_embeddings)
        (grad,) = torch.autograd.grad(out, weight, grad_out)
        expected_out, expected_grad = numpy_lookup(ids, weight.detach(), k, padding_idx, grad_out)
        np.testing.assert_array_equal(out.detach().numpy(), expected_out)
        np.testing.assert_array_equal(grad.numpy(), expected_grad)


def custom_op_lookup(ids, weight, k, padding_idx, num_embeddings):
    """The custom op the compiled path takes, called directly."""
    options = op_options(
        weight,
        backend="torch",
        sparse=False,
        fused_optimizer=None,
        num_hash_functions=k,
        padding_idx=padding_idx,
        num_embeddings=num_embeddings,
        signed=False,
    )
    return ops.bloom_forward(ids, weight, None, None, None, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 0, 7])
def test_eager_lookup_matches_custom_op(dtype, padding_idx):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 200, (33, 6), generator=g)[:, ::2]  # non-contiguous
    if padding_idx == 0:
        ids[0] = 0
    weight = torch.randn(40, 12, generator=g).to(dtype).requires_grad_(True)
    grad_out = torch.randn(*ids.shape, 12, generator=g).to(dtype)
    results = []
    for lookup in (
        lambda: bloom_embedding(ids, weight, 3, padding_idx, num_embeddings=200),
        lambda: custom_op_lookup(ids, weight, 3, padding_idx, 200),
    ):
        out = lookup()
        results.append((out.detach(), *torch.autograd.grad(out, weight, grad_out)))
    for fast, op in zip(*results):
        assert fast.dtype == op.dtype and torch.equal(fast, op)


def test_eager_lookup_range_errors():
    weight = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(IndexError, match="index 100 is out of range for num_embeddings=100"):
        bloom_embedding(torch.tensor([3, 100, 5]), weight, 2, num_embeddings=100)
    with pytest.raises(IndexError, match="-4"):
        bloom_embedding(torch.tensor([3, -4], dtype=torch.int32), weight, 2, num_embeddings=100)


def test_eager_path_is_left_under_modes():
    ids, weight = torch.tensor([1, 2]), torch.randn(5, 3)
    assert eager.eager_path(ids, weight)
    with torch.device("cpu"):  # a torch function mode
        assert not eager.eager_path(ids, weight)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_ids, fake_weight = mode.from_tensor(ids), mode.from_tensor(weight)
        assert not eager.eager_path(fake_ids, fake_weight)
        assert bloom_embedding(fake_ids, fake_weight, 2, num_embeddings=10).shape == (2, 3)


# The reused gradient buffer.


def train_grads(module, batches, zero):
    grads = []
    for ids in batches:
        if zero:
            module.zero_grad(set_to_none=True)
        module(ids).pow(2).sum().backward()
        grads.append(module.weight.grad)
    return grads


def big_table(seed=0):
    torch.manual_seed(seed)
    # A 4 MB table: above the size from which gradients are pooled.
    return BloomEmbedding(100_000, 64, num_rows=16_384)


def batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100_000, (64, 5), generator=g) for _ in range(n)]


def independent_grad(module, ids):
    """The same gradient through the custom op, which allocates a fresh buffer each time."""
    weight = module.weight.detach().clone().requires_grad_(True)
    out = custom_op_lookup(ids, weight, module.num_hash_functions, module.padding_idx, module.num_embeddings)
    return torch.autograd.grad(out.pow(2).sum(), weight)[0]


def test_reused_buffer_keeps_retained_gradients():
    module = big_table()
    data = batches(1)
    grads = train_grads(module, data, zero=True)
    # The buffer is reused once nothing holds it: kept gradients must not be overwritten.
    for g, ids in zip(grads, data):
        assert torch.equal(g, independent_grad(module, ids))
    assert len({g.data_ptr() for g in grads}) == len(grads)


def test_reused_buffer_is_reused_when_free():
    module = big_table()
    pointers = []
    for ids in batches(2, 4):
        module.zero_grad(set_to_none=True)
        module(ids).sum().backward()
        pointers.append(module.weight.grad.data_ptr())
        assert torch.equal(module.weight.grad, independent_grad_sum(module, ids))
    assert len(set(pointers)) == 1


def independent_grad_sum(module, ids):
    weight = module.weight.detach().clone().requires_grad_(True)
    out = custom_op_lookup(ids, weight, module.num_hash_functions, module.padding_idx, module.num_embeddings)
    return torch.autograd.grad(out.sum(), weight)[0]


def test_gradients_accumulate_across_steps():
    module = big_table()
    data = batches(3)
    expected = None
    for ids in data:
        g = independent_grad(module, ids)
        expected = g if expected is None else expected + g
    module.zero_grad(set_to_none=True)
    for ids in data:
        module(ids).pow(2).sum().backward()
    assert torch.equal(module.weight.grad, expected)
    # zero_grad(set_to_none=False) keeps .grad and zeroes it in place: the next step adds into it.
    module.zero_grad(set_to_none=False)
    module(data[0]).pow(2).sum().backward()
    assert torch.equal(module.weight.grad, independent_grad(module, data[0]))


def test_tied_lookups_and_autograd_grad():
    module = big_table()
    a, b = batches(4, 2)
    out = module(a).pow(2).sum() + module(b).pow(2).sum()
    (grad,) = torch.autograd.grad(out, module.weight)
    assert torch.equal(grad, independent_grad(module, a) + independent_grad(module, b))
    # Held by the caller: the next backward must not write into it.
    kept = grad.clone()
    (again,) = torch.autograd.grad(module(a).sum(), module.weight)
    assert torch.equal(grad, kept) and again.data_ptr() != grad.data_ptr()


def test_buffer_is_freed_with_its_table():
    module = big_table()
    module(batches(5, 1)[0]).sum().backward()
    key = id(module.weight)
    assert key in reference_module._buffers
    del module
    gc.collect()
    assert key not in reference_module._buffers


def test_lookup_without_the_compiled_loops_gives_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 5000, (50, 6), generator=g)
    ids[0, 0] = 0
    weight = torch.randn(600, 16, generator=g).requires_grad_(True)
    grad_out = torch.randn(50, 6, 16, generator=g)

    def run():
        out = bloom_embedding(ids, weight, 4, 0, num_embeddings=5000)
        return out.detach(), torch.autograd.grad(out, weight, grad_out)[0]

    with_loops = run()
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", True)
    without = run()
    assert all(torch.equal(a, b) for a, b in zip(with_loops, without))


def test_compiled_loops_refuse_rows_outside_the_table():
    weight = torch.randn(5, 3)
    rows = torch.tensor([[0, 1], [4, 5]], dtype=torch.int32)
    with pytest.raises(IndexError, match="row 5 is outside the table's 5 rows"):
        native.gather_sum(weight, rows)
    with pytest.raises(IndexError, match="row -1"):
        native.scatter_add(torch.zeros(5, 3), torch.tensor([[0], [-1]]), torch.ones(2, 3))


def test_cpu_floor_benchmark_smoke(tmp_path):
    from bench.perf import cpu_floor

    out = tmp_path / "floor.json"
    payload = cpu_floor.main(["--quick", "--threads", "1", "--out", str(out)])
    assert out.exists() and (tmp_path / "floor.md").exists()
    assert [r["batch"] for r in payload["results"]] == [32, 256]
    for r in payload["results"]:
        for pair in ("forward_vs_seed", "train_vs_seed", "forward_vs_floor"):
            assert r[pair]["q1"] <= r[pair]["ratio"] <= r[pair]["q3"]
        assert r["parts"]["hash_native_us"] is not None
    assert set(payload["allocator_settings_us"]) == set(cpu_floor.ALLOCATORS)
    assert payload["main_job_step"][0]["threads"] == 1


def test_bag_gradients_reuse_the_buffer_and_stay_right():
    from triton_bloom import BloomEmbeddingBag

    torch.manual_seed(0)
    bag = BloomEmbeddingBag(100_000, 64, num_rows=16_384, mode="mean")
    g = torch.Generator().manual_seed(6)
    data = [torch.randint(0, 100_000, (32, 7), generator=g) for _ in range(3)]
    kept = []
    for ids in data:
        bag.zero_grad(set_to_none=True)
        bag(ids).pow(2).sum().backward()
        kept.append(bag.weight.grad)
    fresh = []
    for ids in data:
        weight = bag.weight.detach().clone().requires_grad_(True)
        out = (
            torch.nn.functional.embedding_bag(
                torch.stack([hash_rows(i, 4, 16_384).reshape(-1).long() for i in ids]), weight, mode="sum"
            )
            / (ids.shape[1])
        )
        fresh.append(torch.autograd.grad(out.pow(2).sum(), weight)[0])
    for got, expected in zip(kept, fresh):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Kept gradients are never overwritten; a freed one is reused.
    assert len({t.data_ptr() for t in kept}) == 3
    del kept
    bag.zero_grad(set_to_none=True)
    bag(data[0]).sum().backward()
    first = bag.weight.grad.data_ptr()
    bag.zero_grad(set_to_none=True)
    bag(data[1]).sum().backward()
    assert bag.weight.grad.data_ptr() == first
