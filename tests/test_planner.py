"""The budget planner: the module it builds keeps to the budget, measured on
the module itself, and its choices follow the id frequencies."""

import pytest
import torch

from triton_bloom import BloomEmbedding, ScaledEmbedding, embedding_bytes, plan_embedding


def zipf_counts(n, exponent, seed):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(n, generator=g).double() + 1
    return (1e6 / ranks**exponent).long()


@pytest.mark.parametrize("seed", range(6))
def test_the_built_module_keeps_to_the_budget(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(50, 5000, (1,), generator=g))
    dim = int(torch.randint(1, 65, (1,), generator=g))
    dtype = [torch.float32, torch.float16, torch.float64][seed % 3]
    full = n * dim * torch.empty((), dtype=dtype).element_size()
    fraction = float(torch.empty(1).uniform_(0.02, 0.9, generator=g))
    budget = int(fraction * full)
    counts = zipf_counts(n, float(torch.empty(1).uniform_(0.5, 1.5, generator=g)), seed)
    try:
        plan = plan_embedding(counts, dim, budget, width="fixed", dtype=dtype)
    except ValueError as error:
        # Only a budget below one shared row may be refused.
        assert budget < dim * torch.empty((), dtype=dtype).element_size(), error
        return
    module = plan.build()
    assert embedding_bytes(module) == plan.bytes <= budget
    assert isinstance(module, BloomEmbedding)
    assert module(torch.randint(0, n, (7,))).shape == (7, dim)
    if plan.hot_ids is not None:
        # The hot ids are the most frequent ones.
        coldest_hot = counts[plan.hot_ids].min()
        others = torch.ones(n, dtype=torch.bool)
        others[plan.hot_ids] = False
        assert coldest_hot >= counts[others].max()
    assert str(plan).startswith("Plan for") and "use " in str(plan)


def test_full_table_when_it_fits_and_reduced_dimension_when_free():
    counts = zipf_counts(300, 1.0, 0)
    plan = plan_embedding(counts, 16, 300 * 16 * 4)
    assert plan.kind == "full" and isinstance(plan.build(), ScaledEmbedding)
    assert "full table fits" in str(plan) and "use nn.Embedding(300, 16)" in str(plan)
    # With uniform counts, hot rows buy nothing: when the width is free, a
    # plain table of half the dimension is the plan.
    flat = torch.ones(300, dtype=torch.long)
    plan = plan_embedding(flat, 16, 300 * 8 * 4, width="free")
    assert plan.kind == "reduced" and plan.build().embedding_dim == 8
    assert "use nn.Embedding(300, 8)" in str(plan)
    assert plan_embedding(flat, 16, 300 * 8 * 4, width="fixed").kind == "bloom"


