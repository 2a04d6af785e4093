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


def test_from_counts_builds_and_reports(capsys):
    counts = zipf_counts(2000, 1.2, 3)
    emb = BloomEmbedding.from_counts(counts, 24, max_bytes=2000 * 24 * 4 // 5, padding_idx=None)
    assert embedding_bytes(emb) <= 2000 * 24 * 4 // 5
    assert emb.plan.kind == "bloom"
    assert "most frequent ids" in capsys.readouterr().out


def test_planner_argument_errors():
    with pytest.raises(ValueError, match="1-D tensor"):
        plan_embedding(torch.ones(3, 3), 8, 1000)
    with pytest.raises(ValueError, match="non-negative"):
        plan_embedding(torch.tensor([1, -2, 3]), 8, 1000)
    with pytest.raises(ValueError, match="width"):
        plan_embedding(torch.ones(10), 8, 100, width="wide")
    with pytest.raises(ValueError, match="max_bytes=10"):
        plan_embedding(torch.ones(10), 8, 10)
