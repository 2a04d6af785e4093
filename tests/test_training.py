"""Training at scale: half-precision tables, the deterministic backward,
sparse gradients, fused optimizers and tables past 2**31 elements, on both
backends (Triton through the interpreter without a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from oracle import sklearn_rows
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD, bloom_hash
from triton_bloom.functional import bloom_embedding, bloom_embedding_bag

BACKENDS = ["torch", "triton"]
MODES = ["sum", "mean", "max"]


def check_backend(backend):
    if backend == "triton":
        require_kernels()


def zipf_ids(n, num_embeddings, generator, exponent=1.3):
    """Heavily repeated ids, as real traffic has: a few ids take most lookups."""
    ranks = torch.arange(1, num_embeddings + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)


# Half precision ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_pytorchs(backend, dtype):
    check_backend(backend)
    g = torch.Generator().manual_seed(0)
    num_rows, dim, k = 23, 40, 6
    ids = zipf_ids(300, 1000, g)
    weight = torch.randn(num_rows, dim, generator=g).to(dtype)
    grad_out = torch.randn(300, dim, generator=g).to(dtype)
    rows = torch.from_numpy(sklearn_rows(ids.numpy(), k, num_rows))

    exact_out = weight.double()[rows].sum(1)
    exact_grad = torch.zeros(num_rows, dim, dtype=torch.float64).index_add_(
        0, rows.reshape(-1), grad_out.double().repeat_interleave(k, 0)
    )
    # PyTorch's own way in the same dtype: nn.Embedding over the k rows, then a sum.
    w = weight.clone().requires_grad_(True)
    torch_out = F.embedding(rows, w).sum(1)
    torch_out.backward(grad_out)
    torch_out_err = (torch_out.double() - exact_out).abs().max().item()
    torch_grad_err = (w.grad.double() - exact_grad).abs().max().item()

    w = weight.clone().to(DEVICE).requires_grad_(True)
    out = bloom_embedding(ids.to(DEVICE), w, k, None, backend=backend)
    out.backward(grad_out.to(DEVICE))
    assert out.dtype == dtype and w.grad.dtype == dtype
    out_err = (out.double().cpu() - exact_out).abs().max().item()
    grad_err = (w.grad.double().cpu() - exact_grad).abs().max().item()
    # One rounding of a float32 sum, at most: a floor of one half-ulp of the
    # largest value keeps a lucky zero error of PyTorch's from failing us.
    floor = torch.finfo(dtype).eps * exact_grad.abs().max().item()
    assert out_err <= 2 * torch_out_err + floor
    assert grad_err <= 2 * torch_grad_err + floor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_bags(backend, mode):
    check_backend(backend)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (40,), generator=g)
    offsets = torch.tensor([0, 5, 5, 17, 30])
    weight = torch.randn(19, 24, generator=g)
    grad_out = torch.randn(5, 24, generator=g)
    results = {}
    for dtype in (torch.float64, torch.bfloat16):
        w = weight.to(dtype).to(DEVICE).requires_grad_(True)
        out = bloom_embedding_bag(ids.to(DEVICE), w, offsets.to(DEVICE), 4, mode, backend=backend)
        out.backward(grad_out.to(dtype).to(DEVICE))
        assert out.dtype == dtype and w.grad.dtype == dtype
        results[dtype] = (out.double().cpu(), w.grad.double().cpu())
    eps = torch.finfo(torch.bfloat16).eps
    for half, exact in zip(results[torch.bfloat16], results[torch.float64]):
        # Inputs rounded to bf16, sums in float32, one rounding of the result.
        assert (half - exact).abs().max().item() <= 4 * eps * max(exact.abs().max().item(), 1.0) * 4


# Deterministic backward --------------------------------------------------------


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _no_atomics(monkeypatch):
    """Make the atomic kernels fail, so a test proves they were not used."""
    kernels = require_kernels()

    def refuse(*args, **kwargs):
        raise AssertionError("the atomic backward ran under deterministic algorithms")

    monkeypatch.setattr(kernels, "bloom_backward", refuse)
    monkeypatch.setattr(kernels, "bloom_bag_backward", refuse)


def test_deterministic_embedding_backward(deterministic, monkeypatch):
    _no_atomics(monkeypatch)
    g = torch.Generator().manual_seed(2)
    ids = zipf_ids(600, 50, g).view(30, 20).to(DEVICE)
    ids[0, :5] = 1  # padding
    weight = torch.randn(37, 33, generator=g).to(DEVICE)
    grad_out = torch.randn(30, 20, 33, generator=g).to(DEVICE)
    grads = []
    for _ in range(3):
        w = weight.clone().requires_grad_(True)
        bloom_embedding(ids, w, 5, 1, backend="triton").backward(grad_out)
        grads.append(w.grad)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    w = weight.clone().requires_grad_(True)
    bloom_embedding(ids, w, 5, 1, backend="torch").backward(grad_out)
    torch.testing.assert_close(grads[0], w.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_bag_backward(deterministic, monkeypatch, mode):
    _no_atomics(monkeypatch)
    g = torch.Generator().manual_seed(3)
    ids = zipf_ids(200, 40, g).to(DEVICE)
    offsets = torch.tensor([0, 3, 3, 50, 120, 199], device=DEVICE)
    weight = torch.randn(21, 17, generator=g).to(DEVICE)
    psw = torch.rand(200, generator=g).to(DEVICE) if mode == "sum" else None
    grad_out = torch.randn(6, 17, generator=g).to(DEVICE)
    results = []
    for backend in ("triton", "triton", "torch"):
        w = weight.clone().requires_grad_(True)
        p = psw.clone().requires_grad_(True) if psw is not None else None
        bloom_embedding_bag(ids, w, offsets, 3, mode, p, padding_idx=0, backend=backend).backward(grad_out)
        results.append((w.grad, p.grad if p is not None else None))
    (first_w, first_p), (second_w, second_p), (ref_w, ref_p) = results
    assert torch.equal(first_w, second_w)
    torch.testing.assert_close(first_w, ref_w, atol=1e-4, rtol=1e-5)
    if psw is not None:
        assert torch.equal(first_p, second_p)
        torch.testing.assert_close(first_p, ref_p, atol=1e-4, rtol=1e-5)


# Sparse gradients ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["embedding", "sum", "mean", "max"])
def test_sparse_gradient_equals_dense(backend, layer):
    check_backend(backend)
    g = torch.Generator().manual_seed(4)
    ids = zipf_ids(60, 300, g).to(DEVICE)
    ids[:4] = 2  # padding
    weight = torch.randn(41, 9, generator=g).to(DEVICE)
    grads = []
    for sparse in (False, True):
        w = weight.clone().requires_grad_(True)
        if layer == "embedding":
            out = bloom_embedding(ids.view(6, 10), w, 3, 2, backend=backend, sparse=sparse)
        else:
            out = bloom_embedding_bag(ids.view(6, 10), w, None, 3, layer, padding_idx=2, backend=backend, sparse=sparse)
        (grad,) = torch.autograd.grad(out, w, torch.ones_like(out))
        grads.append(grad)
    dense, sparse_grad = grads
    # Sorted unique rows, flagged coalesced. (Stored into .grad by backward(),
    # PyTorch's AccumulateGrad rebuilds the tensor and drops the flag, though
    # the rows stay sorted and unique.)
    assert sparse_grad.is_sparse and sparse_grad.is_coalesced()
    touched = sparse_grad.indices()[0]
    expected_rows = torch.unique(bloom_hash(ids[ids != 2].cpu(), 3, 41))
    assert torch.equal(touched.cpu(), expected_rows)
    torch.testing.assert_close(sparse_grad.to_dense(), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: torch.optim.SparseAdam(p, lr=0.1),
    ],
    ids=["SGD", "Adagrad", "SparseAdam"],
)
def test_sparse_module_trains_with_sparse_optimizers(backend, make_optimizer):
    check_backend(backend)
    torch.manual_seed(5)
    dense = BloomEmbedding(1000, 8, num_rows=97, backend=backend, device=DEVICE)
    sparse = BloomEmbedding(1000, 8, num_rows=97, backend=backend, sparse=True, device=DEVICE)
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 1000, (5, 7), device=DEVICE)
    opt_sparse = make_optimizer(sparse.parameters())
    if isinstance(opt_sparse, torch.optim.SparseAdam):
        opt_dense = torch.optim.Adam(dense.parameters(), lr=0.1)  # SparseAdam refuses dense gradients
    else:
        opt_dense = make_optimizer(dense.parameters())
    before = sparse.weight.detach().clone()
    for _ in range(3):
        for module, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            module(ids).pow(2).sum().backward()
            opt.step()
    touched = torch.unique(bloom_hash(ids[ids != 0].cpu(), 4, 97)).to(DEVICE)
    untouched = torch.ones(97, dtype=torch.bool, device=DEVICE)
    untouched[touched] = False
    assert torch.equal(sparse.weight[untouched], before[untouched])
    assert not torch.equal(sparse.weight[touched], before[touched])
    if not isinstance(opt_sparse, torch.optim.SparseAdam):
        # SGD and Adagrad on a sparse gradient equal themselves on the dense one.
        torch.testing.assert_close(sparse.weight, dense.weight, atol=1e-5, rtol=1e-5)


# Fused optimizers ----------------------------------------------------------------


def rowwise_adagrad_oracle(weight, grad, state, lr, eps):
    """Row-wise Adagrad on a dense gradient, in float64."""
    state = state + grad.pow(2).mean(1)
    return weight - lr * grad / (state.sqrt() + eps).unsqueeze(1), state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["embedding", "sum", "mean", "max"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_optimizer_step_equals_dense_step(backend, layer, optimizer):
    check_backend(backend)
    torch.manual_seed(6)
    lr, eps = 0.05, 1e-6
    fused = FusedSGD(lr) if optimizer == "sgd" else FusedRowWiseAdagrad(lr, eps=eps)
    kwargs = dict(num_rows=53, backend=backend, device=DEVICE)
    if layer == "embedding":
        plain, trained = BloomEmbedding(800, 10, **kwargs), BloomEmbedding(800, 10, fused_optimizer=fused, **kwargs)
    else:
        plain = BloomEmbeddingBag(800, 10, mode=layer, padding_idx=0, **kwargs)
        trained = BloomEmbeddingBag(800, 10, mode=layer, padding_idx=0, fused_optimizer=fused, **kwargs)
    trained.load_state_dict(plain.state_dict())
    weight = plain.weight.detach().double().cpu()
    state = torch.zeros(53, dtype=torch.float64)
    for step in range(3):
        ids = torch.randint(0, 800, (6, 5), device=DEVICE)
        ids[0, step] = 0
        target = torch.randn(6, 5, 10, device=DEVICE) if layer == "embedding" else torch.randn(6, 10, device=DEVICE)
        # The dense gradient of this batch at the current weights, then the step.
        plain.load_state_dict({"embeddings.weight": weight.to(plain.weight.dtype).to(DEVICE)})
        plain.weight.grad = None
        (plain(ids) * target).sum().backward()
        grad = plain.weight.grad.double().cpu()
        if optimizer == "sgd":
            weight = weight - lr * grad
        else:
            weight, state = rowwise_adagrad_oracle(weight, grad, state, lr, eps)
        (trained(ids) * target).sum().backward()
        assert trained.weight.grad is None
        torch.testing.assert_close(trained.weight.detach().double().cpu(), weight, atol=1e-5, rtol=1e-5)
    if optimizer == "adagrad":
        torch.testing.assert_close(fused.accumulator.double().cpu(), state, atol=1e-6, rtol=1e-5)


def test_fused_optimizer_state_dict_round_trip():
    opt = FusedRowWiseAdagrad(lr=0.1)
    emb = BloomEmbedding(100, 4, fused_optimizer=opt)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    saved = opt.state_dict()
    fresh = FusedRowWiseAdagrad(lr=0.5)
    fresh.load_state_dict(saved)
    assert fresh.lr == 0.1 and torch.equal(fresh.accumulator, opt.accumulator)
    assert list(emb.state_dict()) == ["_extra_state", "embeddings.weight"]
    assert "fused_optimizer=FusedRowWiseAdagrad(lr=0.1" in repr(emb)


# Tables of 2**31 elements and more --------------------------------------------------


@pytest.mark.slow
def test_table_past_2_31_elements():
    # 1.25 * 2**31 elements; bf16 keeps the table at 5 GiB. Forward, sparse
    # backward and a fused SGD step must reach rows past element 2**31 on
    # both backends (int64 addressing); a dense float32 gradient (10 GiB) is
    # left out on purpose.
    require_kernels()
    dim = 4
    num_rows = 5 * 2**31 // (4 * dim)
    weight = torch.zeros(num_rows, dim, dtype=torch.bfloat16)
    ids = torch.arange(1, 2_000, dtype=torch.int64)
    rows = bloom_hash(ids, 2, num_rows)
    ids = ids[(rows.min(dim=1).values * dim > 2**31)][:64]  # ids whose rows all lie past 2**31
    rows = bloom_hash(ids, 2, num_rows)
    assert ids.numel() >= 32 and int(rows.min()) * dim > 2**31
    values = torch.arange(1, rows.numel() + 1, dtype=torch.bfloat16).view(-1, 1).expand(-1, dim) / 64
    weight[rows.reshape(-1)] = values
    expected = weight[rows].float().sum(1)
    for backend in BACKENDS:
        out = bloom_embedding(ids, weight, 2, None, backend=backend)
        torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)
        w = weight.detach().requires_grad_(True)
        bloom_embedding(ids, w, 2, None, backend=backend, sparse=True).sum().backward()
        assert torch.equal(w.grad.coalesce().indices()[0], torch.unique(rows))
        before = weight[rows.reshape(-1)].float()
        bloom_embedding(ids, w, 2, None, backend=backend, fused_optimizer=FusedSGD(lr=0.5)).sum().backward()
        moved = before - weight[rows.reshape(-1)].float()
        assert bool((moved > 0).all())
        weight[rows.reshape(-1)] = values  # undo the step for the next backend
        del w


# Bad input -----------------------------------------------------------------------


def test_training_option_errors():
    with pytest.raises(ValueError, match="exclude each other"):
        BloomEmbedding(100, 4, sparse=True, fused_optimizer=FusedSGD(0.1))
    with pytest.raises(TypeError, match="fused_optimizer"):
        BloomEmbedding(100, 4, fused_optimizer=torch.optim.SGD)
    with pytest.raises(TypeError, match="dtype"):
        BloomEmbedding(100, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        bloom_embedding(torch.tensor([1]), torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="learning rate"):
        FusedSGD(lr=0)
    with pytest.raises(ValueError, match="learning rate"):
        FusedRowWiseAdagrad(lr=-1)
    with pytest.raises(ValueError, match="epsilon"):
        FusedRowWiseAdagrad(eps=-1)