def test_plan_builds_and_reports():
    counts = zipf_counts(2000, 1.2, 3)
    plan = plan_embedding(counts, 24, 2000 * 24 * 4 // 5)
    emb = plan.build(padding_idx=None)
    assert isinstance(emb, BloomEmbedding) and emb.plan is plan
    assert embedding_bytes(emb) <= 2000 * 24 * 4 // 5
    assert plan.kind == "bloom"
    assert "most frequent ids" in str(plan)


def test_planner_argument_errors():
    with pytest.raises(ValueError, match="1-D tensor"):
        plan_embedding(torch.ones(3, 3), 8, 1000)
    with pytest.raises(ValueError, match="non-negative"):
        plan_embedding(torch.tensor([1, -2, 3]), 8, 1000)
    with pytest.raises(ValueError, match="width"):
        plan_embedding(torch.ones(10), 8, 100, width="wide")
    with pytest.raises(ValueError, match="max_bytes=10"):
        plan_embedding(torch.ones(10), 8, 10)


def raw_zipf(n, exponent, seed):
    """Distinct raw int64 ids and Zipf counts in random order, with a tail of ids counted once."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.unique(torch.randint(0, 2**63 - 1, (n,), generator=g))
    ranks = torch.randperm(ids.numel(), generator=g).double() + 1
    counts = (5000 / ranks**exponent).long().clamp(min=1)
    return ids[torch.randperm(ids.numel(), generator=g)], counts


@pytest.mark.parametrize("seed", range(3))
def test_open_ids_plan_hot_rows_for_the_zipf_head_and_bloom_for_the_rest(seed):
    ids, counts = raw_zipf(20_000, 1.05, seed)
    dim, budget = 16, 2 * ids.numel()  # half a float per counted id
    plan = plan_embedding(counts, dim, budget, ids=ids)
    assert plan.num_embeddings is None and plan.kind == "bloom" and not plan.pure_hot
    module = plan.build()
    assert embedding_bytes(module) == plan.bytes <= budget
    # Half the budget in hot rows (64 B a row + 8 B a raw id), the rest in shared rows.
    row = dim * 4
    assert plan.num_hot == int(0.5 * budget) // (row + 8)
    assert plan.num_rows == (budget - plan.num_hot * (row + 8)) // row
    assert plan.num_hash_functions == 2 and plan.private_dim == 0
    # The hot ids are the most frequent raw ids (independent count: a dict).
    frequency = dict(zip(ids.tolist(), counts.tolist()))
    hot = set(plan.hot_ids.tolist())
    assert min(frequency[i] for i in hot) >= max(c for i, c in frequency.items() if i not in hot)
    # Any raw id below 2**63 looks up, counted or not; a hot id reads its own row.
    unseen = torch.randint(0, 2**63 - 1, (5,))
    assert module(torch.cat([ids[:5], unseen])).shape == (10, dim)
    text = str(plan)
    assert "use BloomEmbedding(None, 16" in text and "most frequent ids" in text and "new ones included" in text


def test_open_ids_never_give_a_private_row_to_an_id_counted_once():
    ids, counts = raw_zipf(3_000, 1.05, 7)
    repeated = int((counts >= 2).sum())
    plan = plan_embedding(counts, 8, 10**7, ids=ids)  # room for every id
    assert plan.num_hot == repeated and plan.num_rows > 2


def test_open_ids_with_a_tiny_budget_drop_the_shared_part():
    ids, counts = raw_zipf(3_000, 1.05, 8)
    plan = plan_embedding(counts, 8, 6 * 32 + 8)  # closed ids: fine
    assert plan.bytes <= 6 * 32 + 8
    # 3 shared rows: 3 pairs for thousands of ids tell none apart.
    plan = plan_embedding(counts, 8, 3 * 32 + 40, ids=ids)
    assert plan.pure_hot and plan.num_rows == 1 and plan.num_hash_functions == 1
    assert plan.num_hot == (3 * 32 + 40 - 32) // 40 and "buy nothing" in str(plan)
    assert embedding_bytes(plan.build()) <= plan.max_bytes


def test_closed_fixed_width_plan_leaves_out_a_shared_part_that_buys_nothing():
    counts = zipf_counts(3000, 1.0, 1)
    budget = 3000 * 32 * 4 // 5
    plan = plan_embedding(counts, 32, budget)
    from triton_bloom.planner import HOT_SHARES, SIMPLER_WITHIN

    assert 1.0 in HOT_SHARES
    # Whatever it picks scores within SIMPLER_WITHIN of every alternative it lists, and a
    # Bloom part with fewer rows than k is never kept.
    for _, _, score in plan.alternatives:
        assert plan.score >= score * (1 - SIMPLER_WITHIN) or plan.reads() < 3
    assert plan.pure_hot or plan.num_rows > plan.num_hash_functions
    assert embedding_bytes(plan.build()) == plan.bytes <= budget


def test_open_ids_argument_errors():
    ids, counts = raw_zipf(100, 1.0, 0)
    with pytest.raises(ValueError, match="one raw id per count"):
        plan_embedding(counts, 8, 1000, ids=ids[:-1])
    with pytest.raises(ValueError, match="distinct"):
        plan_embedding(counts[:2], 8, 1000, ids=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="non-negative"):
        plan_embedding(counts[:2], 8, 1000, ids=torch.tensor([5, -1]))
    with pytest.raises(TypeError, match="integer"):
        plan_embedding(counts[:2], 8, 1000, ids=torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_plan_is_served_within_the_budget_with_more_rows(seed, bits):
    """With ``bits``, the budget holds the quantized module (measured on
    ``quantize(plan.build())``), and it buys more rows than the float plan."""
    from triton_bloom import quantize

    g = torch.Generator().manual_seed(300 + seed)
    open_ids = seed % 2 == 0
    dim = int(torch.randint(3, 70, (1,), generator=g))
    if open_ids:
        ids, counts = raw_zipf(4000, 1.05, seed)
        kwargs = dict(ids=ids)
    else:
        counts, kwargs = zipf_counts(4000, 1.0, seed), {}
    budget = int(counts.numel() * dim * 4 * float(torch.empty(1).uniform_(0.02, 0.3, generator=g)))
    plan = plan_embedding(counts, dim, budget, bits=bits, **kwargs)
    trained = plan.build()
    assert isinstance(trained, BloomEmbedding) and plan.bits == bits
    served = quantize(trained, bits=bits)
    assert embedding_bytes(served) == plan.bytes <= budget
    floats = plan_embedding(counts, dim, budget, **kwargs)
    assert plan.num_rows + plan.num_hot > floats.num_rows + floats.num_hot
    assert served(torch.arange(1, 9)).shape == (8, dim)
    text = str(plan)
    assert "quantize(BloomEmbedding(" in text and f"bits={bits})" in text and f"int{bits}" in plan.label()


def test_quantized_plan_errors():
    counts = zipf_counts(100, 1.0, 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        plan_embedding(counts, 8, 1000, bits=3)
    with pytest.raises(ValueError, match="width='fixed', got width='free'"):
        plan_embedding(counts, 8, 1000, bits=4, width="free")
    # A table's scale grid and column offsets (8 + 4 * 64 B) are counted: 200 B hold no int4 row of 64.
    with pytest.raises(ValueError, match="max_bytes=200 cannot hold even one shared row of 64 dims"):
        plan_embedding(counts, 64, 200, bits=4)
