"""The output side against materialising every vector, on this machine.

- Top-10 for 16 and 1024 queries over 1M ids (dim 64, ratio 0.2, k 4):
  ``BloomEmbedding.topk`` against ``emb(arange(N))`` + matmul + ``topk``.
- Cross-entropy over 100k ids for 4096 hidden states (dim 64), forward and
  backward: ``bloom_cross_entropy`` against materialised logits +
  ``F.cross_entropy``.

Targets (issue 14): top-k at most 1/10 of the baseline's peak memory at no
more than 1.1x its time; the loss at most 1/4 of the peak memory at no more
than 1.2x the time.

Peak memory: each method runs in a fresh process.  After the set-up (module,
inputs) it reads its resident set (``VmRSS``), resets the kernel's peak
counter (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``, Linux
4.0+), runs the method once and reads ``VmHWM``: the difference is the most
memory the method held at any moment on top of what existed before it,
every allocator included (PyTorch's CPU tensors are plain ``malloc``/``mmap``
memory, which ``tracemalloc`` does not see).  Time: median of several runs
in the same process, after that first run.

    python bench/output.py            # writes bench/results/output_cpu.{json,md}
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, markdown_table, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, bloom_cross_entropy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOPK_IDS, LOSS_IDS, DIM, RATIO, K_HASH, TOP = 1_000_000, 100_000, 64, 0.2, 4, 10
LOSS_BATCH = 4096
TARGETS = {"topk": (0.1, 1.1), "loss": (0.25, 1.2)}


def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _setup(task, queries):
    torch.manual_seed(0)
    if task == "topk":
        emb = BloomEmbedding(TOPK_IDS, DIM, RATIO, K_HASH, padding_idx=None, backend="torch")
        q = torch.randn(queries, DIM)
        return emb, q, None
    emb = BloomEmbedding(LOSS_IDS, DIM, RATIO, K_HASH, padding_idx=None, backend="torch")
    hidden = torch.randn(LOSS_BATCH, DIM, requires_grad=True)
    targets = torch.randint(0, LOSS_IDS, (LOSS_BATCH,))
    return emb, hidden, targets


def _method(name, emb, x, targets):
    if name == "bloom_topk":
        return lambda: emb.topk(x, TOP)

    def materialise_topk():
        with torch.no_grad():
            vectors = emb(torch.arange(emb.num_embeddings))
            return (x @ vectors.T).topk(TOP, dim=1)

    def fused_loss():
        x.grad = emb.weight.grad = None
        bloom_cross_entropy(x, targets, emb).backward()

    def materialised_loss():
        x.grad = emb.weight.grad = None
        logits = x @ emb(torch.arange(emb.num_embeddings)).T
        F.cross_entropy(logits, targets).backward()

    return {"materialise_topk": materialise_topk, "fused_loss": fused_loss,
            "materialised_loss": materialised_loss}[name]  # fmt: skip


def worker(task, name, queries, repeats):
    """Runs in its own process: peak memory of one run, then timings."""
    emb, x, targets = _setup(task, queries)
    fn = _method(name, emb, x, targets)
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    fn()
    first_ms = (time.perf_counter() - start) * 1e3
    peak = _status("VmHWM") - before
    times = [first_ms]
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"peak_bytes": peak, "ms": statistics.median(times[1:] or times), "runs_ms": times}))


def measure(task, name, queries, repeats):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", task, name, str(queries), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("TASK", "METHOD", "QUERIES", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method after the first")
    args = parser.parse_args()
    if args.worker:
        task, name, queries, repeats = args.worker
        return worker(task, name, int(queries), int(repeats))

    rows = []
    plan = [("topk", 16, "bloom_topk", "materialise_topk"), ("topk", 1024, "bloom_topk", "materialise_topk"),
            ("loss", LOSS_BATCH, "fused_loss", "materialised_loss")]  # fmt: skip
    for task, queries, ours, baseline in plan:
        mine = measure(task, ours, queries, args.repeats)
        base = measure(task, baseline, queries, args.repeats)
        memory_target, time_target = TARGETS[task]
        memory_ratio = mine["peak_bytes"] / base["peak_bytes"]
        time_ratio = mine["ms"] / base["ms"]
        rows.append({
            "task": task, "queries": queries, "method": ours, "baseline": baseline,
            "ms": mine["ms"], "baseline_ms": base["ms"], "runs_ms": mine["runs_ms"], "baseline_runs_ms": base["runs_ms"],
            "peak_mib": mine["peak_bytes"] / 2**20, "baseline_peak_mib": base["peak_bytes"] / 2**20,
            "memory_ratio": memory_ratio, "time_ratio": time_ratio,
            "memory_target": memory_target, "time_target": time_target,
            "met": memory_ratio <= memory_target and time_ratio <= time_target,
        })  # fmt: skip
        print(f"{task} Q={queries}: {mine['ms']:.0f} ms vs {base['ms']:.0f} ms ({time_ratio:.2f}x), "
              f"peak {mine['peak_bytes'] / 2**20:.1f} MiB vs {base['peak_bytes'] / 2**20:.1f} MiB "
              f"({memory_ratio:.3f}x)", flush=True)  # fmt: skip
    payload = {
        "environment": environment(),
        "setup": {"topk": f"{TOPK_IDS} ids, dim {DIM}, ratio {RATIO}, k {K_HASH}, top-{TOP}",
                  "loss": f"{LOSS_BATCH} hidden states, {LOSS_IDS} ids, dim {DIM}, ratio {RATIO}, k {K_HASH}, "
                          "forward + backward",
                  "memory": "VmHWM after one run minus VmRSS before it, fresh process per method",
                  "time": f"median of {args.repeats} runs after the first"},
        "results": rows,
    }  # fmt: skip
    write_json(os.path.join(RESULTS, "output_cpu.json"), payload)
    env = payload["environment"]
    table = markdown_table(
        ["task", "queries", "ours ms", "baseline ms", "time ratio (target)", "ours peak MiB", "baseline peak MiB",
         "memory ratio (target)", "met"],
        [[r["task"], r["queries"], f"{r['ms']:.0f}", f"{r['baseline_ms']:.0f}",
          f"{r['time_ratio']:.2f}x (<= {r['time_target']}x)", f"{r['peak_mib']:.1f}", f"{r['baseline_peak_mib']:.1f}",
          f"{r['memory_ratio']:.3f} (<= {r['memory_target']})", "yes" if r["met"] else "no"] for r in rows],
    )  # fmt: skip
    with open(os.path.join(RESULTS, "output_cpu.md"), "w") as f:
        f.write("# Output side on CPU: top-k and fused cross-entropy vs materialising every vector\n\n")
        f.write(f"{env['date']}, {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
                f"Python {env['python']}, torch {env['torch']}, triton {env['triton']}, {env['platform']}.\n\n")  # fmt: skip
        f.write(f"- top-k: {payload['setup']['topk']}; baseline: `emb(arange(N))` + matmul + `topk`.\n")
        f.write(f"- loss: {payload['setup']['loss']}; baseline: materialised logits + `F.cross_entropy`.\n")
        f.write(f"- peak memory: {payload['setup']['memory']}; time: {payload['setup']['time']}.\n\n")
        f.write(table + "\n")


if __name__ == "__main__":
    main()
