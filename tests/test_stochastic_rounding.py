"""Stochastic rounding of half-precision tables in the fused optimizers, on
both backends: every stored value is one of the two neighbours of the exact
float32 update, their mean is the exact update (within a bound computed from
the neighbours' spacing), updates below half a unit in the last place are
kept in expectation, a seed reproduces a run, the kernels and the PyTorch
path store the same bits, and float32/float64 tables are left as they were."""

import copy
import math

import pytest
import torch
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD, ops
from triton_bloom.constants import FUSED_ROWWISE_ADAGRAD, FUSED_SGD, MODE_SUM

BACKENDS = ["torch", "triton"]
HALF = [torch.bfloat16, torch.float16]


def check_backend(backend):
    if backend == "triton":
        require_kernels()


def representable(dtype):
    """Every finite value of ``dtype``, sorted, in float64 (the oracle's neighbours)."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    values = values[torch.isfinite(values)]
    return torch.unique(values)


def neighbours(x, dtype):
    """``(lo, hi)``: the representable values of ``dtype`` at or below and
    at or above each float32 ``x`` (equal when ``x`` is representable)."""
    table = representable(dtype)
    x64 = x.double().cpu()
    hi = table[torch.searchsorted(table, x64, side="left").clamp(max=table.numel() - 1)]
    lo = table[(torch.searchsorted(table, x64, side="right") - 1).clamp(min=0)]
    return lo, hi


def rounded_steps(x, dtype, backend, *, rows, seed, lr=1.0):
    """``x`` (a ``(dim,)`` float32 vector) stored into ``rows`` zero rows of a
    ``dtype`` table by one fused SGD step on each backend's path: ``0 - lr *
    (-x / lr)`` is ``x`` in float32, so the table holds ``x``'s rounding,
    ``rows`` independent draws per element."""
    dim = x.numel()
    weight = torch.zeros(rows, dim, dtype=dtype, device=DEVICE)
    values = (-x / lr).to(DEVICE).expand(rows, dim).contiguous()
    rounding = torch.tensor([seed, 0], dtype=torch.int64, device=DEVICE)
    ops.bloom_rowwise_update(
        weight,
        torch.arange(rows, device=DEVICE),
        values,
        None,
        rounding,
        optimizer=FUSED_SGD,
        lr=lr,
        use_triton=backend == "triton",
    )
    assert rounding.tolist() == [seed, 1]
    return weight.cpu()


def awkward_values(generator, dim):
    """float32 values between representable half-precision ones, of many
    magnitudes and both signs, with float16 subnormals among them."""
    magnitudes = torch.logspace(-6.5, 3, dim, dtype=torch.float64)
    signs = torch.where(torch.rand(dim, generator=generator) < 0.5, -1.0, 1.0).double()
    return (magnitudes * signs * (1 + torch.rand(dim, generator=generator, dtype=torch.float64) / 7)).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_rounding_picks_a_neighbour_and_is_unbiased(backend, dtype):
    check_backend(backend)
    g = torch.Generator().manual_seed(int(dtype == torch.float16) * 10 + 1)
    x = awkward_values(g, 24)
    rows = 4096
    stored = rounded_steps(x, dtype, backend, rows=rows, seed=12345).double()
    lo, hi = neighbours(x, dtype)
    assert bool(((stored == lo) | (stored == hi)).all())
    # Each draw is hi with probability p = (x - lo) / (hi - lo): the mean of
    # `rows` draws has standard deviation (hi - lo) * sqrt(p (1 - p) / rows).
    gap = hi - lo
    p = (x.double() - lo) / gap
    sigma = gap * (p * (1 - p) / rows).sqrt()
    mean = stored.mean(0)
    assert bool(((mean - x.double()).abs() <= 6 * sigma + 1e-300).all()), (mean - x.double()) / sigma
    # Round-to-nearest of the same values is biased by far more than that bound somewhere.
    nearest = x.to(dtype).double()
    assert bool(((nearest - x.double()).abs() > 6 * sigma).any())


@pytest.mark.parametrize("dtype", HALF)
def test_representable_values_are_kept_and_specials_pass_through(dtype):
    g = torch.Generator().manual_seed(2)
    exact = torch.randn(16, generator=g).to(dtype).float()
    specials = [0.0, float("inf"), float("-inf"), float("nan")]
    # Past float16's largest finite value, round-to-nearest gives infinity; bfloat16 reaches 3.4e38.
    specials = torch.tensor(specials + ([1e6, -1e6] if dtype == torch.float16 else []))
    x = torch.cat([exact, specials])
    stored = rounded_steps(x, dtype, "torch", rows=64, seed=7).float()
    torch.testing.assert_close(stored[:, :16], exact.expand(64, 16), rtol=0, atol=0)
    # Infinities, NaN and (float16) values round-to-nearest sends to infinity stay as it stores them.
    nearest = specials.to(dtype).float()
    torch.testing.assert_close(stored[:, 16:], nearest.expand(64, -1), rtol=0, atol=0, equal_nan=True)


def linear_loss_batch(seed=3, num_rows=256, dim=32, n=512):
    """Ids, a target and the float64 gradient ``G`` of the linear loss
    ``sum(lookup(ids) * target)`` over a ``(num_rows, dim)`` table: a
    gradient that does not depend on the weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20_000, (n,), generator=g).to(DEVICE)
    target = torch.randn(n, dim, generator=g).to(DEVICE)
    dense = BloomEmbedding(20_000, dim, num_rows=num_rows, backend="torch", device=DEVICE, dtype=torch.float64)
    (dense(ids) * target.double()).sum().backward()
    return ids, target, dense.weight.grad.cpu()


