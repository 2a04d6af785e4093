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

    python bench/perf/output.py                  # writes bench/results/output_cpu.{json,md}
    python bench/perf/output.py --device cuda    # the kernels: bench/results/output_cuda.{json,md}
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.common import environment, markdown_table, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, bloom_cross_entropy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
DIM, RATIO, K_HASH, TOP = 64, 0.2, 4, 10
TARGETS = {"topk": (0.1, 1.1), "loss": (0.25, 1.2)}


def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _setup(task, num_ids, queries, device):
    """The table and the inputs: ``queries`` random queries for top-k, or
    ``queries`` hidden states and targets for the loss."""
    torch.manual_seed(0)
    # The PyTorch path on CPU, the kernels on CUDA.
    backend = "torch" if device == "cpu" else "triton"
    emb = BloomEmbedding(num_ids, DIM, RATIO, K_HASH, padding_idx=None, backend=backend, device=device)
    if task == "topk":
        return emb, torch.randn(queries, DIM, device=device), None
    hidden = torch.randn(queries, DIM, requires_grad=True, device=device)
    return emb, hidden, torch.randint(0, num_ids, (queries,), device=device)


def _method(name, emb, x, targets):
    """A function running ``name`` once and returning what it computed:
    ``(scores, ids)`` of the top-k, or ``(loss, grad of x, grad of the table)``."""

    def bloom_topk():
        top = emb.topk(x, TOP)
        return top.scores, top.ids

    def materialise_topk():
        with torch.no_grad():
            vectors = emb(torch.arange(emb.num_embeddings, device=x.device))
            top = (x @ vectors.T).topk(TOP, dim=1)
            return top.values, top.indices

    def fused_loss():
        x.grad = emb.weight.grad = None
        loss = bloom_cross_entropy(x, targets, emb)
        loss.backward()
        return loss.detach(), x.grad, emb.weight.grad

    def materialised_loss():
        x.grad = emb.weight.grad = None
        loss = F.cross_entropy(x @ emb(torch.arange(emb.num_embeddings, device=x.device)).T, targets)
        loss.backward()
        return loss.detach(), x.grad, emb.weight.grad

    return {
        "bloom_topk": bloom_topk,
        "materialise_topk": materialise_topk,
        "fused_loss": fused_loss,
        "materialised_loss": materialised_loss,
    }[name]


def _agree(task, mine, base):
    """Whether the two methods computed the same thing: the same top-k ids
    (the scores to float32 rounding), or the same loss and gradients."""
    if task == "topk":
        return bool(torch.equal(mine[1], base[1]) and torch.allclose(mine[0], base[0], rtol=1e-5, atol=1e-5))
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(mine, base))


def _ms(fn, device):
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def memory_worker(task, name, num_ids, queries, device):
    """Runs in its own process: the peak memory of one run (on CUDA, the
    caching allocator's peak above what was allocated before)."""
    emb, x, targets = _setup(task, num_ids, queries, device)
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


def time_worker(task, ours, baseline, num_ids, queries, repeats, device):
    """Runs in its own process: the two methods checked against each other,
    then timed in turn."""
    emb, x, targets = _setup(task, num_ids, queries, device)
    mine, base = _method(ours, emb, x, targets), _method(baseline, emb, x, targets)
    # Warm-up (on CUDA the kernels' compilation) and the check; a result is
    # cloned because the next run clears the gradients it holds.
    agree = _agree(task, [t.clone() for t in mine()], [t.clone() for t in base()])
    pairs = [(_ms(mine, device), _ms(base, device)) for _ in range(repeats)]
    print(
        json.dumps(
            {
                "runs_ms": [a for a, _ in pairs],
                "baseline_runs_ms": [b for _, b in pairs],
                "ratio": statistics.median(a / b for a, b in pairs),
                "agree": agree,
            }
        )
    )


