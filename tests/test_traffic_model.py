"""The traffic model (``bench/perf/traffic.py``): its interpreter hooks and L2
model against traffic known by construction, and its ``--ci`` run, which
asserts DRAM / ideal ratios of the kernels at small shapes (never times).

The model traces kernels under Triton's interpreter: on a machine where the
kernels run on a GPU these tests are skipped (the GPU suite checks the model
against measured times there instead)."""

import pytest

from triton_bloom import dispatch

traffic = pytest.importorskip("bench.perf.traffic")

pytestmark = pytest.mark.skipif(
    not dispatch.interpreter_enabled(), reason="the traffic model traces kernels under Triton's interpreter"
)


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    compiler = traffic.Compiler(str(tmp_path_factory.mktemp("traffic_compiles")))
    yield compiler
    compiler.close()


def test_lru_l2_reads_misses_and_writes_back_dirty_sectors():
    l2 = traffic.L2(3 * traffic.SECTOR)
    # Three cold reads, then a hit: 3 sectors from DRAM.
    assert l2.access([1, 2, 3], "load") == 3 * traffic.SECTOR
    assert l2.access([1], "load") == 0
    # A write allocates without reading; sector 2, least recently used, goes clean.
    assert l2.access([4], "store") == 0
    # Reading 5 evicts 3 (clean), reading 6 evicts 1 (clean), 7 evicts the dirty 4.
    assert l2.access([5, 6], "load") == 2 * traffic.SECTOR
    assert l2.access([7], "load") == 2 * traffic.SECTOR
    # An atomic reads its sector and leaves it dirty: written back at the end.
    assert l2.access([8], "atomic") == traffic.SECTOR
    assert l2.flush() == traffic.SECTOR
    assert (l2.read, l2.written) == (7 * traffic.SECTOR, 2 * traffic.SECTOR)


def test_bounds_beside_the_lru():
    bounds = traffic.Bounds()
    bounds.access([1, 2], "load")
    bounds.access([2, 3], "store")
    bounds.access([1], "atomic")
    # Compulsory: 1 and 2 read once; 2, 3 and 1 written once.  No reuse: every request.
    assert bounds.compulsory == 5 * traffic.SECTOR
    assert bounds.no_reuse == (2 + 2 + 2) * traffic.SECTOR


def test_warp_groups_follow_the_blocked_layout():
    # 4 warps over a 32 x 32 tile, 4 contiguous floats a thread, 8 threads a row.
    layout = {
        "kind": "blocked",
        "size_per_thread": [1, 4],
        "threads_per_warp": [4, 8],
        "warps_per_cta": [4, 1],
        "order": [1, 0],
    }
    warp, instr, known = traffic.warp_groups([32, 32], layout, 4)
    assert known
    warp, instr = warp.reshape(32, 32), instr.reshape(32, 32)
    # A warp owns rows 4w .. 4w + 3 of each 16-row repetition.
    assert all((warp[r] == (r // 4) % 4).all() for r in range(32))
    # One 16-byte vector a lane: rows 0-15 in one instruction, 16-31 in another.
    assert len(set(instr[:16].ravel().tolist())) == 1 and len(set(instr[16:].ravel().tolist())) == 1
    assert instr[0, 0] != instr[16, 0]
    # 2-byte elements: 4 of them are 8 bytes, still one vector.
    _, instr16, _ = traffic.warp_groups([32, 32], layout, 2)
    assert len(set(instr16.reshape(32, 32)[:16].ravel().tolist())) == 1


def test_hooks_self_test(compiler):
    # Known traffic of a copy, a strided gather, atomics into 8 bins and a
    # loop whose trip count the model must infer from the trace.
    checks = traffic.self_test(compiler)
    names = [name for name, _, _ in checks]
    assert any("loop" in name for name in names) and any("atomics" in name for name in names)


def test_ci_mode_ratios(compiler):
    lines = []
    results, failures = traffic.run_ci(compiler, log=lines.append)
    assert not failures, "\n".join(lines + failures)
    for r in results:
        m = r["model"]
        # The LRU lies between its bounds, and the larger L2 never moves more.
        assert m["compulsory"] <= m["dram"]["H100"] + traffic.SECTOR <= m["no_reuse"] + 2 * traffic.SECTOR
        assert m["dram"]["H200"] <= m["dram"]["H100"] + traffic.SECTOR
        assert all(s["loops_without_trip_count"] == 0 for s in m["steps"] if s["kind"] == "kernel"), r["op"]
