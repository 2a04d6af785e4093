"""The fused quantized scores kernel (``kernels/scores.py``,
``quantized_scores``): top-k and ranks of a ``QuantizedBloomEmbedding`` on
the Triton path against a float64 oracle, the table dequantised
(``dequantized_weight()``, in float64), every id's vector summed from its
rows by ``test_quantized``'s oracle (scikit-learn's murmurhash3, no code of
the package) and dotted with the queries in float64.

Fresh random tables and queries for int8 and int4, odd widths and widths
past one block of bytes, ``k`` 1 and 4, padding, hot rows, signs,
importance weights, bias, exclusions, shared and wide candidates, several
chunks; scores agree to float32 rounding (bounded by the magnitudes of the
terms), ids and ranks exactly but for pairs the oracle itself puts within
that rounding, and ids with one vector tie exactly."""

import numpy as np
import pytest
import torch
from support import DEVICE, require_kernels
from test_quantized import oracle_vectors, trained_like
from triton_bloom.kernels import launch as launch_module

from triton_bloom import BloomEmbedding, quantize

NUM_IDS = 300
# Relative rounding of a float32 score against the sum of its terms'
# magnitudes: a few float32 roundings of the k-row sum and of the product.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def kernels():
    return require_kernels()


def build(bits, *, seed, dim, k=4, num_rows=61, hot=False, signed=False, importance=False, padding_idx=0, wide=False):
    """A trained-like float table of fresh random values, quantized, on the
    Triton path; ``(quantized module, generator)``."""
    generator = torch.Generator().manual_seed(seed)
    hot_ids = None
    if hot:
        hot_ids = torch.randperm(NUM_IDS, generator=generator)[:5]
        hot_ids = hot_ids[hot_ids != padding_idx] if padding_idx is not None else hot_ids
    module = BloomEmbedding(
        None if wide else NUM_IDS,
        dim,
        num_rows=num_rows,
        num_hash_functions=k,
        padding_idx=padding_idx,
        signed=signed,
        importance=importance,
        importance_rows=17 if importance else None,
        hot_ids=hot_ids,
        backend="triton",
    )
    trained_like(module, generator)
    if importance:
        with torch.no_grad():
            module.importance_weight.uniform_(-2, 2, generator=generator)
    return quantize(module.to(DEVICE), bits=bits), generator


def oracle(quantized, ids, queries, bias=None):
    """``(scores, tolerance)``: the float64 ``(Q, n)`` scores of ``ids`` by the
    dequantised table, and each one's float32 rounding bound."""
    importance = quantized.importance_weight
    importance = None if importance is None else importance.cpu().double().numpy()
    hot = None if quantized.hot_ids is None else quantized.hot_ids.cpu()
    table = quantized.dequantized_weight().cpu().double().numpy()
    options = dict(k=quantized.num_hash_functions, num_rows=quantized.num_rows, padding_idx=quantized.padding_idx)
    vectors = oracle_vectors(ids, table, hot=hot, signed=quantized.signed, importance=importance, **options)
    # Every term's magnitude: the rows' and the weights' absolute values.
    magnitude = oracle_vectors(
        ids,
        np.abs(table) + np.abs(quantized.column_offset.cpu().double().numpy()),
        hot=hot,
        importance=None if importance is None else np.abs(importance),
        **options,
    )
    q = queries.cpu().double().numpy()
    scores = q @ vectors.T
    tolerance = RTOL * (np.abs(q) @ magnitude.T) + 1e-30
    if bias is not None:
        b = bias.cpu().double().numpy()[np.asarray(ids)]
        scores += b
        tolerance += RTOL * np.abs(b)
    return scores, tolerance


def launched(fn):
    """``fn()``'s result and the names of the kernels it launched."""
    with launch_module.recording_launches() as launches:
        result = fn()
    return result, {entry["kernel"].__name__ for entry in launches}


