"""The Triton kernels against the reference path, on many small random cases.

Without a GPU these run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); they fail rather than skip when the kernels cannot
load, since CI must run them.
"""

import importlib
import random

import numpy as np
import pytest
import torch
from oracle import backward_oracle, forward_oracle
from support import DEVICE, TOLERANCES, require_kernels

from triton_bloom import bloom_hash
from triton_bloom.functional import bloom_embedding
from triton_bloom.hashing import hash_rows, seed_tensor
from triton_bloom.reference import bloom_backward_reference, bloom_forward_reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_case(seed):
    """A random small problem: shape, sizes, k, padding, id dtype and layout."""
    rnd = random.Random(seed)
    ndim = rnd.choice([1, 1, 2, 3])
    shape = tuple(rnd.randint(1, 9) for _ in range(ndim))
    num_embeddings = rnd.choice([1, 5, 50, 1000, 2**31 - 1])
    num_rows = rnd.choice([1, 3, 17, 64, 101])
    dim = rnd.choice([1, 3, 7, 16, 33, 40, 70, 100])
    k = rnd.choice([1, 2, 3, 4, 7, 24])
    padding_idx = rnd.choice([None, 0, min(2, num_embeddings - 1)])
    id_dtype = rnd.choice([torch.int32, torch.int64])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_embeddings, shape, generator=g, dtype=torch.int64)
    if rnd.random() < 0.5:  # heavy duplication: many ids, few distinct
        ids = ids % 4
    if padding_idx is not None:
        ids.view(-1)[:: rnd.randint(2, 5)] = padding_idx
    ids = ids.to(id_dtype)
    layout = rnd.random()
    if ndim > 1 and layout < 0.3:
        ids = ids.transpose(0, -1)  # non-contiguous
    elif layout < 0.6:
        ids = ids.reshape(-1).repeat_interleave(2)[::2].view(ids.shape) if ndim == 1 else ids
    if ndim == 1 and layout < 0.6:
        assert not ids.is_contiguous() or ids.numel() <= 1  # a strided 1-D view
    return dict(
        ids=ids, num_embeddings=num_embeddings, num_rows=num_rows, dim=dim, k=k, padding_idx=padding_idx, generator=g
    )


def assert_sums_close(actual, expected, scale, tol=1e-5):
    """``actual`` equals ``expected`` to ``tol`` relative to ``scale``, the sum
    of the magnitudes of the terms added into each element.

    Kernel and reference add the same terms in different orders; with
    heavily repeated ids thousands of terms meet in one row, and float32's
    rounding grows with the sum of their magnitudes, not with the result.
    """
    err = (actual.double() - expected.double()).abs()
    bound = tol * scale.double().clamp_min(1.0)
    assert bool((err <= bound).all()), (
        f"max error {err.max().item():.3g}, max scaled {(err / bound).max().item():.3g}x tol"
    )


def magnitudes(ids, weight, k, padding_idx, grad_out):
    """Per-element sums of |terms| of the forward and of the backward."""
    rows = hash_rows(ids.cpu(), k, weight.shape[0])
    fwd = bloom_forward_reference(ids.cpu(), weight.detach().cpu().double().abs(), rows, padding_idx)
    bwd = bloom_backward_reference(grad_out.cpu().double().abs(), ids.cpu(), rows, weight.shape[0], padding_idx)
    return fwd.to(weight.device), bwd.to(weight.device)


def run_both(ids, weight, k, padding_idx, num_embeddings, grad_out, hash_cache=None):
    results = []
    for backend in ("torch", "triton"):
        w = weight.detach().clone().requires_grad_(True)
        out = bloom_embedding(
            ids, w, k, padding_idx, num_embeddings=num_embeddings, hash_cache=hash_cache, backend=backend
        )
        out.backward(grad_out)
        results.append((out.detach(), w.grad))
    return results


@pytest.mark.parametrize("seed", range(40))
def test_kernels_match_reference_float32(seed):
    require_kernels()
    c = make_case(seed)
    ids = c["ids"].to(DEVICE)
    weight = torch.randn(c["num_rows"], c["dim"], generator=c["generator"]).to(DEVICE)
    grad_out = torch.randn(*ids.shape, c["dim"], generator=c["generator"]).to(DEVICE)
    (ref_out, ref_grad), (out, grad) = run_both(ids, weight, c["k"], c["padding_idx"], c["num_embeddings"], grad_out)
    assert out.shape == (*ids.shape, c["dim"]) and out.dtype == torch.float32
    fwd_scale, bwd_scale = magnitudes(ids, weight, c["k"], c["padding_idx"], grad_out)
    assert_sums_close(out, ref_out, fwd_scale)
    assert_sums_close(grad, ref_grad, bwd_scale)
    if c["padding_idx"] is not None:
        assert not out[ids == c["padding_idx"]].any()


