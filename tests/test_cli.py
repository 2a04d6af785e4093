"""The ``triton-bloom`` command, the demo's pieces, and the autotune cache.

Everything here runs on CPU: the cache is checked through ``launch`` with
stand-in kernels and autotuners (pinning the interpreter off for the
duration), and ``tune``'s table and saving through a stand-in for the GPU
work, so that the logic a production GPU job depends on is tested where CI
has no GPU.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from support import require_kernels

from triton_bloom import cli, demo
from triton_bloom.ranking import items_above

require_kernels()  # fail, not skip, where the kernels (and so the cache code) cannot load
from triton_bloom.kernels import autotune, launch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test reads and writes its own cache file, never ~/.cache."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    autotune.reset_cache_path()
    yield path
    autotune.reset_cache_path()


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out


# ---------------------------------------------------------------------------
# info, tune, bench, help


def test_info_prints_versions_backends_and_cache(capsys, private_cache, monkeypatch):
    import triton

    import triton_bloom

    monkeypatch.setenv("COLUMNS", "300")  # rich folds long cells at 80 columns when not on a terminal
    code, out = run_cli(capsys, "info")
    assert code == 0
    for text in (triton_bloom.__version__, torch.__version__, triton.__version__, "python", "interpreter"):
        assert text in out, text
    assert f"{private_cache} (not written yet)" in out
    assert "autotune cache entries" in out


def test_info_says_whether_the_cpu_loops_built(capsys, monkeypatch):
    from triton_bloom import native

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_error", "FileNotFoundError: no compiler named cc-missing")
    code, out = run_cli(capsys, "info")
    assert code == 0
    assert "PyTorch ops instead: FileNotFoundError: no compiler named cc-missing" in out


def test_tune_without_gpu_says_so_and_exits_zero(capsys):
    if torch.cuda.is_available() and not launch.interpreting():
        pytest.skip("a GPU is present: tune would really tune")
    code, out = run_cli(capsys, "tune", "--dim", "64", "--k", "4")
    assert code == 0
    assert "Tuning needs a CUDA GPU" in " ".join(out.split())


def test_tune_prints_and_saves_what_the_tuner_chose(capsys, monkeypatch, private_cache):
    """``tune``'s own logic (the shapes, the table, the save) with the GPU
    work replaced by records such as ``launch`` writes while recording."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cli, "_autotune_module", lambda: autotune)
    monkeypatch.setattr("triton_bloom.dispatch.interpreter_enabled", lambda: False)
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU")
    seen = []

    def fake_shape(device, dim, k, dtype, ids, args):
        seen.append((dim, k, dtype, ids))
        autotune._session.records.append(
            make_record("_bloom_forward_kernel", dim=dim, K=k, device="Fake GPU", dtype=f"torch.{dtype}")
        )
        autotune._session.records.append(
            make_record("_bloom_bag_forward_kernel", dim=dim, K=k, MODE=2, device="Fake GPU", dtype=f"torch.{dtype}")
        )

    monkeypatch.setattr(cli, "_tune_shape", fake_shape)
    code, out = run_cli(capsys, "tune", "--dim", "32", "64", "--k", "4", "--dtype", "float32", "bfloat16")
    assert code == 0
    assert seen == [(d, 4, t, "int64") for d in (32, 64) for t in ("float32", "bfloat16")]
    assert "bag_forward[max]" in out and "Fake GPU" in out
    stored = json.loads(private_cache.read_text())
    assert stored["format"] == autotune.CACHE_FORMAT
    assert len(stored["entries"]) == 8
    assert "Saved 8 config(s) to" in " ".join(out.split())


def test_bench_builtin_times_both_layers(capsys):
    code, out = run_cli(
        capsys, "bench", "--builtin", "--device", "cpu", "--num-embeddings", "1000", "--batch", "16", "--repeats", "2"
    )
    assert code == 0
    assert "nn.Embedding (full)" in out and "BloomEmbedding 0.2" in out


def test_bench_without_a_checkout_falls_back_to_builtin(capsys, monkeypatch):
    monkeypatch.setattr(cli, "find_speed_script", lambda: None)
    code, out = run_cli(
        capsys, "bench", "--device", "cpu", "--num-embeddings", "1000", "--batch", "16", "--repeats", "2"
    )
    assert code == 0
    assert "bench/perf/speed.py is not here" in " ".join(out.split())
    assert "BloomEmbedding 0.2" in out


