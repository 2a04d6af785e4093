"""BloomEmbeddingBag: nn.EmbeddingBag's conventions on both backends, against
the independent float64 oracle."""

import random

import numpy as np
import pytest
import torch
from oracle import bag_backward_oracle, bag_forward_oracle
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag
from triton_bloom.constants import MODE_MAX, MODE_MEAN, MODE_SUM
from triton_bloom.functional import bloom_embedding_bag

BACKENDS = ["torch", "triton"]
MODES = ["sum", "mean", "max"]


def make_bags(seed, num_embeddings=1000, padding_idx=None):
    """Random bags: empty ones, single ids, repeated ids, padding."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = [rnd.choice([0, 1, 1, 2, 3, 5, 9]) for _ in range(rnd.randint(1, 7))]
    n = sum(lengths)
    ids = torch.randint(0, num_embeddings, (n,), generator=g)
    if rnd.random() < 0.5:
        ids = ids % 5  # repeats within and across bags
    if padding_idx is not None and n:
        ids[torch.rand(n, generator=g) < 0.3] = padding_idx
    offsets = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int64)
    return ids, offsets, g


def check_backend(backend):
    if backend == "triton":
        require_kernels()


# Every mode x weighting (per-sample weights exist in sum mode only; their
# error in the others is tested below).
MODE_WEIGHTING = [("sum", False), ("sum", True), ("mean", False), ("max", False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, weighted", MODE_WEIGHTING)
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("seed", range(3))
def test_bag_matches_oracle(backend, mode, weighted, padding_idx, seed):
    check_backend(backend)
    ids, offsets, g = make_bags(seed, padding_idx=padding_idx)
    k = [1, 4, 7][seed]
    num_rows, dim = [3, 17, 40][seed], [1, 6, 33][seed]
    weight = torch.randn(num_rows, dim, generator=g, dtype=torch.float64)
    psw = torch.rand(ids.numel(), generator=g, dtype=torch.float64) if weighted else None
    num_bags = offsets.numel() - 1
    grad_out = torch.randn(num_bags, dim, generator=g, dtype=torch.float64)

    w = weight.clone().to(DEVICE).requires_grad_(True)
    p = psw.clone().to(DEVICE).requires_grad_(True) if weighted else None
    use_last = seed % 2 == 0
    offs = offsets if use_last else offsets[:-1]
    out = bloom_embedding_bag(
        ids.to(DEVICE), w, offs.to(DEVICE), k, mode, p, padding_idx, use_last, num_embeddings=1000, backend=backend
    )
    expected = bag_forward_oracle(
        ids.numpy(), offsets.numpy(), weight.numpy(), k, mode, None if psw is None else psw.numpy(), padding_idx
    )
    assert out.shape == (num_bags, dim)
    np.testing.assert_allclose(out.detach().cpu().numpy(), expected, atol=1e-10, rtol=1e-10)

    out.backward(grad_out.to(DEVICE))
    grad_w, grad_psw = bag_backward_oracle(
        ids.numpy(),
        offsets.numpy(),
        weight.numpy(),
        k,
        mode,
        grad_out.numpy(),
        None if psw is None else psw.numpy(),
        padding_idx,
    )
    np.testing.assert_allclose(w.grad.cpu().numpy(), grad_w, atol=1e-10, rtol=1e-10)
    if weighted:
        np.testing.assert_allclose(p.grad.cpu().numpy(), grad_psw, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(8))
def test_bag_kernels_match_reference_float32(mode, seed):
    require_kernels()
    padding_idx = [None, 3][seed % 2]
    ids, offsets, g = make_bags(100 + seed, padding_idx=padding_idx)
    k, dim = [2, 4, 24, 3][seed % 4], [5, 32, 70, 16][seed % 4]
    weight = torch.randn(29, dim, generator=g)
    psw = torch.rand(ids.numel(), generator=g) if mode == "sum" and seed % 3 else None
    grad_out = torch.randn(offsets.numel() - 1, dim, generator=g)
    results = []
    for backend in BACKENDS:
        w = weight.clone().to(DEVICE).requires_grad_(True)
        p = psw.clone().to(DEVICE).requires_grad_(True) if psw is not None else None
        out = bloom_embedding_bag(ids.to(DEVICE), w, offsets[:-1].to(DEVICE), k, mode, p, padding_idx, backend=backend)
        out.backward(grad_out.to(DEVICE))
        results.append((out.detach(), w.grad, None if p is None else p.grad))
    (ref_out, ref_gw, ref_gp), (out, gw, gp) = results
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)
    if psw is not None:
        torch.testing.assert_close(gp, ref_gp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_2d_input_equals_offsets(backend, mode):
    check_backend(backend)
    torch.manual_seed(0)
    bag = BloomEmbeddingBag(500, 12, mode=mode, padding_idx=7, backend=backend, device=DEVICE)
    ids = torch.randint(0, 500, (6, 4), device=DEVICE)
    ids[1, 2] = 7
    ids[3] = 7  # an all-padding bag gives zeros
    out2d = bag(ids)
    out1d = bag(ids.reshape(-1), torch.arange(0, 24, 4, device=DEVICE))
    torch.testing.assert_close(out2d, out1d)
    assert not out2d[3].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_id_gets_the_same_vector_in_both_modules(backend):
    check_backend(backend)
    torch.manual_seed(1)
    emb = BloomEmbedding(1000, 9, num_hash_functions=5, padding_idx=None, backend=backend, device=DEVICE)
    bag = BloomEmbeddingBag(1000, 9, num_hash_functions=5, backend=backend, device=DEVICE)
    bag.load_state_dict(emb.state_dict())
    ids = torch.randint(0, 1000, (20,), device=DEVICE)
    for mode in MODES:
        bag.mode = mode
        torch.testing.assert_close(bag(ids.view(-1, 1)), emb(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_and_empty_bags(backend):
    check_backend(backend)
    bag = BloomEmbeddingBag(100, 4, mode="mean", backend=backend, device=DEVICE)
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert bag(empty, torch.zeros(3, dtype=torch.long, device=DEVICE)).abs().sum() == 0
    assert bag(empty, torch.zeros(3, dtype=torch.long, device=DEVICE)).shape == (3, 4)
    assert bag(torch.empty(5, 0, dtype=torch.long, device=DEVICE)).shape == (5, 4)
    bag.include_last_offset = True
    assert bag(empty, torch.zeros(1, dtype=torch.long, device=DEVICE)).shape == (0, 4)
    out = bag(torch.tensor([5, 6], device=DEVICE), torch.tensor([0, 0, 2, 2], device=DEVICE))
    assert out.shape == (3, 4) and not out[0].any() and not out[2].any() and out[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_weights_in_2d(backend):
    check_backend(backend)
    torch.manual_seed(2)
    bag = BloomEmbeddingBag(100, 3, backend=backend, device=DEVICE)
    ids = torch.randint(0, 100, (4, 3), device=DEVICE)
    psw = torch.rand(4, 3, device=DEVICE)
    out = bag(ids, per_sample_weights=psw)
    emb = BloomEmbedding(100, 3, padding_idx=None, backend=backend, device=DEVICE)
    emb.load_state_dict(bag.state_dict())
    torch.testing.assert_close(out, (emb(ids) * psw.unsqueeze(-1)).sum(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_weight_and_per_sample_weights(backend):
    check_backend(backend)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (9,), generator=g).to(DEVICE)
    offsets = torch.tensor([0, 2, 2, 6], device=DEVICE)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    psw = torch.rand(9, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)

    def f(w, p):
        return bloom_embedding_bag(ids, w, offsets, 3, "sum", p, padding_idx=int(ids[0]), backend=backend)

    assert torch.autograd.gradcheck(f, (weight, psw))
    for mode in ("mean", "max"):
        assert torch.autograd.gradcheck(
            lambda w: bloom_embedding_bag(ids, w, offsets, 3, mode, backend=backend), (weight,)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bag_custom_ops_opcheck(backend):
    check_backend(backend)
    from triton_bloom import ops

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (7,), generator=g).to(DEVICE)
    offsets = torch.tensor([0, 3, 3, 7], device=DEVICE)
    weight = torch.randn(11, 5, generator=g).to(DEVICE).requires_grad_(True)
    psw = torch.rand(7, generator=g).to(DEVICE).requires_grad_(True)
    importance = torch.rand(5, 3, generator=g).to(DEVICE).requires_grad_(True)
    lookup = dict(num_hash_functions=3, num_embeddings=50, use_triton=backend == "triton")
    for mode, p, pad in ((MODE_SUM, psw, None), (MODE_MEAN, None, 1), (MODE_MAX, None, 1)):
        for signed, imp in ((False, None), (True, importance)):
            hot = torch.tensor(sorted({int(ids[1]), 40})).to(DEVICE) if signed else None
            args = (ids, offsets, weight, p, imp, hot, None)  # no optimizer state
            options = dict(mode=mode, padding_idx=pad, signed=signed, **lookup)
            torch.library.opcheck(ops.bloom_bag_forward, args, options)
    grad_out = torch.randn(3, 5, generator=g).to(DEVICE)
    argmax = torch.empty(0, dtype=torch.int64, device=DEVICE)
    # The backward op is not differentiable itself: check it on plain tensors.
    for signed, imp in ((False, None), (True, importance.detach())):
        args = (grad_out, ids, offsets, weight.detach(), psw.detach(), imp, None, argmax)
        options = dict(mode=MODE_SUM, psw_grad=True, padding_idx=None, signed=signed, **lookup)
        torch.library.opcheck(ops.bloom_bag_backward, args, options)


def test_module_state_and_repr():
    bag = BloomEmbeddingBag(1000, 16, mode="max", include_last_offset=True)
    assert list(bag.state_dict()) == ["_extra_state", "embeddings.weight"]
    assert bag.weight is bag.embeddings.weight and bag.weight.shape == (200, 16)
    assert bag.padding_idx is None
    assert "mode='max'" in repr(bag) and "include_last_offset=True" in repr(bag)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda b: b(torch.tensor([1, 2, 3]), torch.tensor([1, 2])), ValueError, r"offsets\[0\] has to be 0.*got 1"),
        (lambda b: b(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])), ValueError, r"offsets\[1\]=2 > offsets\[2\]=1"),
        (lambda b: b(torch.tensor([1, 2, 3]), torch.tensor([0, 5])), ValueError, "offset 5 > input length 3"),
        (lambda b: b(torch.tensor([[1, 2]]), torch.tensor([0])), ValueError, "2-D"),
        (lambda b: b(torch.tensor([1, 2])), ValueError, "offsets has to be a 1-D Tensor"),
        (lambda b: b(torch.tensor([1, 2]), torch.tensor([[0]])), ValueError, "1-D"),
        (lambda b: b(torch.tensor([1, 2]), torch.tensor([0.0])), TypeError, "offsets"),
        (lambda b: b(torch.tensor([[[1]]])), ValueError, "1-D or 2-D"),
        (lambda b: b(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(3)), ValueError, r"shape of input \(2,\)"),
        (lambda b: b(torch.tensor([1, 200]), torch.tensor([0])), IndexError, "200"),
        (lambda b: b(torch.tensor([1.0, 2.0]), torch.tensor([0])), TypeError, "float"),
    ],
)
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(BloomEmbeddingBag(100, 4))


def test_per_sample_weights_need_sum_mode():
    for mode in ("mean", "max"):
        with pytest.raises(NotImplementedError, match=f"mode='{mode}'"):
            BloomEmbeddingBag(100, 4, mode=mode)(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))
    with pytest.raises(ValueError, match="mode"):
        BloomEmbeddingBag(100, 4, mode="median")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [3, 4, 5])
def test_long_bags_with_every_variant_match_the_reference(mode, k):
    # The sum kernels take (id, hash function) pairs in blocks, so an id's k
    # rows straddle two blocks whenever k does not divide the block; the max
    # kernel takes blocks of whole ids (of pairs when k is a power of two).  Bags of 1 to 40 ids cross both, with
    # signs, importance weights, hot ids, padding and repeats on.
    require_kernels()
    g = torch.Generator().manual_seed(10 * k + MODES.index(mode))
    lengths = [1, 6, 11, 40, 0, 17]
    n = sum(lengths)
    ids = torch.randint(0, 60, (n,), generator=g)
    ids[::7] = ids[0]  # the same id again, within and across bags
    ids[3::9] = 2  # padding
    offsets = torch.tensor([0] + list(np.cumsum(lengths))[:-1], dtype=torch.int64)
    hot = torch.tensor(sorted({int(ids[1]), int(ids[5]), 59} - {2}))
    weight = torch.randn(23 + hot.numel(), 9, generator=g)
    importance = torch.rand(13, k, generator=g) + 0.5
    psw = torch.rand(n, generator=g) if mode == "sum" else None
    grad_out = torch.randn(len(lengths), 9, generator=g)
    results = []
    for backend in BACKENDS:
        w = weight.clone().to(DEVICE).requires_grad_(True)
        imp = importance.clone().to(DEVICE).requires_grad_(True)
        p = psw.clone().to(DEVICE).requires_grad_(True) if psw is not None else None
        out = bloom_embedding_bag(
            ids.to(DEVICE),
            w,
            offsets.to(DEVICE),
            k,
            mode,
            p,
            padding_idx=2,
            num_embeddings=60,
            backend=backend,
            signed=True,
            importance=imp,
            hot_ids=hot.to(DEVICE),
        )
        out.backward(grad_out.to(DEVICE))
        results.append((out.detach(), w.grad, imp.grad, None if p is None else p.grad))
    for ref, got in zip(*results):
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert results[1][0][4].abs().sum() == 0  # the empty bag


def test_bag_tilings_hash_each_id_once_and_fit_the_bag():
    # A bag tiling hashes a one-dimensional block of at least one id (or
    # pair) a thread; with fewer, Triton hashes in the tile's layout, once per
    # thread holding a column.  The autotuner tries first the tiling that
    # leaves the fewest rows idle over a bag of the key's length.
    from triton_bloom.kernels.autotune import BAG_TILES, bag_bucket, bag_order, candidates
    from triton_bloom.kernels.bag_forward import BAG_TUNING

    assert all(block_n >= 32 * warps for block_n, _, warps in BAG_TILES)
    assert [bag_bucket(n, b) for n, b in ((0, 3), (20, 1), (80, 4), (81, 4), (10**6, 2), (5, 0))] == [
        1,
        32,
        32,
        32,
        64,
        8,
    ]
    weight = torch.empty(10, 64)
    for mode, k, bucket in ((MODE_SUM, 4, 32), (MODE_MEAN, 3, 4), (MODE_MAX, 4, 32), (MODE_MAX, 3, 8)):
        args = dict(W=weight, dim=64, K=k, MODE=mode, bag_bucket=bucket)
        tried = candidates(args, BAG_TUNING)
        # The max-pooled forward takes ids as rows when K is not a power of two.
        rows = bucket * (1 if mode == MODE_MAX and k == 3 else k)
        idle = [-(-rows // c["kwargs"]["BLOCK_N"]) * c["kwargs"]["BLOCK_N"] - rows for c in tried]
        assert idle == sorted(idle) and tried, (mode, k, bucket, tried)
        assert all(c["kwargs"]["BLOCK_D"] <= 64 for c in tried)
    assert bag_order([], dict(bag_bucket=4, K=2)) == []