def _run(*args):
    cmd = [sys.executable, os.path.abspath(__file__), *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs of runs (ours, baseline) per task")
    parser.add_argument("--device", default="cpu", help="cpu (the PyTorch path) or cuda (the kernels)")
    parser.add_argument("--topk-ids", type=int, default=1_000_000, help="catalogue of the top-k (default 1M)")
    parser.add_argument("--queries", type=int, nargs="+", default=[16, 1024], help="top-k queries (default 16 1024)")
    parser.add_argument("--loss-ids", type=int, default=100_000, help="catalogue of the loss (default 100k)")
    parser.add_argument("--loss-batch", type=int, default=4096, help="hidden states of the loss (default 4096)")
    parser.add_argument(
        "--out", help="the JSON to write (a markdown summary beside it); default bench/results/output_<cpu|cuda>.json"
    )
    args = parser.parse_args(argv)
    if args.memory_worker:
        task, name, num_ids, queries, device = args.memory_worker
        return memory_worker(task, name, int(num_ids), int(queries), device)
    if args.time_worker:
        task, ours, baseline, num_ids, queries, repeats, device = args.time_worker
        return time_worker(task, ours, baseline, int(num_ids), int(queries), int(repeats), device)
    device = args.device

    rows = []
    plan = [("topk", args.topk_ids, q, "bloom_topk", "materialise_topk") for q in args.queries]
    plan.append(("loss", args.loss_ids, args.loss_batch, "fused_loss", "materialised_loss"))
    for task, num_ids, queries, ours, baseline in plan:
        mine = _run("--memory-worker", task, ours, num_ids, queries, device)
        base = _run("--memory-worker", task, baseline, num_ids, queries, device)
        timed = _run("--time-worker", task, ours, baseline, num_ids, queries, args.repeats, device)
        memory_target, time_target = TARGETS[task]
        memory_ratio = mine["peak_bytes"] / max(base["peak_bytes"], 1)
        time_ratio = timed["ratio"]
        mine["ms"], base["ms"] = statistics.median(timed["runs_ms"]), statistics.median(timed["baseline_runs_ms"])
        rows.append(
            {
                "task": task,
                "num_ids": num_ids,
                "queries": queries,
                "method": ours,
                "baseline": baseline,
                "agree": timed["agree"],
                "ms": mine["ms"],
                "baseline_ms": base["ms"],
                "runs_ms": timed["runs_ms"],
                "baseline_runs_ms": timed["baseline_runs_ms"],
                "load_average": os.getloadavg(),
                "peak_mib": mine["peak_bytes"] / 2**20,
                "baseline_peak_mib": base["peak_bytes"] / 2**20,
                "memory_ratio": memory_ratio,
                "time_ratio": time_ratio,
                "memory_target": memory_target,
                "time_target": time_target,
                "met": timed["agree"] and memory_ratio <= memory_target and time_ratio <= time_target,
            }
        )
        print(
            f"{task} ids={num_ids} Q={queries}: same result {timed['agree']}, {time_ratio:.2f}x the baseline's "
            f"time, {memory_ratio:.3f} of its peak memory",
            flush=True,
        )
    payload = {
        "environment": environment(),
        "device": device,
        "setup": {
            "topk": f"{args.topk_ids} ids, dim {DIM}, ratio {RATIO}, k {K_HASH}, top-{TOP}",
            "loss": f"{args.loss_batch} hidden states, {args.loss_ids} ids, dim {DIM}, ratio {RATIO}, "
            f"k {K_HASH}, "
            "forward + backward",
            "memory": (
                "VmHWM after one run minus VmRSS before it"
                if device == "cpu"
                else "torch.cuda.max_memory_allocated after one run minus memory_allocated before it"
            )
            + ", fresh process per method",
            "time": f"{args.repeats} pairs of runs in turn (ours, baseline) after a warm-up of each, "
            "one process; ratio: median of the pairs' ratios",
        },
        "results": rows,
    }
    out = args.out or os.path.join(RESULTS, f"output_{'cpu' if device == 'cpu' else 'cuda'}.json")
    write_json(out, payload)
    env = payload["environment"]
    table = markdown_table(
        [
            "task",
            "ids",
            "queries",
            "same result",
            "ours ms",
            "baseline ms",
            "time ratio (target)",
            "ours peak MiB",
            "baseline peak MiB",
            "memory ratio (target)",
            "met",
        ],
        [
            [
                r["task"],
                f"{r['num_ids']:,}",
                r["queries"],
                "yes" if r["agree"] else "NO",
                f"{r['ms']:.0f}",
                f"{r['baseline_ms']:.0f}",
                f"{r['time_ratio']:.2f}x (<= {r['time_target']}x)",
                f"{r['peak_mib']:.1f}",
                f"{r['baseline_peak_mib']:.1f}",
                f"{r['memory_ratio']:.3f} (<= {r['memory_target']})",
                "yes" if r["met"] else "no",
            ]
            for r in rows
        ],
    )
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        where = "CPU (the PyTorch path)" if device == "cpu" else f"{torch.cuda.get_device_name()} (the Triton kernels)"
        f.write(f"# Output side on {where}: top-k and fused cross-entropy vs materialising every vector\n\n")
        f.write(
            f"{env['date']}, {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
            f"Python {env['python']}, torch {env['torch']}, triton {env['triton']}, {env['platform']}.\n\n"
        )
        f.write(f"- top-k: {payload['setup']['topk']}; baseline: `emb(arange(N))` + matmul + `topk`.\n")
        f.write(f"- loss: {payload['setup']['loss']}; baseline: materialised logits + `F.cross_entropy`.\n")
        f.write(f"- peak memory: {payload['setup']['memory']}; time: {payload['setup']['time']}.\n\n")
        f.write(table + "\n\n")
        f.write(
            "Load average (1, 5, 15 min) as each task ended: "
            + "; ".join(
                f"{r['task']} Q={r['queries']}: " + ", ".join(f"{v:.1f}" for v in r["load_average"]) for r in rows
            )
            + ".\n"
        )
    return payload


if __name__ == "__main__":
    main()