def small_update_run(dtype, backend, batch, *, stochastic, steps, lr, seed=3):
    """A table of ones trained on ``batch`` (:func:`linear_loss_batch`) for
    ``steps``: the exact weights are then ``1 - steps * lr * G``."""
    ids, target, grad = batch
    opt = FusedSGD(lr=lr, stochastic_rounding=stochastic, seed=seed)
    emb = BloomEmbedding(20_000, grad.shape[1], num_rows=grad.shape[0], backend=backend, device=DEVICE, dtype=dtype,
                         fused_optimizer=opt)  # fmt: skip
    with torch.no_grad():
        emb.weight.fill_(1.0)
    for _ in range(steps):
        (emb(ids).float() * target).sum().backward()
    return emb.weight.detach().double().cpu(), 1.0 - steps * lr * grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_updates_below_half_an_ulp_add_up(backend, dtype):
    check_backend(backend)
    steps = 6
    batch = linear_loss_batch()
    ulp = torch.finfo(dtype).eps  # the spacing just above 1.0; just below it, half that
    # A typical step moves a weight by a tenth of the spacing.
    lr = 0.1 * ulp / float(batch[2].abs().mean())
    sr, exact = small_update_run(dtype, backend, batch, stochastic=True, steps=steps, lr=lr)
    rtn, _ = small_update_run(dtype, backend, batch, stochastic=False, steps=steps, lr=lr)
    drift = exact - 1.0
    moved = drift != 0
    # Round-to-nearest keeps every weight whose step is below a quarter of
    # the spacing at 1.0 (half the spacing below it) where it started.
    small = moved & (drift.abs() < steps * ulp / 4)
    assert int(small.sum()) > 0.5 * int(moved.sum())
    assert bool((rtn[small] == 1.0).all())
    # Each step's rounding error has mean zero and variance at most ulp**2 / 4,
    # independent across steps and elements: projected on the drift's sign,
    # the mean error of n moved elements has standard deviation at most
    # ulp * sqrt(steps / 4 / n).
    n = int(moved.sum())
    sigma = ulp * math.sqrt(steps / 4 / n)
    direction = drift.sign()
    sr_bias = float(((sr - exact) * direction)[moved].mean())
    rtn_bias = float(((rtn - exact) * direction)[moved].mean())
    mean_drift = float(drift.abs()[moved].mean())
    assert 6 * sigma < 0.5 * mean_drift  # the bound can tell the two apart
    assert abs(sr_bias) <= 6 * sigma
    # Round-to-nearest loses most of the drift (it keeps only the large steps).
    assert rtn_bias < -0.5 * mean_drift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_same_seed_same_bits_other_seed_other_bits(backend, optimizer):
    check_backend(backend)

    def run(seed):
        make = FusedSGD if optimizer == "sgd" else FusedRowWiseAdagrad
        opt = make(lr=0.01, seed=seed)
        torch.manual_seed(0)
        emb = BloomEmbeddingBag(500, 12, num_rows=40, mode="mean", backend=backend, device=DEVICE,
                                dtype=torch.bfloat16, fused_optimizer=opt)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            ids = torch.randint(0, 500, (8, 5), generator=g).to(DEVICE)
            (emb(ids).float() * torch.randn(8, 12, generator=g).to(DEVICE)).sum().backward()
        return emb.weight.detach().cpu(), opt.steps

    first, steps = run(11)
    again, _ = run(11)
    other, _ = run(12)
    assert steps == 3
    assert torch.equal(first.view(torch.int16), again.view(torch.int16))
    assert not torch.equal(first.view(torch.int16), other.view(torch.int16))


