"""Kernel report: what each kernel compiles to on a GPU target, with no GPU.

Records the launchers' launches over a small grid (the interpreter runs
them), compiles each kernel for one target (default sm_90) at every
configuration of the autotuner's search space, and writes a Markdown table
and the JSON behind it:

- registers per thread, stack frame (``ptxas`` spills go there), shared memory;
- the global loads, and how many are 16 bytes wide (``ld.global.v4`` of
  32-bit words, ``ld.global.v2`` of 64-bit ones): the row gathers of an
  aligned table should be;
- the global reductions (the backward's scatter-add), and how many are
  vector reductions (``red.global.v4.f32`` and the like, sm_90 only);
- the bytes each kernel must move per id against the ideal.

Run: ``python bench/perf/kernel_report.py`` (under a minute on 2 cores);
``--target 80`` for A100, ``--out`` for another place.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from triton_bloom import aot  # noqa: E402

FULL = {"padding": True, "wide_ids": True, "signed": True, "importance": True}
# One case per kernel and table dtype, with the table's rows 16-element
# aligned (dim 32, as real tables are), plus one misaligned row width.
CASES = (
    [dict(op="embedding", dtype=d, k=4, variant="plain") for d in ("float32", "bfloat16", "float64")]
    + [dict(op="embedding", dtype="float32", k=4, variant="all", **FULL)]
    + [dict(op="bag", mode=m, dtype="float32", k=4, variant="plain") for m in ("sum", "mean", "max")]
    + [dict(op="bag", mode="sum", psw=True, dtype="bfloat16", k=4, variant="plain")]
    + [dict(op="bag", mode="max", dtype="float32", k=4, variant="all", **FULL)]
    + [dict(op="embedding", training="fused_adagrad", dtype="float32", k=4, variant="plain")]
    + [dict(op="embedding", dtype="float32", k=4, variant="odd_dim", dim=33)]
    # Hot rows: the binary search over the hot ids in every lookup kernel.
    + [
        dict(op=op, mode=mode, dtype="float32", k=4, variant="hot", hot=True)
        for op, mode in (("embedding", None), ("bag", "sum"))
    ]
)


def bytes_per_id(kernel, dtype, k, dim, num_rows, batch):
    """``(moved, ideal)`` bytes per id of a kernel, modelled from what it
    reads and writes (int64 ids, float32 accumulators as the launchers use
    them); ``None`` for kernels whose traffic is per touched row."""
    s = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]
    acc = 8 if dtype == "float64" else 4
    if kernel == "_bloom_forward_kernel":
        ideal = 8 + k * dim * s + dim * s
        return ideal, ideal
    if kernel == "_bloom_backward_kernel":
        ideal = 8 + dim * s + k * dim * s * 2  # read the gradient, read-modify-write k rows
        # The launcher zeroes a float32 accumulator of the whole table and,
        # for half-precision tables, casts it once: per id, those passes
        # weigh num_rows / batch.
        whole_table = num_rows * dim * (acc + (acc + s if s != acc else 0))
        return 8 + dim * s + k * dim * acc * 2 + whole_table / batch, ideal
    return None


def label(case):
    parts = [case["op"] + (f"[{case['mode']}]" if case.get("mode") else ""), case["dtype"], f"k={case['k']}"]
    if case.get("psw"):
        parts.append("psw")
    if case.get("training"):
        parts.append(case["training"])
    if case["variant"] != "plain":
        parts.append(case["variant"] if case["variant"] != "odd_dim" else f"dim={case['dim']}")
    return " ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--out", default=None, help="Markdown file (default bench/results/kernels_sm<target>.md)")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "bench", "results", f"kernels_sm{args.target}.md")

    import torch
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        launches = aot.record_in_interpreter(list(CASES))
        results, stats = aot.compile_all(launches, (args.target,), args.jobs, sweep=lambda case: False)
        # The whole search space, for the plain float32 lookup.
        plain = [e for e in launches if e["case"] == CASES[0] and len(e["configs"]) > 1]
        full, _ = aot.compile_all(plain, (args.target,), args.jobs, sweep=lambda case: True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "target": f"sm_{args.target}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
        "date": when,
        "note": "compiled ahead of time on a CPU host (no GPU); nothing here was run on a GPU",
    }
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "stats": stats, "results": results, "search_space": full}, f, indent=1)

    lines = [
        f"# Kernels compiled for sm_{args.target}",
        "",
        f"Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}, {when}. "
        "Compiled ahead of time on a CPU host with `bench/perf/kernel_report.py` (no GPU: registers, spills and "
        "instruction counts are the compiler's, no timing). Loads and reductions are static counts in the "
        "PTX; 16-byte loads are `ld.global.v4` of 32-bit words or `ld.global.v2` of 64-bit ones.",
        "",
        "## Every kernel at its first configuration",
        "",
        "| kernel | case | config | regs | stack | shared | 16-byte loads / loads | vector reds / reds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["kernel"], label(r["case"]))):
        c = r["config"]
        cfg = "x".join(str(v) for v in c["kwargs"].values()) + f" w{r.get('num_warps')}"
        loads16 = r.get("ld_global_16b")
        lines.append(
            f"| `{r['kernel']}` | {label(r['case'])} | {cfg} | {r.get('registers')} | {r.get('stack')} | "
            f"{r.get('shared')} | {loads16} / {r.get('ld_global')} | "
            f"{r.get('red_global_vector')} / {r.get('red_global', 0) + r.get('atom_global', 0)} |"
        )
    lines += [
        "",
        "## The autotuner's search space (forward and backward, float32, k=4)",
        "",
        "| kernel | BLOCK_N x BLOCK_D | warps | stages | regs | stack |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(
        full, key=lambda r: (r["kernel"], r["config"]["kwargs"]["BLOCK_N"] * r["config"]["kwargs"]["BLOCK_D"])
    ):
        kw = r["config"]["kwargs"]
        lines.append(
            f"| `{r['kernel']}` | {kw['BLOCK_N']} x {kw['BLOCK_D']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['stack']} |"
        )
    lines += [
        "",
        "## Bytes per id (modelled)",
        "",
        "What a kernel must move per id against the least any implementation must: the forward reads the id "
        "(8 bytes), its `k` rows and writes one vector, `8 + k·d·s + d·s`; the backward reads the id and the "
        "output gradient and read-modify-writes `k` rows. Our backward accumulates into a float32 table "
        "(atomics of half precision are emulated) that the launcher zeroes and, for half-precision tables, "
        "casts once: that whole-table traffic is divided by the batch. At d=64, k=4, 200,000 rows, "
        "batch 16,384 ids:",
        "",
        "| kernel | dtype | moved B/id | ideal B/id | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for kernel in ("_bloom_forward_kernel", "_bloom_backward_kernel"):
        for dtype in ("float32", "bfloat16"):
            moved, ideal = bytes_per_id(kernel, dtype, 4, 64, 200_000, 16_384)
            lines.append(f"| `{kernel}` | {dtype} | {moved:,.0f} | {ideal:,.0f} | {moved / ideal:.2f} |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
