"""The CPU path against its floor and against Spotlight's layer, part by part.

For ids of shape ``(batch, 8)`` at each thread count, in one process:

- **parts** (median times): hashing the ids (the compiled loop, and the
  PyTorch-ops fallback), the gather and sum we must do (``embedding_bag``
  over the precomputed rows: the *floor*), ``index_select`` of the same rows
  (the bare gather), the gradient allocation (a fresh ``torch.zeros`` of the
  table against zeroing memory already mapped), and the scatter
  (``index_add_`` of the output gradient into the ``k`` rows);
- **pairs**: our ``BloomEmbedding`` against Spotlight's layer
  (``bench.baselines.SpotlightBloomEmbedding``), and our forward against the
  floor, timed alternately (the order flips every pair), so a change of load
  moves both sides of a pair alike; each ratio is the median of the pair
  ratios (other / ours: above 1 means ours is faster), with its quartiles;
- the load average before and after each size.

Forward+backward is ``zero_grad(set_to_none=True)``, the forward, and
``backward`` of a fixed random output gradient, as an optimizer loop does.

Defaults as in issue 21: 1M ids, dim 64, ratio 0.2, k 4, float32; batches
256, 1024, 4096, 16384; 1 and 2 threads.

    python bench/perf/cpu_floor.py [--out bench/results/cpu_floor_cpu.json] [--quick]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, BloomEmbeddingBag, native  # noqa: E402
from triton_bloom.hashing import hash_rows, hash_rows_torch  # noqa: E402
from triton_bloom.reference import bloom_row_gradients_reference  # noqa: E402


def median_us(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def pair_ratios(other, ours, pairs, warmup=2):
    """Median, quartiles of ``time(other) / time(ours)`` over alternated pairs,
    and each side's median time in microseconds."""
    for _ in range(warmup):
        other()
        ours()
    ratios, t_other, t_ours = [], [], []
    for i in range(pairs):
        order = (other, ours) if i % 2 == 0 else (ours, other)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
        ratios.append(times[other] / times[ours])
        t_other.append(times[other])
        t_ours.append(times[ours])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "ratio": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "other_us": statistics.median(t_other) * 1e6,
        "ours_us": statistics.median(t_ours) * 1e6,
    }


def train_step(module, ids, grad_out):
    def step():
        module.zero_grad(set_to_none=True)
        out = module(ids).view_as(grad_out)
        out.backward(grad_out)

    return step