def test_default_seed_follows_torch_manual_seed():
    torch.manual_seed(4)
    a = FusedSGD(lr=0.1)
    torch.manual_seed(4)
    b = FusedRowWiseAdagrad(lr=0.1)
    torch.manual_seed(5)
    c = FusedSGD(lr=0.1)
    assert a.seed == b.seed != c.seed


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("optimizer", [FUSED_SGD, FUSED_ROWWISE_ADAGRAD])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dim", [1, 7, 24, 130])
def test_backends_store_the_same_bits(optimizer, dtype, dim, stochastic):
    # Round-to-nearest too: Triton's interpreter truncates float32 to
    # bfloat16, so the kernel spells out the rounding a GPU does.
    require_kernels()
    g = torch.Generator().manual_seed(dim)
    num_rows = 37
    weight = torch.randn(num_rows, dim, generator=g).to(dtype)
    rows = torch.randperm(num_rows, generator=g)[:20].sort().values
    values = torch.randn(20, dim, generator=g) / 50
    state = torch.rand(num_rows, generator=g)
    results = []
    for use_triton in (False, True):
        w, s = weight.clone().to(DEVICE), state.clone().to(DEVICE)
        rounding = torch.tensor([2**32 - 5, 2**40 + 3], dtype=torch.int64, device=DEVICE)
        for step in range(2):
            ops.bloom_rowwise_update(
                w,
                rows.to(DEVICE),
                values.to(DEVICE) * (step + 1),
                s if optimizer == FUSED_ROWWISE_ADAGRAD else None,
                rounding if stochastic else None,
                optimizer=optimizer,
                lr=0.3,
                eps=1e-8,
                use_triton=use_triton,
            )
        results.append((w.cpu(), s.cpu(), rounding.cpu()))
    (w0, s0, r0), (w1, s1, r1) = results
    assert torch.equal(r0, r1) and int(r0[1]) == 2**40 + (5 if stochastic else 3)
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    assert torch.equal(w0.view(torch.int16), w1.view(torch.int16))
    untouched = torch.ones(num_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(w0[untouched].view(torch.int16), weight[untouched].view(torch.int16))


@pytest.mark.parametrize("layer", ["embedding", "sum"])
@pytest.mark.parametrize("dtype", HALF)
def test_module_training_same_bits_on_both_backends(layer, dtype):
    # The touched rows' float32 sums of half-precision gradients are exact
    # here (a few terms of 8 or 11 bits), so both paths round the same value.
    require_kernels()
    results = []
    for backend in BACKENDS:
        torch.manual_seed(1)
        opt = FusedSGD(lr=0.03, seed=99)
        kwargs = dict(num_rows=45, backend=backend, device=DEVICE, dtype=dtype, fused_optimizer=opt)
        emb = BloomEmbedding(900, 9, **kwargs) if layer == "embedding" else BloomEmbeddingBag(900, 9, **kwargs)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            ids = torch.randint(0, 900, (6, 4), generator=g).to(DEVICE)
            out = emb(ids)
            (out * torch.randn(out.shape, generator=g).to(dtype).to(DEVICE)).sum().backward()
        results.append(emb.weight.detach().cpu())
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [FusedSGD, FusedRowWiseAdagrad])
def test_full_precision_tables_unchanged(backend, dtype, make):
    check_backend(backend)
    results = []
    for stochastic in (True, False):
        torch.manual_seed(3)
        opt = make(lr=0.05, stochastic_rounding=stochastic, seed=1)
        emb = BloomEmbedding(700, 8, num_rows=30, backend=backend, device=DEVICE, dtype=dtype, fused_optimizer=opt)
        g = torch.Generator().manual_seed(4)
        for _ in range(2):
            ids = torch.randint(0, 700, (20,), generator=g).to(DEVICE)
            (emb(ids) * torch.randn(20, 8, generator=g, dtype=dtype).to(DEVICE)).sum().backward()
        assert opt.rounding is None and opt.steps == 0
        results.append(emb.weight.detach().cpu())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", HALF)
def test_round_to_nearest_when_turned_off(dtype):
    torch.manual_seed(0)
    opt = FusedSGD(lr=0.1, stochastic_rounding=False)
    emb = BloomEmbedding(300, 6, num_rows=20, backend="torch", dtype=dtype, fused_optimizer=opt)
    before = emb.weight.detach().float().clone()
    ids = torch.arange(1, 40)
    target = torch.randn(39, 6)
    (emb(ids).float() * target).sum().backward()
    # The float32 gradient of the linear loss, then one round-to-nearest step.
    dense = BloomEmbedding(300, 6, num_rows=20, backend="torch")
    with torch.no_grad():
        dense.weight.copy_(before)
    (dense(ids) * target.to(dtype).float()).sum().backward()
    expected = (before - 0.1 * dense.weight.grad).to(dtype)
    assert torch.equal(emb.weight.detach().view(torch.int16), expected.view(torch.int16))
    assert "stochastic_rounding=False" in repr(opt)


