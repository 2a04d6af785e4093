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
memory, which ``tracemalloc`` does not see).  Time: one more process runs
the two methods in turn (ours, baseline, ours, ...) after a warm-up run of
each, so that a change in the machine's load hits both alike; the ratio is
the median of the per-pair ratios, the times the medians of each method's.

    python bench/output.py                  # writes bench/results/output_cpu.{json,md}
    python bench/output.py --device cuda    # the kernels: bench/results/output_cuda.{json,md}
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


def _setup(task, queries, device):
    torch.manual_seed(0)
    # The PyTorch path on CPU, the kernels on CUDA.
    backend = "torch" if device == "cpu" else "triton"
    if task == "topk":
        emb = BloomEmbedding(TOPK_IDS, DIM, RATIO, K_HASH, padding_idx=None, backend=backend, device=device)
        q = torch.randn(queries, DIM, device=device)
        return emb, q, None
    emb = BloomEmbedding(LOSS_IDS, DIM, RATIO, K_HASH, padding_idx=None, backend=backend, device=device)
    hidden = torch.randn(LOSS_BATCH, DIM, requires_grad=True, device=device)
    targets = torch.randint(0, LOSS_IDS, (LOSS_BATCH,), device=device)
    return emb, hidden, targets


def _method(name, emb, x, targets):
    if name == "bloom_topk":
        return lambda: emb.topk(x, TOP)

    def materialise_topk():
        with torch.no_grad():
            vectors = emb(torch.arange(emb.num_embeddings, device=x.device))
            return (x @ vectors.T).topk(TOP, dim=1)

    def fused_loss():
        x.grad = emb.weight.grad = None
        bloom_cross_entropy(x, targets, emb).backward()

    def materialised_loss():
        x.grad = emb.weight.grad = None
        logits = x @ emb(torch.arange(emb.num_embeddings, device=x.device)).T
        F.cross_entropy(logits, targets).backward()

    return {"materialise_topk": materialise_topk, "fused_loss": fused_loss,
            "materialised_loss": materialised_loss}[name]  # fmt: skip


