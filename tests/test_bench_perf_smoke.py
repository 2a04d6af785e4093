"""The speed and memory benchmarks run end to end on a tiny configuration
and write what their readers rely on: every provider, the fields, ratios
that agree with the times, and byte counts that agree with the model."""

import json

import pytest

import bench.perf.memory as memory
import bench.perf.speed as speed

REQUIRED_PROVIDERS = {"triton_bloom", "seed", "embedding_bag_cached", "reference", "full_embedding"}
SPEED_FIELDS = {
    "provider",
    "mode",
    "layer",
    "batch",
    "embedding_dim",
    "k",
    "dtype",
    "distribution",
    "ms",
    "ratio_to_seed",
    "hardware",
    "date",
    "torch",
    "gbps",
    "fraction_of_copy",
}
SHAPE = ("layer", "batch", "seq", "embedding_dim", "k", "dtype", "distribution", "num_embeddings", "mode")


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    speed.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--num-embeddings",
            "5000",
            "--batch",
            "8",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--copy-mib",
            "4",
            "--out",
            str(out),
        ]
    )
    return out, json.loads(out.read_text())


def test_speed_rows_cover_providers_modes_and_fields(speed_run):
    out, payload = speed_run
    rows = payload["rows"]
    assert REQUIRED_PROVIDERS <= {r["provider"] for r in rows}
    assert {r["mode"] for r in rows} == set(speed.MODES)
    assert {r["layer"] for r in rows} == {"embedding", "bag"}
    for row in rows:
        assert SPEED_FIELDS <= row.keys(), SPEED_FIELDS - row.keys()
        assert row["ms"] > 0
    # Every Bloom provider computed the seed's function.
    assert all(r["matches_seed"] for r in rows if r["provider"] != "full_embedding")
    assert out.with_suffix(".md").read_text().count("## ") == 6
    if _has_matplotlib():
        assert out.with_suffix(".png").stat().st_size > 0


def test_speed_ratios_are_seed_ms_over_ms(speed_run):
    rows = speed_run[1]["rows"]
    seed_ms = {tuple(r[f] for f in SHAPE): r["ms"] for r in rows if r["provider"] == "seed"}
    for row in rows:
        assert row["ratio_to_seed"] == pytest.approx(seed_ms[tuple(row[f] for f in SHAPE)] / row["ms"])
        if row["provider"] == "seed":
            assert row["ratio_to_seed"] == 1.0


def test_speed_cases_are_one_axis_sweeps():
    base = speed.Case(batch=8, num_embeddings=1000)
    cases = speed.sweep(base, embedding_dim=[16, 64], k=[1])
    assert cases == [
        base,
        speed.Case(batch=8, num_embeddings=1000, embedding_dim=16),
        speed.Case(batch=8, num_embeddings=1000, k=1),
    ]


