"""The variants that close the accuracy gap: sign hashing and learned
importance weights, on both backends, against an independent float64 oracle."""

import numpy as np
import pytest
import torch
from oracle import SPOTLIGHT_SEEDS, sklearn_rows
from sklearn.utils import murmurhash3_32
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedSGD
from triton_bloom.functional import bloom_embedding, bloom_embedding_bag

BACKENDS = ["torch", "triton"]
VARIANTS = [(True, False), (False, True), (True, True)]  # (signed, importance)


def check_backend(backend):
    if backend == "triton":
        require_kernels()


def oracle_factors(ids, k, signed, importance):
    """``(n, k)`` factors from the documented recipe: sign = that of murmur3
    under ``seed ^ 0x5BD1E995``; importance row = murmur3 under 0x2545F491,
    floor modulo the importance rows."""
    ids = np.asarray(ids).reshape(-1).astype(np.int32)
    factors = np.ones((len(ids), k))
    if signed:
        for j in range(k):
            factors[:, j] = np.where(murmurhash3_32(ids, seed=SPOTLIGHT_SEEDS[j] ^ 0x5BD1E995) < 0, -1.0, 1.0)
    imp_rows = None
    if importance is not None:
        imp_rows = murmurhash3_32(ids, seed=0x2545F491).astype(np.int64) % importance.shape[0]
        factors = factors * np.asarray(importance, dtype=np.float64)[imp_rows]
    return factors, imp_rows


def oracle(ids, weight, k, padding_idx, signed, importance, grad_out):
    """Forward, table gradient and importance gradient, by explicit loops."""
    ids = np.asarray(ids).reshape(-1)
    weight = np.asarray(weight, dtype=np.float64)
    rows = sklearn_rows(ids, k, weight.shape[0])
    factors, imp_rows = oracle_factors(ids, k, signed, importance)
    signs, _ = oracle_factors(ids, k, signed, None)
    out = np.zeros((len(ids), weight.shape[1]))
    grad_w = np.zeros_like(weight)
    grad_imp = None if importance is None else np.zeros(importance.shape)
    for i in range(len(ids)):
        if padding_idx is not None and ids[i] == padding_idx:
            continue
        for j in range(k):
            out[i] += factors[i, j] * weight[rows[i, j]]
            grad_w[rows[i, j]] += factors[i, j] * grad_out[i]
            if grad_imp is not None:
                grad_imp[imp_rows[i], j] += signs[i, j] * np.dot(grad_out[i], weight[rows[i, j]])
    return out, grad_w, grad_imp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed, with_importance", VARIANTS)