def check_topk(top, scores, tolerance, k):
    """``top`` holds, per query, the ``k`` best oracle scores (``-inf`` for
    ids never returned) to rounding, and ids that score them."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    got = top.scores.cpu().double().numpy()
    live = np.isfinite(best)
    assert (np.isfinite(got) == live).all()
    ids = top.ids.cpu().numpy()
    assert ((ids >= 0) == live).all()
    slack = np.take_along_axis(tolerance, order, axis=1)
    assert (np.abs(np.where(live, got - best, 0.0)) <= slack).all()
    # An id the oracle ranks differently is only ever one within rounding.
    chosen = np.take_along_axis(scores, np.where(live, ids, 0), axis=1)
    assert (np.abs(np.where(live, chosen - best, 0.0)) <= 2 * slack).all()
    # The returned score is the returned id's own score.
    own = np.take_along_axis(tolerance, np.where(live, ids, 0), axis=1)
    assert (np.abs(np.where(live, got - chosen, 0.0)) <= own).all()


TOPK_CASES = [
    # bits, dim, k, build options, query dtype
    (8, 33, 4, dict(hot=True, signed=True), torch.float32),
    (4, 33, 1, dict(hot=True), torch.float32),
    (4, 64, 4, dict(hot=True, signed=True, importance=True), torch.float32),
    (8, 64, 1, dict(importance=True, padding_idx=None), torch.float32),
    (8, 5, 4, {}, torch.float32),
    (4, 7, 4, dict(signed=True), torch.float32),
    (4, 150, 4, dict(hot=True), torch.float32),  # 75 bytes: two steps of 64
    (8, 150, 1, dict(signed=True), torch.float32),  # 150 bytes: three steps
    (4, 33, 4, dict(hot=True, signed=True), torch.float64),
    (8, 24, 4, dict(importance=True), torch.bfloat16),
]


@pytest.mark.parametrize("bits,dim,k,options,dtype", TOPK_CASES)
@pytest.mark.parametrize("extras", ["plain", "bias_exclude"])
def test_topk_matches_the_dequantised_oracle(bits, dim, k, options, dtype, extras):
    seed = bits * 1000 + dim * 10 + k + (extras == "plain")
    quantized, generator = build(bits, seed=seed, dim=dim, k=k, **options)
    num_queries = int(torch.randint(1, 20, (1,), generator=generator))
    queries = torch.randn(num_queries, dim, generator=generator).to(dtype)
    bias = exclude = None
    if extras == "bias_exclude":
        bias = torch.randn(NUM_IDS, generator=generator).to(DEVICE)
        exclude = torch.randint(-1, NUM_IDS, (num_queries, 6), generator=generator)
    ids = np.arange(NUM_IDS)
    scores, tolerance = oracle(quantized, ids, queries, bias)
    if quantized.padding_idx is not None:
        scores[:, quantized.padding_idx] = -np.inf  # no item
    if exclude is not None:
        for q, row in enumerate(exclude.tolist()):
            scores[q, [i for i in row if i >= 0]] = -np.inf
        exclude = exclude.to(DEVICE)
    top_k = 10 if k > 1 else 4
    top, kernels = launched(
        lambda: quantized.topk(queries.to(DEVICE), top_k, exclude=exclude, bias=bias, chunk_size=128)
    )
    # The fused kernel scored every chunk; no id's vector was written.
    assert kernels == {"_quantized_scores_kernel"}
    assert top.scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_topk(top, scores, tolerance, top_k)


@pytest.mark.parametrize("bits", [8, 4])
def test_shared_candidates_and_wide_ids(bits):
    """Candidates with repeats (each counted once), queries whose rows are
    not ``dim`` apart, and ids past 2**31 (an unbounded catalogue: 8-byte
    hashing)."""
    quantized, generator = build(bits, seed=40 + bits, dim=33, hot=True, signed=True)
    queries = torch.randn(3, 40, generator=generator)[:, :33]  # rows 40 apart
    candidates = torch.randint(0, NUM_IDS, (90,), generator=generator)
    candidates = torch.cat([candidates, candidates[:10]])
    distinct = np.unique(candidates.numpy())
    scores, tolerance = oracle(quantized, distinct, queries)
    scores[:, distinct == 0] = -np.inf
    top, kernels = launched(lambda: quantized.topk(queries.to(DEVICE), 5, candidates=candidates.to(DEVICE)))
    assert kernels == {"_quantized_scores_kernel"}
    columns = np.searchsorted(distinct, top.ids.cpu().numpy())
    check_topk(top._replace(ids=torch.from_numpy(columns)), scores, tolerance, 5)

    wide, generator = build(bits, seed=50 + bits, dim=20, wide=True, padding_idx=None)
    queries = torch.randn(2, 20, generator=generator)
    candidates = torch.randint(2**31, 2**40, (70,), generator=generator)
    distinct = np.unique(candidates.numpy())
    scores, tolerance = oracle(wide, distinct, queries)
    top, kernels = launched(lambda: wide.topk(queries.to(DEVICE), 6, candidates=candidates.to(DEVICE)))
    assert kernels == {"_quantized_scores_kernel"}
    columns = np.searchsorted(distinct, top.ids.cpu().numpy())
    assert (distinct[columns] == top.ids.cpu().numpy()).all()
    check_topk(top._replace(ids=torch.from_numpy(columns)), scores, tolerance, 6)


RANK_CASES = [
    # bits, dim, k, num_rows, build options
    (8, 33, 4, 61, dict(hot=True, signed=True)),
    (4, 33, 4, 61, dict(hot=True, importance=True)),
    (4, 64, 1, 61, {}),
    (8, 40, 4, 61, dict(signed=True)),  # three steps of 16 columns (exact scores' tile)
    # k = 1 over 13 rows: most ids share their one row, so ranks meet exact ties.
    (4, 9, 1, 13, dict(hot=True)),
    (8, 17, 1, 13, {}),
]


@pytest.mark.parametrize("bits,dim,k,num_rows,options", RANK_CASES)
def test_ranks_match_the_dequantised_oracle(bits, dim, k, num_rows, options):
    quantized, generator = build(bits, seed=bits * 100 + dim + num_rows, dim=dim, k=k, num_rows=num_rows, **options)
    num_queries = 6
    queries = torch.randn(num_queries, dim, generator=generator)
    targets = torch.randint(1, NUM_IDS, (num_queries,), generator=generator)
    exclude = torch.randint(-1, NUM_IDS, (num_queries, 5), generator=generator)
    exclude[0, 0] = targets[0]  # a target in its own exclusions still competes
    bias = torch.randn(NUM_IDS, generator=generator) if k > 1 else None
    ranks, kernels = launched(
        lambda: quantized.rank(
            queries.to(DEVICE),
            targets.to(DEVICE),
            exclude=exclude.to(DEVICE),
            bias=None if bias is None else bias.to(DEVICE),
            chunk_size=100,
        )
    )
    assert kernels == {"_quantized_scores_kernel"}
    scores, tolerance = oracle(quantized, np.arange(NUM_IDS), queries, bias)
    above, near, others = [], [], []
    for q in range(num_queries):
        t = int(targets[q])
        keep = np.ones(NUM_IDS, dtype=bool)
        keep[[i for i in exclude[q].tolist() if i >= 0 and i != t]] = False
        keep[t] = False
        keep[0] = False  # the padding id
        gap = scores[q, keep] - scores[q, t]
        above.append((gap > 0).sum() + (gap == 0).sum() / 2)
        # Pairs the oracle puts apart by less than rounding may go either way
        # (each counts at most 1); exact ties (one vector) may not.
        near.append(((gap != 0) & (np.abs(gap) <= tolerance[q, keep] + tolerance[q, t])).sum())
        others.append(keep.sum())
    assert (ranks.others.cpu().numpy() == np.array(others)).all()
    assert (np.abs(ranks.above.cpu().numpy() - np.array(above)) <= np.array(near)).all()
    if num_rows == 13:
        # The case is there for its ties: make sure it has them.
        assert sum(a % 1 for a in above) > 0 or max(near) == 0


def test_both_backends_rank_alike_and_the_torch_path_stays_the_reference():
    """The PyTorch backend (the lookup, then a product) and the fused kernel
    give the same top-k ids and ranks on the same table."""
    quantized, generator = build(4, seed=7, dim=33, hot=True, signed=True)
    reference = quantize(quantized.dequantize(), bits=4)  # the same codes, on PyTorch
    reference.load_state_dict(quantized.state_dict())
    reference.backend = "torch"
    queries = torch.randn(4, 33, generator=generator)
    targets = torch.randint(1, NUM_IDS, (4,), generator=generator)
    top, kernels = launched(lambda: reference.topk(queries, 7, chunk_size=128))
    assert kernels == set()
    fused = quantized.topk(queries.to(DEVICE), 7, chunk_size=128)
    scores, tolerance = oracle(quantized, np.arange(NUM_IDS), queries)
    scores[:, 0] = -np.inf
    check_topk(fused, scores, tolerance, 7)
    check_topk(top, scores, tolerance, 7)
    torch.testing.assert_close(fused.scores.cpu(), top.scores, rtol=RTOL, atol=RTOL)
    mine = quantized.rank(queries.to(DEVICE), targets.to(DEVICE), chunk_size=128)
    theirs = reference.rank(queries, targets, chunk_size=128)
    assert torch.equal(mine.others.cpu(), theirs.others)
    assert (mine.above.cpu() - theirs.above).abs().max() <= 1


def test_empty_chunks_and_no_queries():
    quantized, _ = build(8, seed=3, dim=16)
    kernels = require_kernels()
    from triton_bloom.hashing import seed_tensor

    scores_module = __import__(kernels.__name__ + ".scores", fromlist=["quantized_scores"])
    options = dict(bits=8, dim=16, num_hash_functions=4)
    table = (quantized.codes, quantized.scale_codes, quantized.scale_grid, quantized.column_offset)
    seeds = seed_tensor(quantized.codes.device)
    out = scores_module.quantized_scores(
        torch.randn(3, 16, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE), *table, seeds, **options
    )
    assert out.shape == (3, 0)
    out = scores_module.quantized_scores(
        torch.randn(0, 16, device=DEVICE), torch.arange(5, device=DEVICE), *table, seeds, **options
    )
    assert out.shape == (0, 5)