@pytest.mark.parametrize("seed", range(6))
def test_kernels_match_oracle_float64(seed):
    require_kernels()
    c = make_case(100 + seed)
    ids = c["ids"]
    weight = torch.randn(c["num_rows"], c["dim"], generator=c["generator"], dtype=torch.float64)
    grad_out = torch.randn(*ids.shape, c["dim"], generator=c["generator"], dtype=torch.float64)
    _, (out, grad) = run_both(
        ids.to(DEVICE), weight.to(DEVICE), c["k"], c["padding_idx"], c["num_embeddings"], grad_out.to(DEVICE)
    )
    expected = forward_oracle(ids.numpy(), weight.numpy(), c["k"], c["padding_idx"])
    np.testing.assert_allclose(out.cpu().numpy(), expected, atol=1e-12, rtol=1e-12)
    expected = backward_oracle(ids.numpy(), grad_out.numpy(), c["num_rows"], c["k"], c["padding_idx"])
    np.testing.assert_allclose(grad.cpu().numpy(), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 4, 24])
def test_kernels_every_dtype(dtype, k):
    require_kernels()
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(0, 300, (45,), generator=g).to(DEVICE)
    weight = torch.randn(29, 37, generator=g).to(dtype).to(DEVICE)
    grad_out = torch.randn(45, 37, generator=g).to(dtype).to(DEVICE)
    (ref_out, ref_grad), (out, grad) = run_both(ids, weight, k, 0, 300, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_kernels_empty_input(shape):
    require_kernels()
    weight = torch.randn(10, 6, device=DEVICE, requires_grad=True)
    ids = torch.empty(shape, dtype=torch.int64, device=DEVICE)
    out = bloom_embedding(ids, weight, 4, 0, num_embeddings=100, backend="triton")
    assert out.shape == (*shape, 6)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_kernels_with_hash_cache(id_dtype):
    require_kernels()
    g = torch.Generator().manual_seed(5)
    num_embeddings, num_rows, k = 500, 41, 5
    cache = bloom_hash(torch.arange(num_embeddings), k, num_rows).to(torch.int32).to(DEVICE)
    ids = torch.randint(0, num_embeddings, (6, 7), generator=g).to(id_dtype).to(DEVICE)
    weight = torch.randn(num_rows, 19, generator=g).to(DEVICE)
    grad_out = torch.randn(6, 7, 19, generator=g).to(DEVICE)
    (ref_out, ref_grad), (out, grad) = run_both(ids, weight, k, 1, num_embeddings, grad_out)
    (_, _), (out_c, grad_c) = run_both(ids, weight, k, 1, num_embeddings, grad_out, hash_cache=cache)
    torch.testing.assert_close(out_c, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, ref_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_c, atol=1e-5, rtol=1e-5)


def test_kernels_wide_ids():
    # num_embeddings=None admits ids past 2**31, hashed as 8 bytes.
    require_kernels()
    g = torch.Generator().manual_seed(9)
    ids = torch.cat([torch.randint(0, 2**31, (20,), generator=g), torch.randint(2**31, 2**62, (20,), generator=g)]).to(
        DEVICE
    )
    weight = torch.randn(23, 12, generator=g).to(DEVICE)
    grad_out = torch.randn(40, 12, generator=g).to(DEVICE)
    (ref_out, ref_grad), (out, grad) = run_both(ids, weight, 3, None, None, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_launchers_directly():
    # The launchers, without the autograd glue: forward, then backward into a
    # table gradient of the requested dtype.
    kernels = require_kernels()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 5), generator=g).to(DEVICE)
    weight = torch.randn(13, 9, generator=g).to(DEVICE)
    rows = hash_rows(ids, 3, 13)
    out = kernels.bloom_forward(ids, weight, seed_tensor(DEVICE), num_hash_functions=3, padding_idx=2)
    torch.testing.assert_close(out, bloom_forward_reference(ids, weight, rows, 2), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(4, 5, 9, generator=g).to(DEVICE)
    grad, grad_importance = kernels.bloom_backward(
        grad_out, ids, seed_tensor(DEVICE), num_rows=13, num_hash_functions=3, padding_idx=2
    )
    assert grad_importance is None
    torch.testing.assert_close(grad, bloom_backward_reference(grad_out, ids, rows, 13, 2), atol=1e-5, rtol=1e-5)


def test_triton_gradcheck_float64():
    require_kernels()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30, (5, 4), generator=g).to(DEVICE)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: bloom_embedding(ids, w, 3, 4, num_embeddings=30, backend="triton"), (weight,)
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_opcheck(backend):
    if backend == "triton":
        require_kernels()
    from triton_bloom import ops

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (6,), generator=g).to(DEVICE)
    weight = torch.randn(11, 5, generator=g).to(DEVICE).requires_grad_(True)
    cache = bloom_hash(torch.arange(50), 3, 11).to(torch.int32).to(DEVICE)
    importance = torch.rand(4, 3, generator=g).to(DEVICE).requires_grad_(True)
    lookup = dict(num_hash_functions=3, padding_idx=0, num_embeddings=50, use_triton=backend == "triton")
    # Two of the 11 rows private to two hot ids, with the variants on.
    hot = torch.tensor(sorted({int(ids[0]), 49})).to(DEVICE)
    for hash_cache in (None, cache):
        for signed, imp, hot_ids in ((False, None, None), (True, importance, hot)):
            args = (ids, weight, imp, hot_ids, hash_cache, None)  # no optimizer state
            torch.library.opcheck(ops.bloom_forward, args, dict(signed=signed, **lookup))
    grad_out = torch.randn(6, 5, generator=g).to(DEVICE)
    for signed, imp, hot_ids in ((False, None, None), (True, importance.detach(), hot)):
        args = (grad_out, ids, weight.detach(), imp, hot_ids, None)  # no hash cache
        torch.library.opcheck(ops.bloom_backward, args, dict(signed=signed, **lookup))