def _ms(fn, device):
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def memory_worker(task, name, queries, device):
    """Runs in its own process: the peak memory of one run (on CUDA, the
    caching allocator's peak above what was allocated before)."""
    emb, x, targets = _setup(task, queries, device)
    fn = _method(name, emb, x, targets)
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        first_ms = _ms(fn, device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        first_ms = _ms(fn, device)
        peak = _status("VmHWM") - before
    print(json.dumps({"peak_bytes": peak, "first_ms": first_ms}))


def time_worker(task, ours, baseline, queries, repeats, device):
    """Runs in its own process: the two methods timed in turn."""
    emb, x, targets = _setup(task, queries, device)
    mine, base = _method(ours, emb, x, targets), _method(baseline, emb, x, targets)
    mine(), base()  # warm-up (and on CUDA the kernels' compilation)
    pairs = [(_ms(mine, device), _ms(base, device)) for _ in range(repeats)]
    print(json.dumps({"runs_ms": [a for a, _ in pairs], "baseline_runs_ms": [b for _, b in pairs],
                      "ratio": statistics.median(a / b for a, b in pairs)}))  # fmt: skip


def _run(*args):
    cmd = [sys.executable, os.path.abspath(__file__), *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs of runs (ours, baseline) per task")
    parser.add_argument("--device", default="cpu", help="cpu (the PyTorch path) or cuda (the kernels)")
    parser.add_argument("--out", help="the JSON to write (a markdown summary beside it); default "
                        "bench/results/output_<cpu|cuda>.json")  # fmt: skip
    args = parser.parse_args()
    if args.memory_worker:
        task, name, queries, device = args.memory_worker
        return memory_worker(task, name, int(queries), device)
    if args.time_worker:
        task, ours, baseline, queries, repeats, device = args.time_worker
        return time_worker(task, ours, baseline, int(queries), int(repeats), device)
    device = args.device

    rows = []
    plan = [("topk", 16, "bloom_topk", "materialise_topk"), ("topk", 1024, "bloom_topk", "materialise_topk"),
            ("loss", LOSS_BATCH, "fused_loss", "materialised_loss")]  # fmt: skip
    for task, queries, ours, baseline in plan:
        mine = _run("--memory-worker", task, ours, queries, device)
        base = _run("--memory-worker", task, baseline, queries, device)
        timed = _run("--time-worker", task, ours, baseline, queries, args.repeats, device)
        memory_target, time_target = TARGETS[task]
        memory_ratio = mine["peak_bytes"] / base["peak_bytes"]
        time_ratio = timed["ratio"]
        mine["ms"], base["ms"] = statistics.median(timed["runs_ms"]), statistics.median(timed["baseline_runs_ms"])
        rows.append({
            "task": task, "queries": queries, "method": ours, "baseline": baseline,
            "ms": mine["ms"], "baseline_ms": base["ms"], "runs_ms": timed["runs_ms"],
            "baseline_runs_ms": timed["baseline_runs_ms"], "load_average": os.getloadavg(),
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
        "device": device,
        "setup": {"topk": f"{TOPK_IDS} ids, dim {DIM}, ratio {RATIO}, k {K_HASH}, top-{TOP}",
                  "loss": f"{LOSS_BATCH} hidden states, {LOSS_IDS} ids, dim {DIM}, ratio {RATIO}, k {K_HASH}, "
                          "forward + backward",
                  "memory": ("VmHWM after one run minus VmRSS before it" if device == "cpu" else
                             "torch.cuda.max_memory_allocated after one run minus memory_allocated before it")
                            + ", fresh process per method",
                  "time": f"{args.repeats} pairs of runs in turn (ours, baseline) after a warm-up of each, "
                          "one process; ratio: median of the pairs' ratios"},
        "results": rows,
    }  # fmt: skip
    out = args.out or os.path.join(RESULTS, f"output_{'cpu' if device == 'cpu' else 'cuda'}.json")
    write_json(out, payload)
    env = payload["environment"]
    table = markdown_table(
        ["task", "queries", "ours ms", "baseline ms", "time ratio (target)", "ours peak MiB", "baseline peak MiB",
         "memory ratio (target)", "met"],
        [[r["task"], r["queries"], f"{r['ms']:.0f}", f"{r['baseline_ms']:.0f}",
          f"{r['time_ratio']:.2f}x (<= {r['time_target']}x)", f"{r['peak_mib']:.1f}", f"{r['baseline_peak_mib']:.1f}",
          f"{r['memory_ratio']:.3f} (<= {r['memory_target']})", "yes" if r["met"] else "no"] for r in rows],
    )  # fmt: skip
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        where = "CPU (the PyTorch path)" if device == "cpu" else f"{torch.cuda.get_device_name()} (the Triton kernels)"
        f.write(f"# Output side on {where}: top-k and fused cross-entropy vs materialising every vector\n\n")
        f.write(f"{env['date']}, {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
                f"Python {env['python']}, torch {env['torch']}, triton {env['triton']}, {env['platform']}.\n\n")  # fmt: skip
        f.write(f"- top-k: {payload['setup']['topk']}; baseline: `emb(arange(N))` + matmul + `topk`.\n")
        f.write(f"- loss: {payload['setup']['loss']}; baseline: materialised logits + `F.cross_entropy`.\n")
        f.write(f"- peak memory: {payload['setup']['memory']}; time: {payload['setup']['time']}.\n\n")
        f.write(table + "\n\n")
        f.write("Load average (1, 5, 15 min) as each task ended: "
                + "; ".join(f"{r['task']} Q={r['queries']}: " + ", ".join(f"{v:.1f}" for v in r["load_average"])
                            for r in rows) + ".\n")  # fmt: skip


if __name__ == "__main__":
    main()
