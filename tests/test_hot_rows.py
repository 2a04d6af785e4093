"""Hot rows (frequent ids with private rows) and the private low-dimensional
part, on both backends, against an independent float64 oracle."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import SPOTLIGHT_SEEDS, sklearn_rows
from sklearn.utils import murmurhash3_32
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD, embedding_bytes
from triton_bloom.functional import bloom_embedding, bloom_embedding_bag

BACKENDS = ["torch", "triton"]


def check_backend(backend):
    if backend == "triton":
        require_kernels()


def hot_oracle(ids, weight, k, num_hot, hot_ids, padding_idx=None, signed=False, importance=None, grad_out=None):
    """Forward and gradients by explicit loops: the id at position ``p`` of
    the sorted hot ids reads row ``R - H + p`` alone; the others hash into
    the first ``R - H`` rows with their signs and importance weights."""
    ids = np.asarray(ids).reshape(-1)
    weight = np.asarray(weight, dtype=np.float64)
    shared = weight.shape[0] - num_hot
    private = {int(i): shared + p for p, i in enumerate(sorted(int(i) for i in hot_ids))}
    rows = sklearn_rows(ids, k, shared)
    out = np.zeros((len(ids), weight.shape[1]))
    grad_w = np.zeros_like(weight)
    grad_imp = None if importance is None else np.zeros(importance.shape)
    for i, id_ in enumerate(ids):
        if padding_idx is not None and id_ == padding_idx:
            continue
        if int(id_) in private:
            out[i] = weight[private[int(id_)]]
            if grad_out is not None:
                grad_w[private[int(id_)]] += grad_out[i]
            continue
        imp_row = None
        if importance is not None:
            imp_row = int(murmurhash3_32(np.int32(id_), seed=0x2545F491)) % importance.shape[0]
        for j in range(k):
            sign = 1.0
            if signed:
                sign = -1.0 if murmurhash3_32(np.int32(id_), seed=SPOTLIGHT_SEEDS[j] ^ 0x5BD1E995) < 0 else 1.0
            factor = sign * (float(importance[imp_row, j]) if importance is not None else 1.0)
            out[i] += factor * weight[rows[i, j]]
            if grad_out is not None:
                grad_w[rows[i, j]] += factor * grad_out[i]
                if grad_imp is not None:
                    grad_imp[imp_row, j] += sign * np.dot(grad_out[i], weight[rows[i, j]])
    return out, grad_w, grad_imp


def random_case(seed, num_embeddings=60, dim=5, num_hot=7, n=40):
    g = torch.Generator().manual_seed(seed)
    hot = torch.randperm(num_embeddings, generator=g)[:num_hot]
    # Zipf-like ids: the hot ones come often, duplicates everywhere.
    ids = torch.cat(
        [
            hot[torch.randint(0, num_hot, (n // 2,), generator=g)],
            torch.randint(0, num_embeddings, (n - n // 2,), generator=g),
        ]
    )
    ids = ids[torch.randperm(n, generator=g)]
    return g, hot, ids, dim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed,with_importance", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_hot_rows_match_oracle(backend, signed, with_importance, seed):
    check_backend(backend)
    g, hot, ids, dim = random_case(seed)
    k, shared = 3, 11
    padding_idx = int(ids[0]) if int(ids[0]) not in hot.tolist() else None
    weight = torch.randn(shared + hot.numel(), dim, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    importance = None
    if with_importance:
        importance = (torch.rand(5, k, generator=g, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_()
    ids2 = ids.view(4, -1).to(DEVICE)
    hot_sorted = hot.sort().values.to(DEVICE)
    out = bloom_embedding(
        ids2,
        weight,
        k,
        padding_idx,
        num_embeddings=60,
        backend=backend,
        signed=signed,
        importance=importance,
        hot_ids=hot_sorted,
    )
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out.to(DEVICE))
    imp_np = importance.detach().cpu().numpy() if importance is not None else None
    want, want_w, want_imp = hot_oracle(
        ids,
        weight.detach().cpu().numpy(),
        k,
        hot.numel(),
        hot.tolist(),
        padding_idx,
        signed,
        imp_np,
        grad_out.reshape(-1, dim).numpy(),
    )
    np.testing.assert_allclose(out.detach().cpu().numpy().reshape(-1, dim), want, atol=1e-12)
    np.testing.assert_allclose(weight.grad.cpu().numpy(), want_w, atol=1e-12)
    if importance is not None:
        np.testing.assert_allclose(importance.grad.cpu().numpy(), want_imp, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_hot_bags_pool_the_oracle_vectors(backend, mode):
    check_backend(backend)
    g, hot, ids, dim = random_case(3, n=30)
    k, shared = 2, 9
    weight = torch.randn(shared + hot.numel(), dim, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    offsets = torch.tensor([0, 4, 4, 13])
    psw = torch.rand(30, generator=g, dtype=torch.float64) if mode == "sum" else None
    out = bloom_embedding_bag(
        ids.to(DEVICE),
        weight,
        offsets.to(DEVICE),
        k,
        mode,
        psw.to(DEVICE) if psw is not None else None,
        hot_ids=hot.sort().values.to(DEVICE),
        backend=backend,
    )
    vectors, _, _ = hot_oracle(ids, weight.detach().cpu().numpy(), k, hot.numel(), hot.tolist())
    want = np.zeros((4, dim))
    bounds = offsets.tolist() + [30]
    for b in range(4):
        members = range(bounds[b], bounds[b + 1])
        if not members:
            continue
        rows = np.stack([vectors[i] * (float(psw[i]) if psw is not None else 1.0) for i in members])
        want[b] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0)}[mode]
    np.testing.assert_allclose(out.detach().cpu().numpy(), want, atol=1e-12)
    # The gradient: each bag's through its vectors, as autograd on the oracle's
    # per-id vectors (built from the same rows) gives it.
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out.to(DEVICE))
    reference = weight.detach().cpu().clone().requires_grad_()
    per_id = bloom_embedding(ids, reference, k, None, hot_ids=hot.sort().values, backend="torch")
    pooled = F.embedding_bag(torch.arange(30), per_id, offsets, mode=mode, per_sample_weights=psw)
    pooled.backward(grad_out)
    np.testing.assert_allclose(weight.grad.cpu().numpy(), reference.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", ["sparse", "fused_sgd", "fused_adagrad", "deterministic"])
def test_hot_rows_on_the_row_wise_paths(backend, training):
    """Sparse gradients, fused steps and the deterministic path see the
    same hot rows as the dense backward."""
    check_backend(backend)
    g, hot, ids, dim = random_case(5)
    options = dict(
        num_rows=8,
        num_hash_functions=3,
        padding_idx=None,
        backend=backend,
        signed=True,
        hot_ids=hot,
        device=DEVICE,
        dtype=torch.float64,
    )
    dense = BloomEmbedding(60, dim, **options)
    ids = ids.to(DEVICE)
    grad_out = torch.randn(ids.numel(), dim, generator=g, dtype=torch.float64).to(DEVICE)
    dense(ids).backward(grad_out)
    lr = 0.3
    if training == "sparse":
        other = BloomEmbedding(60, dim, sparse=True, **options)
        other.load_state_dict(dense.state_dict())
        other(ids).backward(grad_out)
        torch.testing.assert_close(other.weight.grad.to_dense(), dense.weight.grad, atol=1e-12, rtol=0)
    elif training == "deterministic":
        other = BloomEmbedding(60, dim, **options)
        other.load_state_dict(dense.state_dict())
        torch.use_deterministic_algorithms(True)
        try:
            other(ids).backward(grad_out)
        finally:
            torch.use_deterministic_algorithms(False)
        torch.testing.assert_close(other.weight.grad, dense.weight.grad, atol=1e-12, rtol=0)
    else:
        fused = FusedSGD(lr) if training == "fused_sgd" else FusedRowWiseAdagrad(lr, eps=1e-8)
        other = BloomEmbedding(60, dim, fused_optimizer=fused, **options)
        other.load_state_dict(dense.state_dict())
        before = other.weight.detach().clone()
        other(ids).backward(grad_out)
        grad = dense.weight.grad
        if training == "fused_sgd":
            want = before - lr * grad
        else:
            touched = grad.abs().sum(1) > 0
            state = grad.pow(2).mean(1)
            want = torch.where(touched[:, None], before - lr * grad / (state.sqrt()[:, None] + 1e-8), before)
        # The fused step's kernel scales in float32.
        torch.testing.assert_close(other.weight.detach(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_private_part_adds_a_projected_code(backend):
    check_backend(backend)
    g = torch.Generator().manual_seed(7)
    emb = BloomEmbedding(
        50,
        6,
        num_rows=9,
        num_hash_functions=2,
        padding_idx=3,
        private_dim=2,
        hot_ids=torch.tensor([4, 9]),
        backend=backend,
        device=DEVICE,
        dtype=torch.float64,
    )
    ids = torch.randint(0, 50, (3, 8), generator=g).to(DEVICE)
    ids[0, 0] = 3
    out = emb(ids)
    bloom, _, _ = hot_oracle(ids.cpu(), emb.weight.detach().cpu().numpy(), 2, 2, [4, 9], padding_idx=3)
    codes = emb.private.weight.detach().cpu().numpy()[ids.cpu().numpy().reshape(-1)]
    codes[ids.cpu().numpy().reshape(-1) == 3] = 0
    want = bloom + codes @ emb.private_projection.detach().cpu().numpy()
    np.testing.assert_allclose(out.detach().cpu().numpy().reshape(-1, 6), want, atol=1e-12)
    out.sum().backward()
    assert emb.private.weight.grad[3].abs().sum() == 0  # the padding id learns nothing
    assert emb.private_projection.grad.abs().sum() > 0
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=50).to(torch.float64)
    want_code_grad = counts[:, None] * emb.private_projection.detach().cpu().sum(1)[None, :]
    want_code_grad[3] = 0
    torch.testing.assert_close(emb.private.weight.grad.cpu(), want_code_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_private_part_in_bags_pools_the_embedding(backend, mode):
    check_backend(backend)
    options = dict(
        num_rows=9,
        num_hash_functions=2,
        private_dim=3,
        hot_ids=torch.tensor([1, 2, 30]),
        backend=backend,
        device=DEVICE,
        dtype=torch.float64,
    )
    bag = BloomEmbeddingBag(40, 4, mode=mode, **options)
    single = BloomEmbedding(40, 4, padding_idx=None, **options)
    single.load_state_dict(bag.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (5, 6), generator=g).to(DEVICE)
    want = single(ids)
    want = want.sum(1) if mode == "sum" else want.mean(1)
    torch.testing.assert_close(bag(ids), want)


def test_private_part_rejects_max_bags():
    with pytest.raises(NotImplementedError, match="private_dim=2 with mode='max'"):
        BloomEmbeddingBag(40, 4, mode="max", private_dim=2)


def test_hot_state_dict_round_trip_and_checks():
    emb = BloomEmbedding(100, 4, num_rows=10, hot_ids=torch.tensor([70, 5, 12]), private_dim=2)
    buffer = io.BytesIO()
    torch.save(emb.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["hot_ids"].tolist() == [5, 12, 70]
    other = BloomEmbedding(100, 4, num_rows=10, hot_ids=torch.tensor([1, 2, 3]), private_dim=2)
    other.load_state_dict(state)
    ids = torch.tensor([5, 12, 70, 1, 99])
    torch.testing.assert_close(other(ids), emb(ids))
    # Another hot count, or no hot set at all: the specification differs.
    with pytest.raises(ValueError, match="hot_rows"):
        BloomEmbedding(100, 4, num_rows=10, hot_ids=torch.tensor([1, 2, 3, 4]), private_dim=2).load_state_dict(state)
    with pytest.raises(ValueError, match="hot_rows"):
        plain = BloomEmbedding(100, 4, num_rows=13, private_dim=2)
        plain.load_state_dict(state)
    # Tampered hot ids (unsorted) are refused, and the module keeps its own.
    tampered = {name: value.clone() + 1 if name.endswith("weight") else value for name, value in state.items()}
    tampered["hot_ids"] = torch.tensor([12, 5, 70], dtype=state["hot_ids"].dtype)
    before = {name: value.clone() for name, value in [*other.named_parameters(), *other.named_buffers()]}
    with pytest.raises(ValueError, match="not sorted"):
        other.load_state_dict(tampered)
    for name, value in [*other.named_parameters(), *other.named_buffers()]:
        assert torch.equal(value, before[name]), name


def test_hot_argument_errors():
    with pytest.raises(ValueError, match="id 5 repeats"):
        BloomEmbedding(100, 4, hot_ids=torch.tensor([5, 9, 5]))
    with pytest.raises(IndexError, match="hot id 100 is out of range"):
        BloomEmbedding(100, 4, hot_ids=torch.tensor([5, 100]))
    with pytest.raises(ValueError, match="padding_idx=0"):
        BloomEmbedding(100, 4, hot_ids=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer ids"):
        BloomEmbedding(100, 4, hot_ids=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="private_dim needs num_embeddings"):
        BloomEmbedding(None, 4, num_rows=10, private_dim=2)
    weight = torch.randn(6, 3)
    with pytest.raises(ValueError, match="sorted and distinct"):
        bloom_embedding(torch.tensor([1]), weight, 2, hot_ids=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="fewer than the table's 6 rows"):
        bloom_embedding(torch.tensor([1]), weight, 2, hot_ids=torch.arange(6))


def test_embedding_bytes_counts_every_part():
    emb = BloomEmbedding(1000, 8, num_rows=50, hot_ids=torch.arange(1, 21), private_dim=3, importance=True)
    want = (50 + 20) * 8 * 4 + 20 * 4 + 1000 * 3 * 4 + 3 * 8 * 4 + 50 * 4 * 4
    assert embedding_bytes(emb) == want
    assert embedding_bytes(torch.nn.Embedding(1000, 8)) == 1000 * 8 * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_hot_rows_compile_without_graph_breaks(backend):
    check_backend(backend)
    emb = BloomEmbedding(
        80,
        4,
        num_rows=7,
        hot_ids=torch.tensor([3, 40]),
        private_dim=2,
        backend=backend,
        device=DEVICE,
        dtype=torch.float64,
    )
    ids = torch.randint(0, 80, (12,)).to(DEVICE)
    eager = emb(ids)
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), eager)


def test_bloomify_gives_each_table_its_hot_rows():
    from triton_bloom import bloomify

    model = torch.nn.ModuleDict({"users": torch.nn.Embedding(500, 8), "movies": torch.nn.EmbeddingBag(800, 8)})
    hot = torch.tensor([10, 3, 700])
    report = bloomify(
        model,
        compression_ratio=0.1,
        min_num_embeddings=100,
        table_options={"movies": {"hot_ids": hot, "private_dim": 2, "num_hash_functions": 2}},
    )
    items = model["movies"]
    assert isinstance(items, BloomEmbeddingBag) and items.hot_ids.tolist() == [3, 10, 700]
    assert items.private.embedding_dim == 2 and items.num_hash_functions == 2
    assert model["users"].hot_ids is None and model["users"].num_hash_functions == 4
    assert report.replaced[1].bytes_after == embedding_bytes(items)
    with pytest.raises(ValueError, match="no nn.Embedding"):
        bloomify(torch.nn.ModuleDict({"a": torch.nn.Embedding(500, 4)}), table_options={"b": {}})
    with pytest.raises(ValueError, match="cannot override"):
        bloomify(
            torch.nn.ModuleDict({"a": torch.nn.Embedding(500, 4)}),
            min_num_embeddings=10,
            table_options={"a": {"embedding_dim": 3}},
        )
