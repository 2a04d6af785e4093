"""``bench/sequence.py`` on a tiny synthetic catalogue (seconds, no network):
every model fits its budget as built, and the library's ranking of the Bloom
models (``bloom_rank``, ``BloomOutputLayer.rank``) counts exactly what
materialised scores and ``items_above`` count."""

import dataclasses

import pytest
import torch

import bench.sequence as S
from bench import data as datasets
from bench.common import environment
from triton_bloom import BloomEmbedding
from triton_bloom.hashing import hash_rows
from triton_bloom.output import bloom_rank
from triton_bloom.ranking import items_above

TINY = dataclasses.replace(S.Config(), dim=16, seq_len=4, lrs=(1e-2,), max_epochs=2, patience=1, batch_size=128)


@pytest.fixture(scope="module")
def tiny_data():
    return datasets.synthetic(num_users=60, num_items=300, mean_per_user=12, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tiny_data):
    return S.run(tiny_data, TINY)


def test_every_model_runs_within_its_budget(tiny_run, tmp_path):
    payload = tiny_run
    assert [r["model"] for r in payload["rows"]] == [s.name for s in S.specs(TINY.ks)]
    assert {v["bloom"].rsplit(" k=", 1)[0] for v in payload["verdict"]} == {"tied Bloom", "Bloom output layer"}
    budget = payload["budget_bytes"]
    assert budget == int(TINY.budget * payload["full_bytes"])
    for run in payload["runs"]:
        if run["family"] != "full":
            assert run["bytes"] <= budget, run["model"]
            # Sized to the budget, not far under it: less than the largest step
            # (one more width of an untied pair of 300-item tables) is left over.
            assert run["bytes"] > budget - 2 * 300 * 4, run["model"]
        for m in ("mrr", "hr@10", "hr@10_topk", "auc"):
            assert 0.0 <= run["test"][m] <= 1.0
        assert str(run["lr"]) in run["by_lr"]
    payload = {**payload, "environment": environment(), "command": "test"}
    out = tmp_path / "seq.md"
    S.write_markdown(str(out), payload)
    text = out.read_text()
    assert "| tied Bloom k=4 |" in text and "| Bloom output layer k=2 |" in text


def test_sizes_at_ml100k_scale():
    """The shapes the recorded run uses: ml-100k's 1682 items at width 64."""
    n, cfg = 1682, S.Config()
    full = S.full_bytes(n, cfg.dim)
    assert full == 2 * n * 64 * 4
    budget = int(0.2 * full)
    shapes = {}
    for spec in S.specs((4,))[1:]:
        model, details = S.build(spec, n, cfg, budget)
        assert model.budget_bytes() <= budget, spec
        shapes[spec.name] = details
    assert shapes["reduced width, tied"]["width"] == 25  # 0.2 * 2 * 64 floats per id in one table
    assert shapes["reduced width, untied"]["width"] == 12
    # One table at both ends: twice the rows of each table of an untied Bloom pair.
    assert shapes["tied Bloom k=4"]["rows"] == budget // (64 * 4) == 672
    assert shapes["Bloom output layer k=4"]["input_rows"] == 336


def _materialised_ranks(scores, targets, exclude):
    """The plain way: excluded ids (never the target) to -inf, items_above."""
    left_out = torch.zeros(scores.shape, dtype=torch.bool)
    for q in range(len(targets)):
        ids = exclude[q][exclude[q] >= 0]
        left_out[q, ids] = True
        left_out[q, targets[q]] = False
    scores = scores.masked_fill(left_out, float("-inf"))
    return items_above(scores, targets), scores.shape[1] - 1 - left_out.sum(1)


def _queries(n_items, dim, q=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(q, dim, generator=g)
    targets = torch.randint(0, n_items, (q,), generator=g)
    exclude = torch.randint(-1, n_items, (q, 25), generator=g)
    exclude[:5, 0] = targets[:5]  # a listed target still competes
    return hidden, targets, exclude


@pytest.mark.parametrize("rows,k,with_bias", [(64, 2, True), (7, 1, False), (7, 1, True)])
def test_tied_bloom_ranks_match_materialised_scores(rows, k, with_bias):
    """7 rows and k=1 on 300 items: most items share their vector with
    others, so exact ties (counted half) are everywhere."""
    n, dim = 300, 16
    torch.manual_seed(0)
    model = S.TiedBloom(n, dim, rows, k)
    S.reinit(model, 1.0 / dim)
    if with_bias:
        with torch.no_grad():
            model.item_bias.normal_(0, 0.1)
    hidden, targets, exclude = _queries(n, dim)
    above, others = model.rank(hidden, targets, exclude)
    with torch.no_grad():
        scores = hidden @ model.items(torch.arange(n)).T + model.item_bias
    ref_above, ref_others = _materialised_ranks(scores, targets, exclude)
    if not with_bias:
        assert (ref_above != ref_above.floor()).any()  # the ties this case is about
    torch.testing.assert_close(above, ref_above, rtol=0, atol=0)
    assert torch.equal(others, ref_others)
    top = model.topk(hidden, 10, exclude)
    assert top.shape == (40, 10)


@pytest.mark.parametrize("units,k", [(50, 3), (6, 1)])
def test_bloom_output_layer_ranks_match_materialised_decoder(units, k):
    n, dim = 300, 16
    torch.manual_seed(1)
    model = S.BloomOut(n, dim, 40, units, k)
    S.reinit(model, 1.0 / dim)
    with torch.no_grad():
        model.out.projection.bias.normal_(0, 0.5)
    hidden, targets, exclude = _queries(n, dim, seed=1)
    above, others = model.rank(hidden, targets, exclude)
    with torch.no_grad():
        rows = hash_rows(torch.arange(n), k, units).long()
        scores = model.out(hidden).double()[:, rows].sum(-1)
    ref_above, ref_others = _materialised_ranks(scores, targets, exclude)
    torch.testing.assert_close(above, ref_above, rtol=0, atol=0)
    assert torch.equal(others, ref_others)


def test_plain_model_counts_as_the_library_does():
    """The baselines' materialised ranking equals ``bloom_rank`` run over
    their own table: every model is counted by the same rule."""
    n, width = 300, 8
    torch.manual_seed(2)
    model = S.Plain(n, width, tied=True)
    S.reinit(model, 1.0 / width)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.1)
    hidden, targets, exclude = _queries(n, width, seed=2)
    above, others = model.rank(hidden, targets, exclude)
    ranks = bloom_rank(hidden, targets, model.items, exclude=exclude, bias=model.item_bias)
    torch.testing.assert_close(above, ranks.above, rtol=0, atol=0)
    assert torch.equal(others, ranks.others)


def test_pooling_ignores_padding():
    emb = BloomEmbedding(50, 4, num_rows=10, padding_idx=None)
    history = torch.tensor([[3, 7, -1, -1], [5, -1, -1, -1]])
    out = S.pooled(emb, history)
    torch.testing.assert_close(out[0], emb(torch.tensor([3, 7])).mean(0))
    torch.testing.assert_close(out[1], emb(torch.tensor(5)))