def test_state_dict_resumes_the_same_stream():
    def module(opt):
        torch.manual_seed(0)
        return BloomEmbedding(400, 8, num_rows=25, backend="torch", dtype=torch.bfloat16, fused_optimizer=opt)

    def train(emb, batches):
        for ids, target in batches:
            (emb(ids).float() * target).sum().backward()

    g = torch.Generator().manual_seed(8)
    batches = [(torch.randint(1, 400, (30,), generator=g), torch.randn(30, 8, generator=g)) for _ in range(4)]
    opt = FusedRowWiseAdagrad(lr=0.05, seed=21)
    emb = module(opt)
    train(emb, batches[:2])
    # State dicts hold the live tensors, as torch.optim's do: copies, as a checkpoint on disk would be.
    saved_opt, saved_table = copy.deepcopy(opt.state_dict()), copy.deepcopy(emb.state_dict())
    assert saved_opt["seed"] == 21 and saved_opt["steps"] == 2 and saved_opt["stochastic_rounding"]
    train(emb, batches[2:])
    resumed_opt = FusedRowWiseAdagrad(lr=0.05, seed=5)
    resumed = module(resumed_opt)
    resumed.load_state_dict(saved_table)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, batches[2:])
    assert resumed_opt.steps == 4
    assert torch.equal(resumed.weight.detach().view(torch.int16), emb.weight.detach().view(torch.int16))
    # A state dict saved before stochastic rounding existed keeps the optimizer's own settings.
    old = FusedSGD(lr=0.2, seed=9)
    old.load_state_dict({"lr": 0.3})
    assert old.lr == 0.3 and old.seed == 9 and old.stochastic_rounding


def test_bad_rounding_options():
    for seed in (-1, 2**32, 1.5, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            FusedSGD(lr=0.1, seed=seed)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        FusedRowWiseAdagrad(lr=0.1, stochastic_rounding=1)


def test_compiled_training_rounds_as_eager():
    # The step counter is a tensor the fused step increments in place, so a
    # compiled graph draws fresh bits every step without recompiling.
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        opt = FusedSGD(lr=0.01, seed=17)
        emb = BloomEmbedding(500, 8, num_rows=30, backend="torch", dtype=torch.bfloat16, fused_optimizer=opt)

        def loss(ids, target, emb=emb):
            return (emb(ids).float() * target).sum()

        run = torch.compile(loss, backend="aot_eager", fullgraph=True) if compiled else loss
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            run(torch.randint(1, 500, (16,), generator=g), torch.randn(16, 8, generator=g)).backward()
        results.append((emb.weight.detach().clone(), opt.steps))
    assert results[0][1] == results[1][1] == 3
    assert torch.equal(results[0][0].view(torch.int16), results[1][0].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_step_ops(backend):
    check_backend(backend)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 5, generator=g).to(torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, 60, (7,), generator=g).to(DEVICE)
    grad_out = torch.randn(7, 5, generator=g).to(torch.bfloat16).to(DEVICE)
    lookup = dict(num_hash_functions=3, padding_idx=0, num_embeddings=60, signed=False)
    step = dict(optimizer=FUSED_ROWWISE_ADAGRAD, lr=0.1, eps=1e-8, use_triton=backend == "triton")
    state = torch.rand(13, generator=g).to(DEVICE)
    rounding = torch.tensor([3, 0], dtype=torch.int64, device=DEVICE)
    args = (grad_out, ids, weight, None, None, None, state, rounding)
    torch.library.opcheck(ops.bloom_backward_step, args, dict(**lookup, **step))
    offsets = torch.tensor([0, 2, 2, 7], device=DEVICE)
    psw = torch.rand(7, generator=g).to(torch.bfloat16).to(DEVICE)
    argmax = torch.empty(0, dtype=torch.int64, device=DEVICE)
    bag_grad = torch.randn(3, 5, generator=g).to(torch.bfloat16).to(DEVICE)
    args = (bag_grad, ids, offsets, weight, psw, None, None, argmax, None, rounding)
    options = dict(lookup, bag_mode=MODE_SUM, psw_grad=True, **{**step, "optimizer": FUSED_SGD})
    torch.library.opcheck(ops.bloom_bag_backward_step, args, options)