def test_memory_rows_measured_and_analytic(tmp_path):
    out = tmp_path / "memory.json"
    payload = memory.main(
        [
            "--device",
            "cpu",
            "--sizes",
            "1000,1e9",
            "--embedding-dim",
            "8",
            "--batch",
            "8",
            "--seq",
            "2",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"]
    assert {r["provider"] for r in rows} == set(memory.PROVIDERS)
    assert {r["optimizer"] for r in rows} == {"adam", "adagrad"}
    kinds = {(r["num_embeddings"], r["kind"]) for r in rows}
    assert kinds == {(1000, "measured"), (10**9, "analytic")}
    for row in rows:
        model = memory.analytic(
            memory.MemoryCase(
                row["provider"], row["optimizer"], row["num_embeddings"], embedding_dim=8, batch=8, seq=2
            ),
            "cpu",
        )
        # Tensor bytes are exact; optimizer state adds only its step counter.
        assert row["module_bytes"] == model["module_bytes"]
        assert row["optimizer_state_bytes"] == pytest.approx(model["optimizer_state_bytes"], abs=64)
        assert row["peak_step_bytes"] > 0
        for name in ("seed", "full_embedding"):
            peer = next(
                r
                for r in rows
                if r["provider"] == name
                and r["optimizer"] == row["optimizer"]
                and r["num_embeddings"] == row["num_embeddings"]
            )
            assert row[f"ratio_to_{name}_module"] == pytest.approx(peer["module_bytes"] / row["module_bytes"])
    big = {r["provider"]: r for r in rows if r["num_embeddings"] == 10**9 and r["optimizer"] == "adam"}
    # A billion ids: ours holds rows * dim floats, the seed adds 8 * k bytes per id.
    assert big["triton_bloom"]["module_bytes"] == 2 * 10**8 * 8 * 4
    assert big["seed"]["module_bytes"] == big["triton_bloom"]["module_bytes"] + 10**9 * 4 * 8
    assert big["triton_bloom"]["optimizer_state_bytes"] == 2 * big["triton_bloom"]["module_bytes"]
    assert out.with_suffix(".md").exists()


def test_output_benchmark_compares_like_with_like(tmp_path):
    # Tiny sizes: the point is that both methods compute the same thing and
    # every field the results file is read for is there.
    import bench.perf.output as output

    out = tmp_path / "output.json"
    payload = output.main(
        [
            "--topk-ids",
            "3000",
            "--queries",
            "5",
            "--loss-ids",
            "2000",
            "--loss-batch",
            "64",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["results"]
    assert rows == json.loads(json.dumps(payload["results"]))
    assert [(r["task"], r["queries"]) for r in rows] == [("topk", 5), ("loss", 64)]
    for row in rows:
        assert row["agree"]
        assert row["time_ratio"] > 0 and row["peak_mib"] >= 0 and row["baseline_peak_mib"] > 0
        assert row["memory_ratio"] == pytest.approx(row["peak_mib"] / row["baseline_peak_mib"])  # mmap'd: > 0
    assert "| topk | 3,000 | 5 | yes |" in out.with_suffix(".md").read_text()


def test_seed_compare_pairs_the_layers_and_records_the_conditions(tmp_path, capsys):
    import statistics

    import bench.perf.seed_compare as seed_compare

    out = tmp_path / "seed_compare.json"
    argv = ["--num-embeddings", "5000", "--batch", "32", "--seq", "4", "--bag-length", "5"]
    summary = seed_compare.main([*argv, "--repeats", "5", "--warmup", "1", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    # Progress: one line per measure, printed as it runs, naming its pair count.
    steps = [line.split(" ... ")[0] for line in printed.splitlines() if line.startswith("[")]
    assert steps == [
        "[1/4] embedding forward: 5 pairs",
        "[2/4] embedding forward_backward: 5 pairs",
        "[3/4] bag forward: 5 pairs",
        "[4/4] bag forward_backward: 5 pairs",
    ]
    payload = json.loads(out.read_text())
    assert payload["threads"] == 1 and payload["config"]["threads"] == 1
    assert set(payload["load_average"]) == {"before", "after"}
    assert all(len(v) == 3 for v in payload["load_average"].values())
    for name, result in payload["results"].items():
        for measure in ("forward", "forward_backward"):
            times = result["times_ms"][measure]
            assert len(times["seed"]) == len(times["triton_bloom"]) == 5
            # The recorded speedup is the median of per-pair ratios, not a ratio of medians.
            pairs = [s / o for s, o in zip(times["seed"], times["triton_bloom"])]
            assert result["pair_ratio"][measure]["median"] == pytest.approx(statistics.median(pairs))
            assert (
                result["pair_ratio"][measure]["q1"] <= statistics.median(pairs) <= result["pair_ratio"][measure]["q3"]
            )
            assert result["median_ms"][measure]["seed"] == pytest.approx(statistics.median(times["seed"]))
        key = {"forward": "forward_speedup", "forward_backward": "forward_backward_speedup"}
        for measure, field in key.items():
            assert summary[name][field] == payload["ratios"][name][field] == result["pair_ratio"][measure]["median"]
        assert summary[name]["memory_ratio"] == result["module_bytes"]["seed"] / result["module_bytes"]["triton_bloom"]


def test_seed_compare_rejects_too_few_pairs():
    import bench.perf.seed_compare as seed_compare

    with pytest.raises(SystemExit):
        seed_compare.main(["--repeats", "1"])


def test_seed_compare_alternates_the_layers_run_by_run():
    import bench.perf.seed_compare as seed_compare

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("seed", "triton_bloom")}
    times = seed_compare.paired_ms(fns, repeats=4, warmup=1, sync=None)
    assert {name: len(t) for name, t in times.items()} == {"seed": 4, "triton_bloom": 4}
    timed = calls[2:]  # after one warm-up run of each
    assert timed == ["seed", "triton_bloom", "triton_bloom", "seed", "seed", "triton_bloom", "triton_bloom", "seed"]
