"""``bench/studies/budget_sweep.py`` end to end on a tiny catalogue (seconds), and the
pieces its numbers rest on: the generator, the byte counts, the bench-side
layouts."""

import json

import numpy as np
import pytest
import torch

import bench.studies.budget_sweep as S
from triton_bloom import BloomEmbedding


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget_sweep") / "sweep.json"
    S.main(["--tiny", "--no-plot", "--out", str(out)])
    return out, json.loads(out.read_text())


def test_every_layout_is_run_or_says_why_not(tiny_run):
    out, payload = tiny_run
    names = [s["name"] for s in payload["studies"]]
    assert names[0] == "budget sweep (MF)"
    assert names[1].startswith(f"width fixed at {S.DIM} (pooling sequence model)")
    for study, layouts, budgets in zip(
        payload["studies"], (S.LAYOUTS_A, S.LAYOUTS_B), (S.TINY.budgets, S.TINY.seq_budgets)
    ):
        rows = study["rows"]
        assert [r["layout"] for r in rows[:2]] == ["full table", "biases only"]
        for budget in budgets:
            got = {r["layout"] for r in rows if r["budget"] == budget}
            assert got == {layout.name for layout in layouts}
        for r in rows:
            if r["available"]:
                assert r["within_budget"], r
                assert 0.0 <= r["test"]["auc"] <= 1.0
                assert str(r["lr"]) in r["valid_by_lr"]
            else:
                assert r["reason"]
    assert "## budget sweep (MF)" in out.with_suffix(".md").read_text()


def test_reduced_dimension_runs_out_below_one_float_per_id(tiny_run):
    rows = tiny_run[1]["studies"][0]["rows"]
    at = {r["budget"]: r for r in rows if r["layout"] == "reduced dim"}
    assert not at[0.01]["available"] and "under one dimension" in at[0.01]["reason"]
    assert at[0.2]["available"] and at[0.2]["width"] == int(0.2 * S.DIM)


def test_budget_counts_every_tensor_the_layout_holds():
    n, budget = 2000, 2000 * S.DIM * S.FLOAT_BYTES // 10
    counts = torch.arange(n, 0, -1)
    for layout in S.LAYOUTS_A[:-1] + (S.Layout("factorised", "factorised"),):
        module, _, _ = S.build_items(layout, budget, n, counts)
        assert S.module_bytes(module) <= budget, layout
    hot = S.HotBloom(n, torch.tensor([5, 3, 9]), tail_rows=10, k=2)
    assert S.module_bytes(hot) == (3 * S.DIM + 10 * S.DIM) * 4 + 3 * 8


def test_bench_hot_rows_read_their_own_row_and_the_rest_the_tail():
    torch.manual_seed(0)
    hot = S.HotBloom(100, torch.tensor([7, 2, 40]), tail_rows=11, k=2)
    ids = torch.tensor([[2, 3], [40, 41]])
    out = hot(ids)
    assert torch.equal(out[0, 0], hot.hot.weight[0])  # the hot set is sorted: 2, 7, 40
    assert torch.equal(out[1, 0], hot.hot.weight[2])
    assert torch.allclose(out[:, 1], hot.tail(ids[:, 1]))
    out.sum().backward()
    # A hot id reads no tail row, so a lookup of only hot ids leaves the tail without gradient.
    hot.zero_grad()
    hot(torch.tensor([2, 7])).sum().backward()
    assert hot.tail.weight.grad is None or hot.tail.weight.grad.coalesce().values().abs().sum() == 0


def test_factorised_table_is_code_times_projection_with_the_full_tables_scale():
    torch.manual_seed(0)
    table = S.PrivateBloom(5000, 4, tail_rows=0, k=1)
    S.reinit(table)
    ids = torch.arange(5000)
    assert torch.allclose(table(ids), table.code(ids) @ table.proj.weight.T)
    assert table(ids).std().item() == pytest.approx(S.INIT_STD, rel=0.1)


def test_generator_draws_distinct_items_with_a_popular_head():
    cfg = S.TINY
    data = S.catalogue(cfg)
    for u in range(cfg.num_users):
        items = data.item[data.user == u]
        assert len(items) == len(np.unique(items)) >= cfg.min_per_user
    counts = np.sort(np.bincount(data.item, minlength=cfg.num_items))[::-1]
    assert counts[: cfg.num_items // 20].sum() > 0.3 * counts.sum()


def test_library_bytes_agree_with_the_bench_count():
    import triton_bloom

    if not hasattr(triton_bloom, "embedding_bytes"):
        pytest.skip("the library has no embedding_bytes yet")
    emb = BloomEmbedding(1000, 8, num_rows=50, num_hash_functions=2, padding_idx=None)
    assert S.module_bytes(emb) == triton_bloom.embedding_bytes(emb)