def measure(batch, threads, ours, seed, args):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, args.num_embeddings, (batch, 8), generator=g)
    grad_out = torch.randn(batch, 8, args.dim, generator=g)
    weight = ours.weight.detach()
    k, num_rows = args.k, ours.num_rows
    rows = hash_rows(ids, k, num_rows).reshape(-1, k)
    flat_rows = rows.reshape(-1)
    scatter_rows = rows.to(torch.int64)
    flat_grad = grad_out.reshape(-1, args.dim)
    buffer = torch.zeros_like(weight)
    small = batch <= 1024
    reps = args.repeats * (4 if small else 1)
    pairs = args.pairs * (2 if small else 1)
    load_before = os.getloadavg()[0]

    def scatter():
        for j in range(k):
            buffer.index_add_(0, scatter_rows[:, j], flat_grad)

    sources = torch.arange(rows.shape[0])

    parts = {
        "hash_native_us": median_us(lambda: hash_rows(ids, k, num_rows), reps) if native.available() else None,
        "hash_torch_us": median_us(lambda: hash_rows_torch(ids, k, num_rows), reps),
        "embedding_bag_us": median_us(lambda: F.embedding_bag(rows, weight, mode="sum"), reps),
        "index_select_us": median_us(lambda: weight.index_select(0, flat_rows), reps),
        "forward_us": median_us(lambda: ours(ids), reps),
        "zeros_fresh_us": median_us(lambda: torch.zeros_like(weight), max(3, reps // 4)),
        "zero_mapped_us": median_us(lambda: buffer.zero_(), max(3, reps // 4)),
        "zero_memset_us": median_us(lambda: native.zero(buffer), max(3, reps // 4)),
        "scatter_us": median_us(scatter, max(3, reps // 4)),
        "scatter_native_us": median_us(lambda: native.scatter_add(buffer, rows, flat_grad), max(3, reps // 4)),
        "sparse_rows_us": median_us(
            lambda: bloom_row_gradients_reference(scatter_rows, sources, flat_grad), max(3, reps // 4)
        ),
    }
    hashing = parts["hash_native_us"] or parts["hash_torch_us"]
    parts["overhead_us"] = parts["forward_us"] - hashing - parts["embedding_bag_us"]
    result = {
        "batch": batch,
        "ids": batch * 8,
        "threads": threads,
        "parts": parts,
        "forward_vs_floor": pair_ratios(lambda: F.embedding_bag(rows, weight, mode="sum"), lambda: ours(ids), pairs),
        "forward_vs_seed": pair_ratios(lambda: seed(ids), lambda: ours(ids), pairs),
        "train_vs_seed": pair_ratios(
            train_step(seed, ids, grad_out), train_step(ours, ids, grad_out), max(5, pairs // 2)
        ),
    }
    result["load"] = [load_before, os.getloadavg()[0]]
    return result


def two_tower_step(threads, pairs):
    """The main job's training step at its own sizes (a mean-pooled history
    of 16 items, positive and negative items, per-item biases, BPR loss,
    Adam; 10,000 items, dim 32, batch 2048): Bloom tables (ratio 0.2, k 4)
    against full ``nn.EmbeddingBag`` / ``nn.Embedding`` tables, alternated
    pairs; ``ratio`` is Bloom's time over the full tables' (above 1: Bloom slower)."""
    torch.set_num_threads(threads)
    items, dim, batch, length = 10_000, 32, 2048, 16

    def model(bloom):
        torch.manual_seed(0)
        if bloom:
            common = dict(compression_ratio=0.2, num_hash_functions=4, padding_idx=None)
            history, table = BloomEmbeddingBag(items, dim, mode="mean", **common), BloomEmbedding(items, dim, **common)
        else:
            history, table = torch.nn.EmbeddingBag(items, dim, mode="mean"), torch.nn.Embedding(items, dim)
        layers = torch.nn.ModuleList([history, table, torch.nn.Embedding(items, 1)])
        return layers, torch.optim.Adam(layers.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    history_ids = torch.randint(0, items, (batch, length), generator=g)
    positives, negatives = torch.randint(0, items, (2, batch), generator=g)

    def step(layers, optimizer):
        history, table, bias = layers
        users = history(history_ids)
        margin = (users * (table(positives) - table(negatives))).sum(-1)
        margin = margin + bias(positives).squeeze(-1) - bias(negatives).squeeze(-1)
        loss = -F.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    full, bloom = model(False), model(True)
    result = pair_ratios(lambda: step(*bloom), lambda: step(*full), pairs, warmup=3)
    result = {"bloom_over_full": result["ratio"], "q1": result["q1"], "q3": result["q3"]}
    return {**result, "threads": threads, "load": os.getloadavg()[0]}


ALLOCATORS = {
    "default": {},
    # glibc: serve large blocks from the heap and keep them after free.
    "MALLOC_MMAP_THRESHOLD_=2**30": {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)},
    # PyTorch's CPU allocator: 2 MB transparent huge pages for large blocks.
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
}

_ALLOCATION = """
import statistics, time, torch
torch.set_num_threads(1)
times = []
for _ in range(12):
    start = time.perf_counter()
    torch.zeros({rows}, {dim})
    times.append(time.perf_counter() - start)
print(statistics.median(times[2:]) * 1e6)
"""


def allocator_settings(num_rows, dim):
    """Median µs of a fresh table-sized ``torch.zeros`` (freed each time, as
    a training step frees its gradient) under each allocator setting, each
    in its own process (the settings are read at start)."""
    out = {}
    for name, env in ALLOCATORS.items():
        code = _ALLOCATION.format(rows=num_rows, dim=dim)
        done = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        out[name] = float(done.stdout.strip())
    return out


def report(payload):
    env = payload["environment"]
    lines = [
        "# CPU path: floor and Spotlight (issue 21)",
        "",
        f"{env['date']} · {env['cpu']} ({env['cpu_count']} cores) · torch {env['torch']} · triton {env['triton']} · "
        f"compiled hash loop: {payload['native']}",
        "",
        f"{payload['config']}. Ratios are medians of alternated pair ratios (other time / our time; "
        "above 1: ours faster), quartiles in brackets. Load: 1-minute load average before / after the size.",
        "",
    ]
    rows = []
    for r in payload["results"]:

        def fmt(x):
            return f"{x['ratio']:.2f} [{x['q1']:.2f}, {x['q3']:.2f}]"

        rows.append(
            [
                f"{r['batch']} x 8",
                r["threads"],
                fmt(r["forward_vs_seed"]),
                fmt(r["train_vs_seed"]),
                fmt(r["forward_vs_floor"]),
                f"{r['forward_vs_seed']['ours_us']:.0f} / {r['forward_vs_seed']['other_us']:.0f}",
                f"{r['train_vs_seed']['ours_us']:.0f} / {r['train_vs_seed']['other_us']:.0f}",
                f"{r['load'][0]:.1f} / {r['load'][1]:.1f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "ids",
                "threads",
                "forward: Spotlight / ours",
                "fwd+bwd: Spotlight / ours",
                "forward: floor / ours",
                "forward µs ours / Spotlight",
                "fwd+bwd µs ours / Spotlight",
                "load",
            ],
            rows,
        )
    )
    lines += ["", "Parts (median µs, each timed alone in the same run):", ""]
    part_rows = []
    for r in payload["results"]:
        p = r["parts"]
        native_us = "-" if p["hash_native_us"] is None else f"{p['hash_native_us']:.0f}"
        part_rows.append(
            [
                f"{r['batch']} x 8",
                r["threads"],
                native_us,
                f"{p['hash_torch_us']:.0f}",
                f"{p['embedding_bag_us']:.0f}",
                f"{p['index_select_us']:.0f}",
                f"{p['forward_us']:.0f}",
                f"{p['overhead_us']:.0f}",
                f"{p['zeros_fresh_us']:.0f}",
                f"{p['zero_mapped_us']:.0f}",
                f"{p['zero_memset_us']:.0f}",
                f"{p['scatter_us']:.0f}",
                f"{p['scatter_native_us']:.0f}",
                f"{p['sparse_rows_us']:.0f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "ids",
                "threads",
                "hash (compiled)",
                "hash (torch ops)",
                "floor: embedding_bag",
                "index_select",
                "our forward",
                "overhead",
                "fresh zeros (grad)",
                "zero_ mapped",
                "memset mapped (1 thread)",
                "scatter: index_add_ x k",
                "scatter: compiled (1 thread)",
                "sparse: touched rows",
            ],
            part_rows,
        )
    )
    lines += ["", "The main job's training step (two-tower BPR, 10,000 items, dim 32, batch 2048, Adam):"]
    for m in payload["main_job_step"]:
        lines.append(
            f"- {m['threads']} thread(s): Bloom tables (ratio 0.2, k 4) take {m['bloom_over_full']:.2f}x "
            f"[{m['q1']:.2f}, {m['q3']:.2f}] the full tables' step time (load {m['load']:.1f})"
        )
    lines += [
        "",
        "A fresh table-sized `torch.zeros` (freed after each use, as a step frees its gradient), "
        "one thread, per allocator setting (µs): "
        + ", ".join(f"{name}: {us:.0f}" for name, us in payload["allocator_settings_us"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-embeddings", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON path; the markdown report goes beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_embeddings, args.batches, args.repeats, args.pairs = 20_000, [32, 256], 3, 3
    torch.manual_seed(0)
    ours = BloomEmbedding(args.num_embeddings, args.dim, args.ratio, args.k)
    seed = SpotlightBloomEmbedding(args.num_embeddings, args.dim, args.ratio, args.k)
    results = []
    for threads in args.threads:
        for batch in args.batches:
            results.append(measure(batch, threads, ours, seed, args))
            r = results[-1]
            print(
                f"{batch}x8 threads={threads}: forward {r['forward_vs_seed']['ratio']:.2f}x Spotlight, "
                f"fwd+bwd {r['train_vs_seed']['ratio']:.2f}x, floor/ours {r['forward_vs_floor']['ratio']:.2f}, "
                f"load {r['load']}",
                flush=True,
            )
    allocation = allocator_settings(ours.num_rows, args.dim)
    main_job = [two_tower_step(threads, 4 if args.quick else 41) for threads in args.threads]
    payload = {
        "allocator_settings_us": allocation,
        "main_job_step": main_job,
        "environment": environment(),
        "native": native.available(),
        "config": (
            f"num_embeddings={args.num_embeddings}, dim={args.dim}, ratio={args.ratio}, k={args.k}, float32, "
            f"ids (batch, 8)"
        ),
        "results": results,
    }
    if args.out:
        write_json(args.out, payload)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(report(payload))
    else:
        print(report(payload))
    return payload


if __name__ == "__main__":
    main()
