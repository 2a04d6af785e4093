"""The reference path against the independent float64 oracle, and gradcheck."""

import numpy as np
import pytest
import torch
from oracle import backward_oracle, forward_oracle

from triton_bloom.functional import bloom_embedding
from triton_bloom.hashing import hash_rows
from triton_bloom.reference import bloom_backward_reference, bloom_forward_reference


def random_case(seed, shape, num_embeddings, num_rows, dim, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_embeddings, shape, generator=g)
    weight = torch.randn(num_rows, dim, generator=g, dtype=dtype)
    return ids, weight, g


CASES = [
    # (shape, num_embeddings, num_rows, dim, k, padding_idx)
    ((50,), 100, 7, 3, 1, None),
    ((8, 9), 1000, 37, 5, 4, 0),
    ((2, 3, 4), 60, 11, 16, 24, 5),
    ((64,), 10, 3, 2, 8, 9),  # many repeats: ids and rows collide heavily
    ((1,), 1, 1, 1, 2, None),
    ((0,), 100, 10, 4, 3, 0),
    ((5, 0), 100, 10, 4, 3, None),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_oracle(case):
    shape, num_embeddings, num_rows, dim, k, padding_idx = CASES[case]
    ids, weight, g = random_case(case, shape, num_embeddings, num_rows, dim)
    if padding_idx is not None and ids.numel():
        ids.view(-1)[::3] = padding_idx  # make sure padding occurs
    weight.requires_grad_(True)
    out = bloom_embedding(ids, weight, k, padding_idx, num_embeddings=num_embeddings, backend="torch")
    assert out.shape == (*shape, dim)
    np.testing.assert_allclose(
        out.detach().numpy(),
        forward_oracle(ids.numpy(), weight.detach().numpy(), k, padding_idx),
        rtol=1e-12,
        atol=1e-12,
    )
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, weight, grad_out, allow_unused=True)
    grad = torch.zeros_like(weight) if grad is None else grad
    np.testing.assert_allclose(
        grad.numpy(), backward_oracle(ids.numpy(), grad_out.numpy(), num_rows, k, padding_idx), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_reference_gradcheck(padding_idx):
    ids, weight, _ = random_case(11, (6, 5), 20, 7, 3)
    ids[0, 0] = 3
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: bloom_embedding(ids, w, 3, padding_idx, num_embeddings=20, backend="torch"), (weight,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_against_float64(dtype):
    # Half-precision tables sum their rows in float32 inside embedding_bag's
    # kernel, and the backward accumulates in float32: the error is that of
    # one rounding of the result, not of k.
    ids, weight64, g = random_case(3, (40,), 500, 31, 24, dtype=torch.float64)
    weight = weight64.to(dtype)
    rows = hash_rows(ids, 6, 31)
    out = bloom_forward_reference(ids, weight, rows, padding_idx=0)
    assert out.dtype == dtype
    expected = forward_oracle(ids.numpy(), weight.double().numpy(), 6, 0)
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(out.double().numpy(), expected, atol=8 * eps * 6, rtol=4 * eps)
    grad_out = torch.randn(40, 24, generator=g, dtype=torch.float64).to(dtype)
    grad = bloom_backward_reference(grad_out, ids, rows, 31, padding_idx=0, dtype=dtype)
    assert grad.dtype == dtype
    expected = backward_oracle(ids.numpy(), grad_out.double().numpy(), 31, 6, 0)
    np.testing.assert_allclose(grad.double().numpy(), expected, atol=8 * eps * 12, rtol=4 * eps)
