"""``bench/studies/sequence.py`` on a tiny synthetic catalogue (seconds, no network):
every model fits its budget as built, and the library's ranking of the Bloom
models (``bloom_rank``, ``BloomOutputLayer.rank``) counts exactly what
materialised scores and ``items_above`` count."""

import dataclasses

import pytest
import torch

import bench.studies.sequence as S
from bench.common import environment
from bench.studies import data as datasets
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


# ------------------------------------------------------------ GRU user model

TINY_GRU = dataclasses.replace(TINY, model="gru")


def _gru_bytes(width):
    return 3 * (2 * width * width + 2 * width) * 4  # weight_ih, weight_hh and two biases per gate


def test_gru_models_run_within_their_budget(tiny_data, tmp_path):
    payload = S.run(tiny_data, TINY_GRU, families={"full", "reduced", "factorised", "tied_bloom"})
    names = [s.name for s in S.specs(TINY.ks, "gru") if s.family != "bloom_output"]
    assert [r["model"] for r in payload["rows"]] == names
    assert "factorised, tied" in names and "reduced width, untied" not in names
    budget = payload["budget_bytes"]
    for run in payload["runs"]:
        width = run["details"]["width"]
        # The GRU is paid for outside the table budget, at the model's own width.
        assert run["network_bytes"] == _gru_bytes(width)
        assert width == (TINY.dim if run["model"] != "reduced width, tied" else budget // (300 * 4))
        if run["family"] != "full":
            assert budget - 2 * 300 * 4 < run["bytes"] <= budget, run["model"]
        for m in ("mrr", "hr@10", "hr@10_topk", "auc"):
            assert 0.0 <= run["test"][m] <= 1.0
    assert payload["verdict"] and {v["baseline"] for v in payload["pairs"]} == {
        "reduced width, tied",
        "factorised, tied",
    }
    payload = {**payload, "environment": environment(), "command": "test"}
    out = tmp_path / "seq_gru.md"
    S.write_markdown(str(out), payload)
    text = out.read_text()
    assert "GRU bytes" in text and "| factorised, tied |" in text and "Bloom ahead (MRR)" in text


def test_gru_sizes_at_ml100k_scale():
    n, cfg = 1682, S.GRU
    budget = int(0.2 * S.full_bytes(n, cfg.dim))
    shapes = {}
    for spec in S.specs((2,), "gru")[1:]:
        model, details = S.build(spec, n, cfg, budget)
        assert model.budget_bytes() <= budget, spec
        shapes[spec.name] = (details, S.network_bytes(model))
    assert shapes["reduced width, tied"] == ({"width": 25}, _gru_bytes(25))
    assert shapes["factorised, tied"] == ({"width": 64, "rank": 24}, _gru_bytes(64))  # 24 * (1682 + 64) floats
    assert shapes["tied Bloom k=2"][0]["rows"] == 672


def test_gru_state_ignores_padding():
    """Right padding, however long, leaves the state at the last real step
    alone: it is the GRU over the unpadded sequence.  Left padding with a
    zero vector would not be (the check that this test is about something)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 6)
    user = S.GRUUser(6)
    history = torch.tensor(
        [[3, 7, 2, -1, -1, -1, -1, -1], [3, 7, 2, -1, -1, -1, -1, -1], [5, -1, -1, -1, -1, -1, -1, -1], [-1] * 8]
    )
    out = user(table, history)
    with torch.no_grad():
        alone = user.gru(table(torch.tensor([[3, 7, 2]])))[1][0, 0]
        shorter = user(table, torch.tensor([[3, 7, 2, -1]]))[0]
        left_padded = user.gru(torch.cat([torch.zeros(1, 2, 6), table(torch.tensor([[3, 7, 2]]))], 1))[1][0, 0]
    torch.testing.assert_close(out[0], alone)
    torch.testing.assert_close(out[1], alone)
    torch.testing.assert_close(shorter, alone)
    torch.testing.assert_close(out[2], user.gru(table(torch.tensor([[5]])))[1][0, 0])
    assert torch.equal(out[3], torch.zeros(6))  # no history: the initial state
    assert not torch.allclose(left_padded, alone, atol=1e-4)
    # No gradient reaches the ids read in place of the padding.
    table.weight.grad = None
    user(table, torch.tensor([[3, 7, -1, -1]])).sum().backward()
    assert table.weight.grad[0].abs().sum() == 0 and table.weight.grad[3].abs().sum() > 0


def test_gru_keeps_its_own_init_and_factorised_vectors_have_the_table_scale():
    torch.manual_seed(0)
    model = S.Factorised(2000, 24, 64, user="gru")
    before = {k: v.clone() for k, v in model.user.state_dict().items()}
    S.reinit(model, 1.0 / 64)
    for k, v in model.user.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        std = model.item_vectors().std().item()
    assert abs(std * 64 - 1) < 0.1  # elements of scale 1/64, like a plain table's
    assert model.item_vectors().shape == (2000, 64)


def test_factorised_model_is_tied_and_counted_like_the_others():
    n, rank, width = 300, 5, 16
    torch.manual_seed(3)
    model = S.Factorised(n, rank, width)
    S.reinit(model, 1.0 / width)
    with torch.no_grad():
        model.item_bias.normal_(0, 0.1)
    ids = torch.tensor([4, 9])
    torch.testing.assert_close(model.items(ids), model.item_vectors()[ids])
    hidden, targets, exclude = _queries(n, width, seed=3)
    with torch.no_grad():
        scores = hidden @ (model.items.code.weight @ model.items.proj.weight.T).T + model.item_bias
    torch.testing.assert_close(model.logits(hidden), scores)
    above, others = model.rank(hidden, targets, exclude)
    ref_above, ref_others = _materialised_ranks(scores, targets, exclude)
    torch.testing.assert_close(above, ref_above, rtol=0, atol=0)
    assert torch.equal(others, ref_others)
    assert model.budget_bytes() == (n * rank + rank * width) * 4