def test_bench_runs_speed_script_from_the_checkout(capsys, tmp_path):
    assert cli.find_speed_script() is not None  # tests run from a checkout
    out_file = tmp_path / "speed.json"
    code, out = run_cli(
        capsys,
        "bench",
        "--device",
        "cpu",
        "--num-embeddings",
        "5000",
        "--batch",
        "8",
        "--repeats",
        "2",
        "--out",
        str(out_file),
        "--",
        "--warmup",
        "1",
        "--copy-mib",
        "4",
        "--providers",
        "triton_bloom,seed",
    )
    assert code == 0
    assert "bench/perf/speed.py --quick" in out
    assert json.loads(out_file.read_text())["rows"]


def test_python_m_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "triton_bloom", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("info", "tune", "bench", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["info", "tune", "bench", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: triton-bloom " + command in capsys.readouterr().out


# ---------------------------------------------------------------------------
# demo


def test_demo_runs_tiny(capsys):
    code, out = run_cli(
        capsys,
        "demo",
        "--closed",
        "--quick",
        "--users",
        "300",
        "--items",
        "200",
        "--epochs",
        "2",
        "--ratios",
        "0.5",
        "0.2",
        "--device",
        "cpu",
    )
    assert code == 0
    for text in ("nn.Embedding", "Bloom 0.5", "Bloom 0.2", "popularity", "AUC", "HR@10"):
        assert text in out


def test_demo_data_is_deterministic_and_well_formed():
    a = demo.make_dataset(300, 200, seed=3)
    b = demo.make_dataset(300, 200, seed=3)
    for name in ("train_users", "train_items", "test_items", "train_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.train_items, demo.make_dataset(300, 200, seed=4).train_items)
    assert (a.train_counts >= 2).all() and a.train_counts.sum() == a.train_users.numel()
    assert torch.equal(torch.bincount(a.train_users, minlength=300), a.train_counts)
    # Each user's items are distinct and the held-out one is not among them.
    for u in range(0, 300, 37):
        items = a.train_items[a.train_users == u]
        assert items.unique().numel() == items.numel()
        assert a.test_items[u] not in items


def test_demo_ranks_match_a_direct_count():
    data = demo.make_dataset(50, 40, seed=1)
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(50, 5, generator=g), torch.randn(40, 5, generator=g)
    ranks = demo.item_ranks(users, torch.nn.Embedding.from_pretrained(items), data, chunk=7)
    for u in range(50):
        seen = set(data.train_items[data.train_users == u].tolist())
        scores = (users[u].double() @ items.double().T).float()  # bloom_rank's rounding
        target = scores[data.test_items[u]]
        others = [i for i in range(40) if i not in seen and i != data.test_items[u]]
        expected = sum(1.0 if scores[i] > target else 0.5 if scores[i] == target else 0.0 for i in others)
        assert ranks[u] == expected
    auc, hits = demo.metrics(torch.zeros(50, dtype=torch.long), data)
    assert auc == 1.0 and hits == 1.0


@pytest.mark.parametrize("ratio", [None, 0.3])
def test_demo_model_ranks_match_the_materialised_count(ratio):
    """The chunked ranking of a full and a Bloom item table, against every
    item's vector and an (users, items) score matrix."""
    data = demo.make_dataset(60, 50, seed=2)
    torch.manual_seed(0)
    model = demo.build_model(ratio, 50, 8, 1, torch.device("cpu"))
    with torch.no_grad():
        # A coarse bias keeps the ties of colliding items.
        model.item_bias.weight.copy_(torch.randint(0, 2, (50, 1)) * 0.5)
        users = demo.user_vectors(model, data)
        vectors = model.items(torch.arange(50))
    scores = (users.double() @ vectors.double().T).float() + model.item_bias.weight[:, 0]
    scores[data.train_users, data.train_items] = float("-inf")
    expected = items_above(scores, data.test_items)
    assert torch.equal(demo.model_ranks(model, data), expected)
    if ratio is not None:
        assert (expected % 1 == 0.5).any()  # k=1 collisions tie


def test_demo_counts_a_tie_as_half_an_item_above():
    """Items whose k rows all collide share a vector and so a score: the
    demo ranks such a tie half above the held-out item, as bench/studies/quality.py does."""
    # User 0 trained on items 0 and 5 and holds out item 1; user 1 trained
    # on items 2 and 3 and holds out item 0.
    data = demo.Dataset(
        2,
        6,
        train_users=torch.tensor([0, 0, 1, 1]),
        train_items=torch.tensor([0, 5, 2, 3]),
        test_items=torch.tensor([1, 0]),
        train_counts=torch.tensor([2, 2]),
    )
    item_scores = torch.tensor([[9.0], [2.0], [2.0], [3.0], [1.0], [7.0]])
    ranks = demo.item_ranks(torch.ones(2, 1), torch.nn.Embedding.from_pretrained(item_scores), data)
    # User 0 ranks item 1 (2.0) against items 2 (2.0, a tie), 3 (3.0, above)
    # and 4 (1.0, below); user 1 ranks item 0 (9.0) above items 1, 4 and 5.
    assert ranks.tolist() == [1 + 0.5, 0.0]
    auc, hits = demo.metrics(ranks, data, k=2)
    below_0 = (1 + 0.5) / 3  # item 4, and half of item 2
    assert auc == pytest.approx((below_0 + 1.0) / 2)
    assert hits == 0.5  # user 0's held-out item ranks 2.5th, outside the top 2


def test_demo_training_is_deterministic():
    data = demo.make_dataset(120, 80, seed=0)

    def train():
        torch.manual_seed(0)
        model = demo.build_model(0.5, 80, 8, 2, torch.device("cpu"))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        demo.train_epoch(model, optimizer, data, 64, 4, 1e-4, g)
        return demo.model_ranks(model, data)

    assert torch.equal(train(), train())


# ---------------------------------------------------------------------------
# the autotune cache


FAKE_SOURCE = f"fake-source-hash-triton-{__import__('triton').__version__}"


def make_record(
    kernel="_fake_kernel",
    source=FAKE_SOURCE,
    device="Fake GPU",
    dtype="torch.float32",
    block_n=64,
    block_d=32,
    num_warps=4,
    num_stages=2,
    **key,
):
    key = key or {"dim": 64, "K": 4}
    return {
        "kernel": kernel,
        "source": source,
        "key": key,
        "dtypes": {"IDS": "torch.int64", "W": dtype, "OUT": dtype},
        "device": device,
        "config": {
            "kwargs": {"BLOCK_N": block_n, "BLOCK_D": block_d},
            "num_warps": num_warps,
            "num_stages": num_stages,
        },
        "ms": 0.01,
        "configs_tried": 20,
    }


class FakeKernel:
    """Stands in for a ``@triton.jit`` kernel: records each launch."""

    cache_key = "fake-source-hash"

    def __init__(self, name="_fake_kernel", error=None):
        self.__name__ = name
        self.launches = []
        self.error = error

    def __getitem__(self, grid):
        def run(**kwargs):
            if self.error is not None:
                raise self.error
            self.launches.append((grid, kwargs))

        return run


class FakeAutotuner:
    """Stands in for ``triton.autotune(...)(kernel)``."""

    def __init__(self):
        self.calls = []
        self.best_config = type(
            "Config", (), {"kwargs": {"BLOCK_N": 128, "BLOCK_D": 64}, "num_warps": 8, "num_stages": 1}
        )()
        self.configs_timings = None

    def __getitem__(self, grid_for):
        def run(**kwargs):
            self.calls.append(kwargs)
            self.configs_timings = {self.best_config: [0.125, 0.1, 0.2], object(): [0.5, 0.4, 0.6]}

        return run


@pytest.fixture
def on_gpu(monkeypatch):
    """``launch`` as on a GPU host: interpreter off, device name fixed, and
    the autotuner replaced by one that records its calls."""
    tuner = FakeAutotuner()
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(autotune, "tuned", lambda kernel, tuning: tuner)
    return tuner


def launch_args(dtype=torch.float32, dim=64, k=4):
    return dict(
        IDS=torch.zeros(3, dtype=torch.int64),
        W=torch.zeros(2, dim, dtype=dtype),
        OUT=torch.zeros(3, dim, dtype=dtype),
        dim=dim,
        K=k,
        HAS_PADDING=False,
    )


def grid_for(meta):
    return (10 // meta["BLOCK_N"] + 1, 64 // meta["BLOCK_D"])


def test_entry_key_ignores_order():
    a = autotune.entry_key("k", "s", {"dim": 64, "K": 4}, {"W": "torch.float32", "IDS": "torch.int64"}, "H200")
    b = autotune.entry_key("k", "s", {"K": 4, "dim": 64}, {"IDS": "torch.int64", "W": "torch.float32"}, "H200")
    assert a == b
    assert a != autotune.entry_key("k", "s", {"dim": 64, "K": 8}, {"W": "torch.float32", "IDS": "torch.int64"}, "H200")
    assert a != autotune.entry_key("k", "s", {"dim": 64, "K": 4}, {"W": "torch.bfloat16", "IDS": "torch.int64"}, "H200")
    assert a != autotune.entry_key("k", "s", {"dim": 64, "K": 4}, {"W": "torch.float32", "IDS": "torch.int64"}, "A100")
    # An edited kernel (or another Triton) has another source key: the entry no longer applies.
    assert a != autotune.entry_key("k", "t", {"dim": 64, "K": 4}, {"W": "torch.float32", "IDS": "torch.int64"}, "H200")


def test_save_load_round_trip_and_merge(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    assert autotune.save_cache([make_record(), make_record(dim=128, K=4)], str(path)) == 2
    # Same key again: replaced, not duplicated; a new dtype: added.
    assert autotune.save_cache([make_record(block_n=16), make_record(dtype="torch.bfloat16")], str(path)) == 3
    loaded = autotune.load_cache(str(path))
    key = autotune.entry_key(
        "_fake_kernel",
        FAKE_SOURCE,
        {"dim": 64, "K": 4},
        {"IDS": "torch.int64", "W": "torch.float32", "OUT": "torch.float32"},
        "Fake GPU",
    )
    assert loaded[key] == {"kwargs": {"BLOCK_N": 16, "BLOCK_D": 32}, "num_warps": 4, "num_stages": 2}
    assert not [p for p in os.listdir(path.parent) if p != "cache.json"]  # no temporary left behind


def test_entry_key_for_a_launch_matches_the_saved_entry():
    key = autotune.entry_key_for(FakeKernel(), launch_args(), autotune.TUNING_KEY, "Fake GPU")
    record = make_record()
    assert key == autotune.entry_key(
        record["kernel"], record["source"], record["key"], record["dtypes"], record["device"]
    )


def test_an_edited_kernel_does_not_reuse_the_cached_config(on_gpu, private_cache):
    autotune.save_cache([make_record(source="hash-of-the-old-source-triton-3.0.0")], str(private_cache))
    kernel = FakeKernel()
    launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert kernel.launches == [] and len(on_gpu.calls) == 1  # tuned afresh


def test_source_key_follows_the_kernel_source():
    kernels = require_kernels()
    forward = autotune.source_key(kernels.forward._bloom_forward_kernel)
    backward = autotune.source_key(kernels.backward._bloom_backward_kernel)
    assert forward != backward and forward.endswith(__import__("triton").__version__)


def test_bad_cache_files_are_ignored_with_a_warning(tmp_path):
    assert autotune.load_cache(str(tmp_path / "missing.json")) == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert autotune.load_cache(str(bad)) == {}
    bad.write_text(json.dumps({"format": 999, "entries": []}))
    with pytest.warns(RuntimeWarning, match="format"):
        assert autotune.load_cache(str(bad)) == {}
    broken = make_record(block_n=48)  # not a power of two: cannot compile
    bad.write_text(json.dumps({"format": autotune.CACHE_FORMAT, "entries": [make_record(), broken, {"x": 1}]}))
    with pytest.warns(RuntimeWarning, match="2 malformed"):
        assert len(autotune.load_cache(str(bad))) == 1


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "x.json"))
    assert autotune.cache_path() == str(tmp_path / "x.json")
    monkeypatch.setenv(autotune.CACHE_ENV, "")
    assert autotune.cache_path() is None
    monkeypatch.delenv(autotune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == str(tmp_path / "triton_bloom" / "autotune.json")
    autotune.set_cache_path(str(tmp_path / "y.json"))
    assert autotune.cache_path() == str(tmp_path / "y.json")


def test_launch_uses_a_cached_config_without_tuning(on_gpu, private_cache):
    autotune.save_cache([make_record(block_n=32, block_d=64, num_warps=2, num_stages=1)], str(private_cache))
    kernel = FakeKernel()
    launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning(reset_to_zero=("OUT",)))
    assert on_gpu.calls == []  # no autotuner run
    ((grid, kwargs),) = kernel.launches
    assert grid == grid_for({"BLOCK_N": 32, "BLOCK_D": 64})
    assert kwargs["BLOCK_N"] == 32 and kwargs["BLOCK_D"] == 64
    assert kwargs["num_warps"] == 2 and kwargs["num_stages"] == 1
    assert kwargs["dim"] == 64 and kwargs["IDS"] is not None


def test_launch_tunes_when_nothing_matches(on_gpu, private_cache):
    autotune.save_cache([make_record(device="Another GPU")], str(private_cache))
    kernel = FakeKernel()
    launch.launch(kernel, grid_for, launch_args(dtype=torch.bfloat16), torch.device("cpu"), tuning=autotune.Tuning())
    launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert kernel.launches == [] and len(on_gpu.calls) == 2


def test_a_cached_config_that_does_not_build_falls_back_to_tuning(on_gpu, private_cache):
    from triton.runtime.errors import OutOfResources

    autotune.save_cache([make_record()], str(private_cache))
    kernel = FakeKernel(error=OutOfResources(300000, 232448, "shared memory"))
    with pytest.warns(RuntimeWarning, match="autotuning instead"):
        launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert len(on_gpu.calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was dropped: no second warning
        launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert len(on_gpu.calls) == 2


def test_recording_tunes_saves_and_the_next_launch_reuses(on_gpu, private_cache):
    autotune.save_cache([make_record(block_n=16)], str(private_cache))  # stale: recording ignores it
    kernel = FakeKernel()
    with autotune.recording() as records:
        launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert kernel.launches == [] and len(on_gpu.calls) == 1
    (record,) = records
    assert record["kernel"] == "_fake_kernel" and record["key"] == {"dim": 64, "K": 4}
    assert record["dtypes"] == {"IDS": "torch.int64", "W": "torch.float32", "OUT": "torch.float32"}
    assert record["config"] == {"kwargs": {"BLOCK_N": 128, "BLOCK_D": 64}, "num_warps": 8, "num_stages": 1}
    assert record["ms"] == 0.125 and record["configs_tried"] == 2 and record["device"] == "Fake GPU"

    assert autotune.save_cache(records, str(private_cache)) == 1
    launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    assert len(on_gpu.calls) == 1  # not tuned again
    assert kernel.launches[0][1]["BLOCK_N"] == 128 and kernel.launches[0][1]["num_warps"] == 8


def test_the_interpreter_ignores_the_cache(monkeypatch, private_cache):
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    autotune.save_cache([make_record(device="cpu")], str(private_cache))
    kernel = FakeKernel()
    launch.launch(kernel, grid_for, launch_args(), torch.device("cpu"), tuning=autotune.Tuning())
    ((grid, kwargs),) = kernel.launches
    assert {k: kwargs[k] for k in launch.INTERPRETER_META} == launch.INTERPRETER_META
    assert "num_warps" not in kwargs


def test_recording_launches_lists_every_launch_with_its_candidates():
    kernel = FakeKernel()
    with launch.recording_launches() as recorded:
        launch.launch(
            kernel,
            grid_for,
            launch_args(dim=33),
            torch.device("cpu"),
            config={"kwargs": {"BLOCK_N": 16, "BLOCK_D": 32}},
        )
    ((entry,),) = (recorded,)
    assert entry["kernel"] is kernel and entry["args"]["dim"] == 33
    assert entry["configs"] == [{"kwargs": {"BLOCK_N": 16, "BLOCK_D": 32}}]
    assert len(kernel.launches) == 1  # recording does not stop the launch


@pytest.mark.parametrize(
    "dtype, dim, widest",
    [(torch.float32, 48, 64), (torch.float32, 200, 256), (torch.float64, 48, 64), (torch.bfloat16, 33, 64)],
)
def test_the_autotuner_prunes_launches_made_by_keyword(dtype, dim, widest):
    # Triton hands early_config_prune the positional arguments apart from the
    # keyword ones, and the launchers pass everything by keyword: the pruning
    # must read both (it read the positional ones only, a KeyError on a GPU).
    kernels = require_kernels()
    tuning = autotune.Tuning()
    tuner = autotune.tuned(kernels.forward._bloom_forward_kernel, tuning)
    tuner.nargs = {}  # what Autotuner.run leaves there for a launch by keywords
    args = dict(IDS=torch.zeros(4, dtype=torch.int64), W=torch.zeros(10, dim, dtype=dtype), dim=dim, K=4)
    kept = tuner.prune_configs(args)
    assert kept and max(c.kwargs["BLOCK_D"] for c in kept) == widest
    limit = tuning.max_per_thread[1 if dtype == torch.float64 else 0]
    assert all(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] // (32 * c.num_warps) <= limit for c in kept)
    assert {c.num_stages for c in kept} == {1}  # no loop to pipeline