@pytest.mark.parametrize("seed", range(3))
def test_variants_match_oracle(backend, signed, with_importance, seed):
    check_backend(backend)
    g = torch.Generator().manual_seed(seed)
    k, num_rows, dim = [1, 4, 7][seed], [5, 23, 40][seed], [3, 16, 33][seed]
    ids = torch.randint(0, 300, (9, 4), generator=g)
    ids[0, :2] = 7
    weight = torch.randn(num_rows, dim, generator=g, dtype=torch.float64)
    importance = torch.randn(11, k, generator=g, dtype=torch.float64) if with_importance else None
    grad_out = torch.randn(9, 4, dim, generator=g, dtype=torch.float64)
    w = weight.clone().to(DEVICE).requires_grad_(True)
    p = importance.clone().to(DEVICE).requires_grad_(True) if with_importance else None
    out = bloom_embedding(ids.to(DEVICE), w, k, 7, num_embeddings=300, backend=backend, signed=signed, importance=p)
    out.backward(grad_out.to(DEVICE))
    exp_out, exp_gw, exp_gp = oracle(
        ids.numpy(),
        weight.numpy(),
        k,
        7,
        signed,
        None if importance is None else importance.numpy(),
        grad_out.reshape(-1, dim).numpy(),
    )
    np.testing.assert_allclose(out.detach().cpu().reshape(-1, dim).numpy(), exp_out, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(w.grad.cpu().numpy(), exp_gw, atol=1e-10, rtol=1e-10)
    if with_importance:
        np.testing.assert_allclose(p.grad.cpu().numpy(), exp_gp, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("signed, with_importance", VARIANTS)
def test_bag_variants_match_the_embedding(backend, mode, signed, with_importance):
    # A bag's value and gradients follow from the per-id vectors, which the
    # embedding test holds to the oracle: pool them in PyTorch and compare.
    check_backend(backend)
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 200, (23,), generator=g)
    ids[3] = 2
    offsets = torch.tensor([0, 4, 4, 13, 23])
    bag_of = torch.repeat_interleave(torch.arange(4), torch.tensor([4, 0, 9, 10]))
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64)
    importance = torch.randn(5, 3, generator=g, dtype=torch.float64) if with_importance else None
    psw = torch.rand(23, generator=g, dtype=torch.float64) if mode == "sum" else None
    grad_out = torch.randn(4, 6, generator=g, dtype=torch.float64)
    results = []
    for pooled in (True, False):
        w = weight.clone().to(DEVICE).requires_grad_(True)
        p = importance.clone().to(DEVICE).requires_grad_(True) if with_importance else None
        q = psw.clone().to(DEVICE).requires_grad_(True) if psw is not None else None
        if pooled:
            out = bloom_embedding_bag(
                ids.to(DEVICE), w, offsets[:-1].to(DEVICE), 3, mode, q, 2, backend=backend, signed=signed, importance=p
            )
        else:
            vectors = bloom_embedding(ids.to(DEVICE), w, 3, 2, backend="torch", signed=signed, importance=p)
            live = (ids != 2).to(DEVICE)
            if q is not None:
                vectors = vectors * q.unsqueeze(1)
            pieces = []
            for b in range(4):
                members = vectors[(bag_of.to(DEVICE) == b) & live]
                if members.shape[0] == 0:
                    pieces.append(vectors.new_zeros(6))
                elif mode == "max":
                    pieces.append(members.max(0).values)
                elif mode == "mean":
                    pieces.append(members.mean(0))
                else:
                    pieces.append(members.sum(0))
            out = torch.stack(pieces)
        out.backward(grad_out.to(DEVICE))
        results.append(
            [out.detach(), w.grad] + ([p.grad] if p is not None else []) + ([q.grad] if q is not None else [])
        )
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_gradcheck(backend):
    check_backend(backend)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 40, (5, 3), generator=g).to(DEVICE)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    importance = torch.randn(4, 2, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, p: bloom_embedding(ids, w, 2, None, backend=backend, signed=True, importance=p), (weight, importance)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", ["sparse", "fused", "deterministic"])
def test_variants_on_the_row_wise_paths(backend, training):
    check_backend(backend)
    torch.manual_seed(12)
    kwargs = dict(num_rows=31, signed=True, importance=True, importance_rows=9, backend=backend, device=DEVICE)
    plain = BloomEmbedding(500, 5, **kwargs)
    other = BloomEmbedding(
        500, 5, sparse=training == "sparse", fused_optimizer=FusedSGD(0.1) if training == "fused" else None, **kwargs
    )
    other.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 500, (8, 6), device=DEVICE)
    target = torch.randn(8, 6, 5, device=DEVICE)
    (plain(ids) * target).sum().backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(training == "deterministic")
    try:
        (other(ids) * target).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(other.importance_weight.grad, plain.importance_weight.grad, atol=1e-5, rtol=1e-5)
    if training == "fused":
        expected = plain.weight.detach() - 0.1 * plain.weight.grad
        torch.testing.assert_close(other.weight.detach(), expected, atol=1e-5, rtol=1e-5)
    else:
        grad = other.weight.grad.to_dense() if training == "sparse" else other.weight.grad
        torch.testing.assert_close(grad, plain.weight.grad, atol=1e-5, rtol=1e-5)


def test_variants_off_change_nothing():
    torch.manual_seed(13)
    plain = BloomEmbedding(1000, 8)
    assert not plain.signed and plain.importance_weight is None
    assert sorted(plain.state_dict()) == ["_extra_state", "embeddings.weight"]
    assert "sign_seeds" not in plain.hash_spec() and "importance_rows" not in plain.hash_spec()
    # Importance weights start at one: an importance layer starts as plain Bloom.
    imp = BloomEmbedding(1000, 8, importance=True)
    imp.embeddings.load_state_dict(plain.embeddings.state_dict())
    ids = torch.randint(0, 1000, (20,))
    torch.testing.assert_close(imp(ids), plain(ids))
    assert imp.importance_weight.shape == (200, 4)
    assert sorted(imp.state_dict()) == ["_extra_state", "embeddings.weight", "importance_weight"]


def test_signed_layer_refuses_an_unsigned_checkpoint():
    saved = BloomEmbedding(1000, 8).state_dict()
    with pytest.raises(ValueError, match="sign_seeds"):
        BloomEmbedding(1000, 8, signed=True).load_state_dict(saved)
    bag = BloomEmbeddingBag(1000, 8, importance=True, importance_rows=10)
    with pytest.raises(ValueError, match="importance"):
        BloomEmbeddingBag(1000, 8, importance=True, importance_rows=11).load_state_dict(bag.state_dict())


def test_variant_argument_errors():
    with pytest.raises(ValueError, match="importance_rows"):
        BloomEmbedding(100, 4, importance_rows=10)
    with pytest.raises(ValueError, match="importance_rows"):
        BloomEmbedding(100, 4, importance=True, importance_rows=0)
    with pytest.raises(ValueError, match=r"importance must have shape \(importance_rows, 2\)"):
        bloom_embedding(torch.tensor([1]), torch.randn(5, 3), 2, importance=torch.ones(4, 3))
