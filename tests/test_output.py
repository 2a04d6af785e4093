"""The output side (``triton_bloom.output``) against brute force that
materialises every id's vector: top-k (ties by id, exclusions, candidates),
tied logits and their gradients, the fused cross-entropy, the sampled
softmax, and the Bloom output layer's decoder, on both backends (the Triton
one through the interpreter without a GPU), on fresh random data.

Top-k ids are compared exactly, so those cases use small integer tables and
queries: every score is then exact in float32 whatever the order of the
sums, and ties (many, from the integers and from ids whose rows all collide
in a tiny table) must be broken by id exactly as brute force breaks them.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomOutputLayer, TiedBloomLinear, bloom_cross_entropy, bloom_rank, bloom_topk
from triton_bloom.hashing import hash_rows, seed_tensor
from triton_bloom.ranking import items_above

BACKENDS = ["torch", "triton"]
NEG_INF = float("-inf")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        require_kernels()
    return request.param


def make_embedding(rnd, backend, *, integer, dtype=torch.float32):
    """A small random Bloom embedding: tiny tables make ids whose rows all
    collide (identical vectors, hence tied scores)."""
    num_embeddings = rnd.choice([1, 7, 60, 150, 333])
    emb = BloomEmbedding(
        num_embeddings,
        rnd.choice([1, 5, 16, 33]),
        num_rows=rnd.choice([1, 3, 11, 40]),
        num_hash_functions=rnd.choice([1, 2, 4, 7]),
        padding_idx=rnd.choice([None, 0, num_embeddings - 1]),
        signed=rnd.random() < 0.4,
        importance=rnd.random() < 0.4,
        backend=backend,
        dtype=dtype,
        device=DEVICE,
    )
    g = torch.Generator().manual_seed(rnd.randrange(2**31))
    with torch.no_grad():
        if integer:
            emb.weight.copy_(torch.randint(-3, 4, emb.weight.shape, generator=g))
        else:
            emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))
        if emb.importance_weight is not None:
            emb.importance_weight.copy_(torch.randint(1, 4, emb.importance_weight.shape, generator=g))
    return emb, g


def all_vectors(emb):
    with torch.no_grad():
        return emb(torch.arange(emb.num_embeddings, device=DEVICE)).double()


def brute_topk(scores, k):
    """Top-k of ``(Q, N)`` float64 scores (``-inf`` = excluded) by score,
    ties to the smaller column, ``-1`` / ``-inf`` past the last valid one."""
    q, n = scores.shape
    values, order = scores.sort(dim=1, descending=True, stable=True)
    values, order = values[:, :k], order[:, :k]
    if n < k:
        values = torch.cat([values, values.new_full((q, k - n), NEG_INF)], 1)
        order = torch.cat([order, order.new_full((q, k - n), -1)], 1)
    return values, order.masked_fill(values == NEG_INF, -1)


def random_exclude(rnd, g, num_queries, num_embeddings):
    m = rnd.randint(0, 6)
    exclude = torch.randint(0, num_embeddings, (num_queries, m), generator=g)
    exclude[torch.rand(exclude.shape, generator=g) < 0.3] = -1
    return exclude.to(DEVICE)


def exact_scores(queries, vectors):
    """float32 scores that depend on the query and the vector alone (a BLAS
    float32 product of a few columns sums in another order than one of many)."""
    return (queries.double() @ vectors.double().T).float()


def excluded_scores(scores, exclude, targets=None, padding_idx=None):
    """``scores`` with each query's excluded ids (never its own target) and
    the padding id at ``-inf``."""
    scores = scores.clone()
    if padding_idx is not None:
        scores[:, padding_idx] = NEG_INF
    if exclude is not None:
        for q, row in enumerate(exclude.tolist()):
            scores[q, [i for i in row if i >= 0 and (targets is None or i != int(targets[q]))]] = NEG_INF
    return scores


@pytest.mark.parametrize("seed", range(12))
def test_topk_equals_brute_force_with_ties_and_exclusions(seed, backend):
    rnd = random.Random(seed)
    emb, g = make_embedding(rnd, backend, integer=True)
    num_queries = rnd.choice([1, 3, 17])
    queries = torch.randint(-3, 4, (num_queries, emb.embedding_dim), generator=g).float().to(DEVICE)
    exclude = random_exclude(rnd, g, num_queries, emb.num_embeddings) if rnd.random() < 0.7 else None
    k = rnd.choice([1, 4, 10, 400])
    top = emb.topk(queries, k, exclude=exclude, chunk_size=rnd.choice([1, 7, 64, None]))

    scores = excluded_scores(queries.double() @ all_vectors(emb).T, exclude, padding_idx=emb.padding_idx)
    values, ids = brute_topk(scores, k)
    assert torch.equal(top.ids.cpu(), ids.cpu())
    assert torch.equal(top.scores.double().cpu(), values.cpu())


@pytest.mark.parametrize("seed", range(6))
def test_topk_duplicate_vectors_tie_by_id(seed, backend):
    # k = 1 into 2 rows: every id's vector is one of two rows (times a sign),
    # so almost every score is tied with many others.
    rnd = random.Random(100 + seed)
    emb = BloomEmbedding(
        rnd.choice([50, 200]), 16, num_rows=2, num_hash_functions=1, padding_idx=None, backend=backend, device=DEVICE
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # integers: the scores are exact, so the ties are too
        emb.weight.copy_(torch.randint(-5, 6, emb.weight.shape, generator=g))
    queries = torch.randint(-5, 6, (5, 16), generator=g).float().to(DEVICE)
    top = emb.topk(queries, 20, chunk_size=rnd.choice([3, 16, 1000]))
    values, ids = brute_topk(queries.double() @ all_vectors(emb).T, 20)
    assert torch.equal(top.ids.cpu(), ids.cpu())
    # The tied ids must be the smallest ones: ascending within equal scores.
    for row_scores, row_ids in zip(top.scores.tolist(), top.ids.tolist()):
        for a, b, i, j in zip(row_scores, row_scores[1:], row_ids, row_ids[1:]):
            assert a > b or (a == b and i < j)


@pytest.mark.parametrize("seed", range(6))
def test_topk_float_data_matches_brute_force(seed, backend):
    rnd = random.Random(200 + seed)
    emb, g = make_embedding(rnd, backend, integer=False)
    queries = torch.randn(rnd.choice([2, 9]), emb.embedding_dim, generator=g).to(DEVICE)
    k = rnd.choice([1, 5])
    top = emb.topk(queries, k, chunk_size=rnd.choice([13, None]))
    scores = queries.double() @ all_vectors(emb).T
    if emb.padding_idx is not None:
        scores[:, emb.padding_idx] = NEG_INF
    values, _ = brute_topk(scores, k)
    torch.testing.assert_close(top.scores.double().cpu(), values.cpu(), atol=1e-4, rtol=1e-5)
    # Each returned id really has the returned score (near-ties may swap ids).
    valid = top.ids >= 0
    got = scores.gather(1, top.ids.clamp(min=0))[valid]
    torch.testing.assert_close(got.cpu(), top.scores.double()[valid].cpu(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_topk_candidates(seed, backend):
    rnd = random.Random(300 + seed)
    emb, g = make_embedding(rnd, backend, integer=True)
    n = emb.num_embeddings
    num_queries = rnd.choice([1, 4])
    queries = torch.randint(-3, 4, (num_queries, emb.embedding_dim), generator=g).float().to(DEVICE)
    exclude = random_exclude(rnd, g, num_queries, n) if rnd.random() < 0.6 else None
    per_query = rnd.random() < 0.5
    width = rnd.randint(1, 30)
    if per_query:
        candidates = torch.randint(0, n, (num_queries, width), generator=g)
        candidates[torch.rand(candidates.shape, generator=g) < 0.2] = -1
    else:
        candidates = torch.randint(0, n, (width,), generator=g)  # repeats count once
    candidates = candidates.to(DEVICE)
    k = rnd.choice([1, 3, 50])
    top = emb.topk(queries, k, candidates=candidates, exclude=exclude, chunk_size=rnd.choice([2, 5, None]))

    scores = torch.full((num_queries, n), NEG_INF, dtype=torch.float64)
    full = (queries.double() @ all_vectors(emb).T).cpu()
    for q in range(num_queries):
        row = candidates[q] if per_query else candidates
        allowed = sorted({i for i in row.tolist() if i >= 0})
        scores[q, allowed] = full[q, allowed]
    scores = excluded_scores(scores, exclude, padding_idx=emb.padding_idx)
    values, ids = brute_topk(scores, k)
    assert torch.equal(top.ids.cpu(), ids)
    assert torch.equal(top.scores.double().cpu(), values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_topk_table_dtypes(dtype, backend):
    rnd = random.Random(7)
    emb, g = make_embedding(rnd, backend, integer=True, dtype=dtype)
    queries = torch.randint(-3, 4, (3, emb.embedding_dim), generator=g).to(dtype).to(DEVICE)
    top = emb.topk(queries, 6, chunk_size=17)
    assert top.scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scores = queries.double() @ all_vectors(emb).T
    if emb.padding_idx is not None:
        scores[:, emb.padding_idx] = NEG_INF
    values, ids = brute_topk(scores, 6)
    assert torch.equal(top.ids.cpu(), ids.cpu())


def test_scores_kernel_matches_reference_vectors():
    kernels = require_kernels()
    g = torch.Generator().manual_seed(0)
    # bfloat16: the PyTorch lookup and the kernels round a vector's sum at
    # different points (TOLERANCES in support.py).
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-3)):
        emb = BloomEmbedding(
            None,
            37,
            num_rows=29,
            num_hash_functions=3,
            padding_idx=11,
            signed=True,
            importance=True,
            dtype=dtype,
            backend="torch",
        )
        with torch.no_grad():
            emb.importance_weight.uniform_(0.5, 2.0, generator=g)
        ids = torch.cat([torch.randint(0, 5000, (60,), generator=g), torch.tensor([11, 2**33 + 5])])
        queries = torch.randn(21, 37, generator=g)
        got = kernels.bloom_scores(
            queries,
            ids,
            emb.weight.detach(),
            seed_tensor(ids.device),
            num_hash_functions=3,
            padding_idx=11,
            signed=True,
            importance=emb.importance_weight.detach(),
        )
        with torch.no_grad():
            want = queries.to(got.dtype) @ emb(ids).to(got.dtype).T
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scores_kernel_16bit_queries_and_table(dtype, query_dtype):
    # 16-bit queries over a 16-bit table take the kernel's TF32 product
    # (exact products, float32 sums): 70 queries and 150 ids leave partial
    # blocks both ways.  Small integers: every vector and score is exact, so
    # the kernel must equal the float64 product bit for bit.
    kernels = require_kernels()
    g = torch.Generator().manual_seed(1)
    emb = BloomEmbedding(
        None, 40, num_rows=31, num_hash_functions=3, padding_idx=None, signed=True, dtype=dtype, backend="torch"
    )
    with torch.no_grad():
        emb.weight.copy_(torch.randint(-3, 4, emb.weight.shape, generator=g))
    ids = torch.randint(0, 10**6, (150,), generator=g)
    queries = torch.randint(-4, 5, (70, 40), generator=g).to(query_dtype)
    got = kernels.bloom_scores(
        queries, ids, emb.weight.detach(), seed_tensor(ids.device), num_hash_functions=3, wide_ids=False, signed=True
    )
    with torch.no_grad():
        want = queries.double() @ emb(ids).double().T
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("seed", range(6))
def test_logits_and_both_gradients(seed, backend):
    rnd = random.Random(400 + seed)
    emb, g = make_embedding(rnd, backend, integer=False)
    shape = rnd.choice([(3,), (2, 4)])
    hidden = torch.randn(*shape, emb.embedding_dim, generator=g).to(DEVICE).requires_grad_(True)
    logits = emb.logits(hidden, chunk_size=rnd.choice([1, 16, None]))
    grad_out = torch.randn(logits.shape, generator=g).to(DEVICE)
    params = [hidden] + [p for p in emb.parameters()]
    got = torch.autograd.grad(logits, params, grad_out)

    hidden2 = hidden.detach().requires_grad_(True)
    materialised = hidden2 @ emb(torch.arange(emb.num_embeddings, device=DEVICE)).T
    want = torch.autograd.grad(materialised, [hidden2] + params[1:], grad_out)
    torch.testing.assert_close(logits, materialised, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_fused_cross_entropy_equals_materialised(seed, backend):
    rnd = random.Random(500 + seed)
    emb, g = make_embedding(rnd, backend, integer=False)
    batch = rnd.choice([1, 5, 12])
    hidden = torch.randn(batch, emb.embedding_dim, generator=g).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, emb.num_embeddings, (batch,), generator=g).to(DEVICE)
    if batch > 1 and rnd.random() < 0.5:  # (all ignored: a mean over nothing)
        targets[0] = -100
    reduction = rnd.choice(["mean", "sum", "none"])
    loss = bloom_cross_entropy(hidden, targets, emb, reduction=reduction, chunk_size=rnd.choice([1, 9, None]))
    params = [hidden] + list(emb.parameters())
    weight_out = torch.rand(loss.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad((loss * weight_out).sum(), params)

    hidden2 = hidden.detach().requires_grad_(True)
    logits = hidden2 @ emb(torch.arange(emb.num_embeddings, device=DEVICE)).T
    want_loss = F.cross_entropy(logits, targets, reduction=reduction)
    want = torch.autograd.grad((want_loss * weight_out).sum(), [hidden2] + params[1:])
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_sampled_softmax_equals_its_definition(backend):
    rnd = random.Random(600)
    emb, g = make_embedding(rnd, backend, integer=False)
    emb_n = emb.num_embeddings
    hidden = torch.randn(6, emb.embedding_dim, generator=g).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, emb_n, (6,), generator=g).to(DEVICE)
    loss = bloom_cross_entropy(hidden, targets, emb, num_samples=9, generator=torch.Generator().manual_seed(3))
    samples = torch.randint(0, emb_n, (9,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    vectors = emb(torch.arange(emb_n, device=DEVICE))
    logits = torch.cat([(hidden * vectors[targets]).sum(1, keepdim=True), hidden @ vectors[samples].T], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(samples[None, :] == targets[:, None], NEG_INF)
    want = F.cross_entropy(logits, torch.zeros(6, dtype=torch.int64, device=DEVICE))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert hidden.grad is not None and emb.weight.grad is not None


@pytest.mark.parametrize("seed", range(6))
def test_bloom_output_layer_decoder(seed, backend):
    rnd = random.Random(700 + seed)
    n, dim = rnd.choice([30, 200]), rnd.choice([4, 16])
    layer = BloomOutputLayer(
        dim, n, num_rows=rnd.choice([5, 40]), num_hash_functions=rnd.choice([1, 3, 4]), backend=backend, device=DEVICE
    )
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rnd.choice([1, 5]), dim, generator=g).to(DEVICE)
    exclude = random_exclude(rnd, g, hidden.shape[0], n)
    k = rnd.choice([1, 7])
    top = layer.topk(hidden, k, exclude=exclude, chunk_size=rnd.choice([4, None]))
    # The explicit sum of log-probabilities at each id's k units.
    log_probs = F.log_softmax(layer.projection(hidden), -1).double()
    rows = hash_rows(torch.arange(n, device=DEVICE), layer.num_hash_functions, layer.num_rows).long()
    scores = excluded_scores(log_probs[:, rows].sum(-1), exclude)
    values, ids = brute_topk(scores, k)
    torch.testing.assert_close(top.scores.double(), values, atol=1e-5, rtol=1e-5)
    got = scores.gather(1, top.ids.clamp(min=0))
    torch.testing.assert_close(got, top.scores.double(), atol=1e-5, rtol=1e-5)
    # The loss: cross-entropy against the target's k-hot code over k.
    targets = torch.randint(0, n, (hidden.shape[0],), generator=g).to(DEVICE)
    want = -(log_probs.gather(1, rows[targets]).mean(1)).mean()
    torch.testing.assert_close(layer.loss(hidden, targets).double(), want, atol=1e-6, rtol=1e-6)


def test_decoder_ties_by_id(backend):
    # One unit per id and two units: every id scores one of two values.
    layer = BloomOutputLayer(8, 100, num_rows=2, num_hash_functions=1, backend=backend, device=DEVICE)
    hidden = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    top = layer.topk(hidden, 12, chunk_size=7)
    rows = hash_rows(torch.arange(100, device=DEVICE), 1, 2).long()
    scores = layer(hidden).double()[:, rows].sum(-1)
    _, ids = brute_topk(scores, 12)
    assert torch.equal(top.ids, ids)


def test_bad_input_names_the_value():
    emb = BloomEmbedding(100, 8, padding_idx=None, backend="torch")
    q = torch.randn(2, 8)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        emb.topk(q, 0)
    with pytest.raises(ValueError, match=r"8 columns.*\(2, 5\)"):
        emb.topk(torch.randn(2, 5), 3)
    with pytest.raises(IndexError, match="100"):
        emb.topk(q, 3, candidates=torch.tensor([1, 100]))
    with pytest.raises(IndexError, match="-2"):
        emb.topk(q, 3, exclude=torch.tensor([[1], [-2]]))
    with pytest.raises(ValueError, match=r"exclude must be a \(num_queries=2, m\)"):
        emb.topk(q, 3, exclude=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got -3"):
        emb.topk(q, 3, chunk_size=-3)
    with pytest.raises(TypeError, match="BloomEmbedding or an embedding-like"):
        bloom_topk(q, torch.nn.Linear(8, 100), 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(num_embeddings,\) = \(100,\), got \(99,\)"):
        emb.topk(q, 3, bias=torch.zeros(99))
    with pytest.raises(TypeError, match="bias must be a floating point Tensor, got torch.int64"):
        bloom_cross_entropy(q, torch.tensor([1, 5]), emb, bias=torch.zeros(100, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"targets must be a \(2,\) Tensor, one id per query, got torch.Size\(\[3\]\)"):
        bloom_rank(q, torch.tensor([1, 2, 3]), emb)
    with pytest.raises(IndexError, match="100"):
        emb.rank(q, torch.tensor([1, 100]))
    with pytest.raises(ValueError, match="padding id 0"):
        BloomEmbedding(100, 8, padding_idx=0, backend="torch").rank(q, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="num_embeddings=None"):
        BloomEmbedding(None, 8, num_rows=10).topk(q, 3)
    with pytest.raises(IndexError, match="500"):
        bloom_cross_entropy(q, torch.tensor([1, 500]), emb)
    with pytest.raises(ValueError, match="reduction must be"):
        bloom_cross_entropy(q, torch.tensor([1, 5]), emb, reduction="avg")
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        bloom_cross_entropy(q, torch.tensor([1, 5]), emb, num_samples=0)
    from triton_bloom import FusedSGD

    fused = BloomEmbedding(100, 8, padding_idx=None, fused_optimizer=FusedSGD(lr=0.1))
    with pytest.raises(ValueError, match="fused_optimizer"):
        fused.logits(q)


def test_fewer_ids_than_k_pad_with_minus_one(backend):
    emb = BloomEmbedding(5, 4, num_rows=3, padding_idx=0, backend=backend, device=DEVICE)
    top = emb.topk(torch.randn(2, 4).to(DEVICE), 7, exclude=torch.tensor([[1, -1], [2, 3]], device=DEVICE))
    assert top.ids.shape == (2, 7)
    assert (top.ids[0] >= 0).sum() == 3 and (top.ids[1] >= 0).sum() == 2  # padding 0 is never an item
    assert bool((top.scores[top.ids < 0] == NEG_INF).all())


# Bias, rank, plain tables. ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_topk_with_bias_equals_brute_force(seed, backend):
    rnd = random.Random(800 + seed)
    emb, g = make_embedding(rnd, backend, integer=True)
    queries = torch.randint(-3, 4, (rnd.choice([1, 6]), emb.embedding_dim), generator=g).float().to(DEVICE)
    bias = torch.randint(-4, 5, (emb.num_embeddings,), generator=g).float().to(DEVICE)
    exclude = random_exclude(rnd, g, queries.shape[0], emb.num_embeddings)
    k = rnd.choice([1, 5, 50])
    top = emb.topk(queries, k, exclude=exclude, bias=bias, chunk_size=rnd.choice([1, 8, None]))
    scores = excluded_scores(
        queries.double() @ all_vectors(emb).T + bias.double(), exclude, padding_idx=emb.padding_idx
    )
    values, ids = brute_topk(scores, k)
    assert torch.equal(top.ids.cpu(), ids.cpu())
    assert torch.equal(top.scores.double().cpu(), values.cpu())


@pytest.mark.parametrize("seed", range(10))
def test_rank_equals_items_above_on_materialised_scores(seed, backend):
    rnd = random.Random(900 + seed)
    integer = seed % 2 == 0  # integers: many exact ties; floats: ties from collisions only
    emb, g = make_embedding(rnd, backend, integer=integer)
    while emb.num_embeddings < 2:  # a catalogue of the padding id alone has no target
        emb, g = make_embedding(rnd, backend, integer=integer)
    num_queries = rnd.choice([1, 4, 13])
    draw = torch.randint if integer else (lambda lo, hi, shape, generator: torch.randn(shape, generator=generator))
    queries = draw(-3, 4, (num_queries, emb.embedding_dim), generator=g).float().to(DEVICE)
    bias = draw(-2, 3, (emb.num_embeddings,), generator=g).float().to(DEVICE) if rnd.random() < 0.6 else None
    items = [i for i in range(emb.num_embeddings) if i != emb.padding_idx]
    targets = torch.tensor([rnd.choice(items) for _ in range(num_queries)], device=DEVICE)
    exclude = random_exclude(rnd, g, num_queries, emb.num_embeddings) if rnd.random() < 0.7 else None
    if exclude is not None and exclude.shape[1]:
        exclude[0, 0] = targets[0]  # a listed target still competes
    ranks = emb.rank(queries, targets, exclude, bias=bias, chunk_size=rnd.choice([1, 5, 64, None]))

    with torch.no_grad():  # the materialised scores, each the float64 dot product rounded once
        scores = exact_scores(queries, emb(torch.arange(emb.num_embeddings, device=DEVICE)))
        if bias is not None:
            scores = scores + bias
    scores = excluded_scores(scores, exclude, targets, emb.padding_idx)
    assert torch.equal(ranks.above.cpu(), items_above(scores, targets).cpu())
    assert torch.equal(ranks.others.cpu(), (torch.isfinite(scores).sum(1) - 1).cpu())


@pytest.mark.parametrize("seed", range(4))
def test_rank_counts_collisions_half_with_float_data(seed, backend):
    # k = 1 into 3 rows, float data: every id's vector is one of three, so the
    # target ties with about a third of the catalogue, and only a target score
    # computed exactly as the chunks' scores counts them half.
    emb = BloomEmbedding(120, 16, num_rows=3, num_hash_functions=1, padding_idx=None, backend=backend, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(9, 16, generator=g).to(DEVICE)
    targets = torch.randint(0, 120, (9,), generator=g).to(DEVICE)
    ranks = emb.rank(queries, targets, chunk_size=[7, 50, 1000, None][seed])
    with torch.no_grad():
        scores = exact_scores(queries, emb(torch.arange(120, device=DEVICE)))
    assert torch.equal(ranks.above.cpu(), items_above(scores, targets).cpu())
    assert bool((ranks.above.frac() == 0.5).any())  # ties were met


@pytest.mark.parametrize("seed", range(4))
def test_bloom_output_layer_rank(seed, backend):
    rnd = random.Random(1000 + seed)
    n = rnd.choice([30, 200])
    layer = BloomOutputLayer(
        8, n, num_rows=rnd.choice([2, 5, 40]), num_hash_functions=rnd.choice([1, 3]), backend=backend, device=DEVICE
    )
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rnd.choice([1, 6]), 8, generator=g).to(DEVICE)
    targets = torch.randint(0, n, (hidden.shape[0],), generator=g).to(DEVICE)
    exclude = random_exclude(rnd, g, hidden.shape[0], n)
    ranks = layer.rank(hidden, targets, exclude=exclude, chunk_size=rnd.choice([3, None]))
    rows = hash_rows(torch.arange(n, device=DEVICE), layer.num_hash_functions, layer.num_rows).long()
    with torch.no_grad():
        scores = excluded_scores(layer(hidden)[:, rows].sum(-1), exclude, targets)
    assert torch.equal(ranks.above.cpu(), items_above(scores, targets).cpu())
    assert torch.equal(ranks.others.cpu(), (torch.isfinite(scores).sum(1) - 1).cpu())


@pytest.mark.parametrize("seed", range(6))
def test_fused_cross_entropy_with_bias(seed, backend):
    rnd = random.Random(1100 + seed)
    emb, g = make_embedding(rnd, backend, integer=False)
    batch = rnd.choice([1, 7])
    hidden = torch.randn(batch, emb.embedding_dim, generator=g).to(DEVICE).requires_grad_(True)
    bias = torch.randn(emb.num_embeddings, generator=g).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, emb.num_embeddings, (batch,), generator=g).to(DEVICE)
    samples = rnd.choice([None, 5])
    loss = bloom_cross_entropy(
        hidden,
        targets,
        emb,
        bias=bias,
        num_samples=samples,
        chunk_size=rnd.choice([3, None]),
        generator=torch.Generator().manual_seed(seed),
    )
    params = [hidden, bias] + list(emb.parameters())
    got = torch.autograd.grad(loss, params)

    vectors = emb(torch.arange(emb.num_embeddings, device=DEVICE))
    if samples is None:
        want_loss = F.cross_entropy(hidden @ vectors.T + bias, targets)
    else:
        drawn = torch.randint(0, emb.num_embeddings, (samples,), generator=torch.Generator().manual_seed(seed))
        drawn = drawn.to(DEVICE)
        logits = torch.cat(
            [
                (hidden * vectors[targets]).sum(1, keepdim=True) + bias[targets, None],
                hidden @ vectors[drawn].T + bias[drawn],
            ],
            1,
        )
        logits[:, 1:] = logits[:, 1:].masked_fill(drawn[None, :] == targets[:, None], NEG_INF)
        want_loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.int64, device=DEVICE))
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_tied_linear_loss_and_topk_use_its_bias(backend):
    emb, g = make_embedding(random.Random(1200), backend, integer=True)
    head = TiedBloomLinear(emb, bias=torch.randint(-3, 4, (emb.num_embeddings,), generator=g).float().to(DEVICE))
    hidden = torch.randint(-3, 4, (5, emb.embedding_dim), generator=g).float().to(DEVICE)
    targets = torch.randint(0, emb.num_embeddings, (5,), generator=g).to(DEVICE)
    torch.testing.assert_close(head.loss(hidden, targets), F.cross_entropy(head(hidden), targets))
    top = head.topk(hidden, 3)
    with torch.no_grad():
        values, ids = brute_topk(excluded_scores(head(hidden).double(), None, padding_idx=emb.padding_idx), 3)
    assert torch.equal(top.ids, ids)


@pytest.mark.parametrize("seed", range(3))
def test_plain_embedding_is_scored_through_its_forward(seed):
    # One evaluation for a Bloom model and its full-table baseline.
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.Embedding(90, 6, padding_idx=[None, 4, 89][seed]).to(DEVICE)
    with torch.no_grad():
        table.weight.copy_(torch.randint(-3, 4, table.weight.shape, generator=g))
    queries = torch.randint(-3, 4, (4, 6), generator=g).float().to(DEVICE)
    exclude = random_exclude(random.Random(seed), g, 4, 90)
    scores = excluded_scores(
        queries.double() @ table.weight.detach().double().T, exclude, padding_idx=table.padding_idx
    )
    top = bloom_topk(queries, table, 6, exclude=exclude, chunk_size=13)
    values, ids = brute_topk(scores, 6)
    assert torch.equal(top.ids, ids) and torch.equal(top.scores.double(), values)
    targets = torch.tensor([0, 10, 50, 88], device=DEVICE)
    ranks = bloom_rank(queries, targets, table, exclude=exclude, chunk_size=13)
    scores = excluded_scores(queries.double() @ table.weight.detach().double().T, exclude, targets, table.padding_idx)
    assert torch.equal(ranks.above, items_above(scores, targets))
