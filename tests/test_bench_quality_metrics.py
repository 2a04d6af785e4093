"""The quality benchmark's ranking metrics, tables and training loop, on
tiny inputs (the benchmark's numbers are only as good as these)."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.studies import data as D
from bench.studies import quality as Q
from triton_bloom.ranking import items_above, ranking_metrics


def interactions(users, items, num_users, num_items):
    n = len(users)
    return D.Interactions(
        user=np.array(users, dtype=np.int64),
        item=np.array(items, dtype=np.int64),
        rating=np.ones(n, dtype=np.float32),
        timestamp=np.zeros(n, dtype=np.int64),
        num_users=num_users,
        num_items=num_items,
    )


class FixedScores:
    """Scores ``scores[u][i]``: one-hot users against an item table whose
    column ``u`` holds user ``u``'s scores (``rank_metrics`` asks a model for
    its ``ranker``)."""

    def __init__(self, scores):
        self.items = torch.nn.Embedding.from_pretrained(torch.tensor(scores, dtype=torch.float32).T)

    def ranker(self, users):
        return torch.eye(self.items.embedding_dim)[users], self.items, None


def test_rank_metrics_mask_seen_items_and_split_ties():
    model = FixedScores([[0.5, 9.0, 0.7, 0.1, 0.7], [0.0, 1.0, 2.0, 3.0, 4.0]])
    seen = interactions([0], [1], 2, 5)  # user 0 saw item 1: out of the ranking
    targets = interactions([0, 1], [2, 0], 2, 5)
    got = Q.rank_metrics(model, targets, [seen])
    # user 0: candidates 0, 2, 3, 4; item 4 ties the target -> rank 1.5, AUC 2.5 / 3
    # user 1: the target scores lowest of 5 -> rank 5, AUC 0
    assert got["mrr"] == pytest.approx((1 / 1.5 + 1 / 5) / 2)
    assert got["auc"] == pytest.approx((2.5 / 3 + 0.0) / 2)
    assert got["hr@10"] == pytest.approx(1.0)


def test_rank_metrics_match_the_demo_on_ties():
    """The benchmark and ``triton-bloom demo`` rank with one function."""
    from triton_bloom import demo

    scores = [[0.5, 9.0, 0.7, 0.1, 0.7], [0.0, 1.0, 2.0, 3.0, 4.0]]
    got = Q.rank_metrics(FixedScores(scores), interactions([0, 1], [2, 0], 2, 5), [interactions([0], [1], 2, 5)])
    data = demo.Dataset(
        2,
        5,
        train_users=torch.tensor([0]),
        train_items=torch.tensor([1]),
        test_items=torch.tensor([2, 0]),
        train_counts=torch.tensor([1, 0]),
    )
    # users x items scores as a product: one-hot users, items holding their scores per user
    ranks = demo.item_ranks(torch.eye(2), torch.nn.Embedding.from_pretrained(torch.tensor(scores).T), data)
    assert ranks.tolist() == [0.5, 4.0]
    assert demo.metrics(ranks, data) == pytest.approx((got["auc"], got["hr@10"]))


def test_rank_metrics_keep_a_repeated_target_in_the_ranking():
    model = FixedScores([[3.0, 2.0, 1.0]])
    seen = interactions([0, 0], [0, 2], 1, 3)  # item 0 is both seen and the target
    got = Q.rank_metrics(model, interactions([0], [0], 1, 3), [seen])
    assert got["mrr"] == pytest.approx(1.0) and got["auc"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "spec",
    [Q.TableSpec("none"), Q.TableSpec("full"), Q.TableSpec("bloom", 0.3, 2), Q.TableSpec("hash", 0.1, 1, budget=0.1)],
    ids=lambda s: s.kind,
)
def test_rank_metrics_match_a_materialised_ranking(spec):
    """Repeat events, a target seen before, a user with two targets and
    hash collisions (exact ties) against the materialised count."""
    torch.manual_seed(0)
    num_users, num_items = 6, 40
    model = Q.Factorization(spec, num_users, num_items, 4, user_bias=False)
    with torch.no_grad():
        # A coarse bias keeps the ties of colliding items.
        model.item_bias.weight.copy_(torch.randint(0, 3, (num_items, 1)) * 0.25)
    g = np.random.default_rng(0)
    train = interactions(
        np.repeat(np.arange(num_users), 8), g.integers(0, num_items, 8 * num_users), num_users, num_items
    )
    train.item[:3] = 5  # user 0 saw item 5 three times
    valid = interactions(np.arange(num_users), g.integers(0, num_items, num_users), num_users, num_items)
    targets = interactions([0, 1, 2, 3, 4, 5, 3], [5, train.item[8], 7, 8, 9, 10, 11], num_users, num_items)
    got = Q.rank_metrics(model, targets, [train, valid], chunk=4)

    with torch.no_grad():
        items = torch.from_numpy(targets.item)
        bias = model.item_bias.weight[:, 0]
        if model.users is None:
            scores = bias.expand(len(items), -1).clone()
        else:
            vectors = model.items(torch.arange(num_items))
            # bloom_rank's rounding: the float64 dot product, rounded once.
            scores = (model.users(torch.from_numpy(targets.user)).double() @ vectors.double().T).float() + bias
    rows = torch.arange(len(items))
    target_scores = scores[rows, items].clone()
    for row, user in enumerate(targets.user):
        for part in (train, valid):
            scores[row, torch.from_numpy(part.item[part.user == user])] = -float("inf")
    scores[rows, items] = target_scores  # a target seen before still competes
    above = items_above(scores, items)
    expected = ranking_metrics(above, torch.isfinite(scores).sum(1).double() - 1, k=10)
    assert got == {name: values.mean().item() for name, values in expected.items()}
    if spec.kind in ("none", "hash"):
        assert (above % 1 == 0.5).any()  # ties were there to split


def test_padded_items_keep_repeats_and_pad_with_minus_one():
    events = [interactions([2, 0, 0], [3, 4, 4], 3, 5), interactions([0], [1], 3, 5)]
    got = Q.padded_items(events, np.array([2, 1, 0, 2]))
    assert got.tolist() == [[3, -1, -1], [-1, -1, -1], [4, 4, 1], [3, -1, -1]]
    assert Q.padded_items([interactions([], [], 3, 5)], np.array([0, 1])).shape == (2, 0)


def test_bloom_tables_have_no_padding_id():
    table = Q.make_table(Q.TableSpec("bloom", 0.5, 2), 10, 4)
    assert table.padding_idx is None
    assert table(torch.tensor([0])).abs().sum() > 0  # user/item 0 is real


def test_grid_runs_variants_on_the_same_pairs():
    variants = {"fixed_k": {"num_hash_functions": 3, "hash_cache": True}, "plain": {}}
    specs = Q.table_grid([(0.5, 2), (0.5, 4), (0.2, 4)], variants)
    labels = [s.label for s in specs]
    assert labels[:2] == ["biases only", "full table"]
    assert "bloom r=0.5 k=2" in labels and "plain r=0.2 k=4" in labels
    fixed = [s for s in specs if s.kind == "fixed_k"]
    assert [(s.ratio, s.k) for s in fixed] == [(0.5, 3), (0.2, 3)]
    assert dict(fixed[0].kwargs) == {"hash_cache": True}


@pytest.mark.parametrize("task_name", ["implicit", "ratings"])
def test_fit_trains_every_table_kind(task_name):
    data = D.synthetic(num_users=40, num_items=60, rank=2, mean_per_user=10, seed=0)
    hyper = {t: dataclasses.replace(hp, dim=8, max_epochs=2, batch_size=128) for t, hp in Q.HYPER.items()}
    (task,) = Q.make_tasks(data, [task_name], hyper)
    sizes = {}
    for spec in (Q.TableSpec("none"), Q.TableSpec("full"), Q.TableSpec("bloom", 0.5, 2)):
        result = Q.fit(task, spec, seed=0)
        assert set(result["test"]) == ({"rmse"} if task_name == "ratings" else {"mrr", "auc", "hr@10"})
        assert all(np.isfinite(v) for v in result["test"].values())
        sizes[spec.kind] = result["embedding_params"]
    assert sizes == {"none": 0, "full": (40 + 60) * 8, "bloom": (20 + 30) * 8}


def test_fit_is_deterministic_for_a_seed():
    data = D.synthetic(num_users=30, num_items=50, rank=2, mean_per_user=8, seed=0)
    hyper = {t: dataclasses.replace(hp, dim=8, max_epochs=2, batch_size=64) for t, hp in Q.HYPER.items()}
    (task,) = Q.make_tasks(data, ["implicit"], hyper)
    spec = Q.TableSpec("bloom", 0.5, 2)
    assert Q.fit(task, spec, seed=1)["test"] == Q.fit(task, spec, seed=1)["test"]


def test_compressing_one_side_keeps_the_other_full():
    model = Q.Factorization(Q.TableSpec("bloom", 0.5, 2), 10, 20, 4, user_bias=False, compress=("items",))
    assert type(model.users).__name__ == "ScaledEmbedding" and model.users.num_embeddings == 10
    assert model.items.num_rows == 10
    assert Q.Factorization(Q.TableSpec("none"), 10, 20, 4, user_bias=False, compress=("items",)).users is None