# (dim, row stride, offset of the first row in elements): rows whose
# alignment Triton cannot see (ROW_ALIGN 4, 2, 1 at dim 100 for float32),
# a base pointer off 16 bytes, dims 1, 7 and 33, and a dim that is a multiple
# of 16 in a table whose row stride is not.
STRIDED_TABLES = [
    (100, 100, 0),
    (100, 102, 0),
    (100, 101, 0),
    (100, 104, 3),
    (36, 48, 0),
    (64, 66, 0),
    (33, 33, 0),
    (7, 7, 0),
    (1, 3, 0),
    (1, 1, 0),
]


def strided_table(num_rows, dim, stride, offset, dtype, generator):
    """A ``(num_rows, dim)`` view of fresh random storage, rows ``stride``
    elements apart, starting ``offset`` elements in."""
    storage = torch.randn(offset + num_rows * stride, generator=generator).to(dtype).to(DEVICE)
    return storage[offset:].view(num_rows, stride)[:, :dim]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim,stride,offset", STRIDED_TABLES)
def test_kernels_any_row_alignment(dim, stride, offset, dtype):
    # The kernels are told the rows' alignment (lookup.alignment_args) and
    # rewrite dim and the row stride to a multiple of it: a claim the rows
    # do not meet would read and write the wrong elements here.
    require_kernels()
    g = torch.Generator().manual_seed(dim * 1000 + stride * 10 + offset)
    num_rows, k = 23, 3
    weight = strided_table(num_rows, dim, stride, offset, dtype, g)
    assert weight.stride(0) == stride
    ids = torch.randint(0, 400, (41,), generator=g).to(DEVICE)
    grad_out = torch.randn(41, dim, generator=g).to(dtype).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        w = weight.detach().requires_grad_(True)  # a leaf with the view's strides
        out = bloom_embedding(ids, w, k, 5, num_embeddings=400, backend=backend)
        out.backward(grad_out)
        results.append((out.detach(), w.grad))
    (ref_out, ref_grad), (out, grad) = results
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])
    if dtype == torch.float64:
        expected = forward_oracle(ids.cpu().numpy(), weight.cpu().numpy(), k, 5)
        np.testing.assert_allclose(out.cpu().numpy(), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_args_claims_only_what_holds(dtype):
    # ROW_ALIGN must divide dim and the row stride (the kernels rely on it),
    # fit one 16-byte vector, and be the largest such power of two, except
    # where both are multiples of 16, which Triton sees by itself (1 there:
    # no new specialization).
    kernels = require_kernels()
    lookup = importlib.import_module(kernels.__name__ + ".lookup")
    vector = 16 // torch.empty((), dtype=dtype).element_size()
    for dim in range(1, 70):
        for stride in (dim, dim + 1, dim + 2, dim + 4, dim + 8, 2 * dim):
            table = torch.empty(3, stride, dtype=dtype)[:, :dim]
            align = lookup.alignment_args(table, dim)["ROW_ALIGN"]
            assert align >= 1 and align & (align - 1) == 0, (dim, stride, align)
            assert dim % align == 0 and stride % align == 0, (dim, stride, align)
            if dim % 16 == 0 and stride % 16 == 0:
                assert align == 1, (dim, stride, align)
            else:
                assert align <= vector, (dim, stride, align)
                wider = 2 * align
                assert wider > vector or dim % wider or stride % wider, (dim, stride, align)
