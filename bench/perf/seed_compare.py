"""triton_bloom against Spotlight's BloomEmbedding on this machine.

Two comparisons, each timed in one process on the same ids, reported as ratios
(seed time / our time):

- ``embedding``: ``BloomEmbedding`` vs Spotlight's layer, forward and
  forward+backward, ids of shape ``(batch, seq)``;
- ``bag``: ``BloomEmbeddingBag(mode="sum")`` vs the seed-style path (index
  the hash cache, gather the ``(n, k, dim)`` rows, sum over ``k``, then pool
  each bag), ``batch`` bags of ``bag_length`` ids.

The two layers run in turns, one run each per pair (the order flips every
pair), so a change of load while the benchmark runs moves both sides of a
pair alike; the reported speedup is the median of the pair ratios, with its
quartiles.  Threads and the load average (before and after) are recorded.

Defaults: ``num_embeddings=1_000_000``, ``embedding_dim=64``, Spotlight's
``compression_ratio=0.2`` and ``k=4``, ids ``(4096, 8)``, bags ``4096 x 20``.

    python bench/perf/seed_compare.py [--out bench/results/seed_compare_cpu.json]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, BloomEmbeddingBag  # noqa: E402

LAYERS = ("seed", "triton_bloom")


def module_bytes(module):
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]  # the seed's cache
    return sum(t.numel() * t.element_size() for t in tensors)


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def once_ms(fn, sync):
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return (time.perf_counter() - start) * 1e3


def paired_ms(fns, repeats, warmup, sync):
    """``repeats`` pairs of one timed run of each of ``fns["seed"]`` and
    ``fns["triton_bloom"]``, the order flipped every pair; returns each
    layer's times, in pair order."""
    for _ in range(warmup):
        for name in LAYERS:
            fns[name]()
    times = {name: [] for name in LAYERS}
    for i in range(repeats):
        for name in LAYERS if i % 2 == 0 else LAYERS[::-1]:
            times[name].append(once_ms(fns[name], sync))
    return times


def quartiles(values):
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_layers(name, layers, ids, args, sync, step_no, steps):
    """Forward and forward+backward of the two layers ``name -> (module, fn)``,
    in pairs; prints a line before and after each measure."""

    def forward(fn):
        return lambda: fn(ids)

    def forward_backward(module, fn):
        def step():
            fn(ids).sum().backward()
            module.embeddings.weight.grad = None

        return step

    measures = {
        "forward": {layer: forward(fn) for layer, (module, fn) in layers.items()},
        "forward_backward": {layer: forward_backward(module, fn) for layer, (module, fn) in layers.items()},
    }
    result = {"times_ms": {}, "median_ms": {}, "pair_ratio": {}}
    for measure, fns in measures.items():
        step_no += 1
        print(f"[{step_no}/{steps}] {name} {measure}: {args.repeats} pairs ...", end=" ", flush=True)
        start = time.perf_counter()
        times = paired_ms(fns, args.repeats, args.warmup, sync)
        pair = [s / o for s, o in zip(times["seed"], times["triton_bloom"])]
        q1, median, q3 = quartiles(pair)
        result["times_ms"][measure] = times
        result["median_ms"][measure] = {layer: statistics.median(t) for layer, t in times.items()}
        result["pair_ratio"][measure] = {"median": median, "q1": q1, "q3": q3}
        print(
            f"{time.perf_counter() - start:.1f} s, seed / ours {median:.2f}x (quartiles {q1:.2f}-{q3:.2f}), "
            f"load {load_average()[0]:.2f}",
            flush=True,
        )
    result["module_bytes"] = {layer: module_bytes(module) for layer, (module, _) in layers.items()}
    return result, step_no


def run(args, device):
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    seed = SpotlightBloomEmbedding(args.num_embeddings, args.embedding_dim, args.ratio, args.k).to(device)
    ours = BloomEmbedding(args.num_embeddings, args.embedding_dim, args.ratio, args.k).to(device)
    ours.load_state_dict(seed.state_dict())
    ids = torch.randint(0, args.num_embeddings, (args.batch, args.seq), device=device)
    # Same outputs, or the timing would compare different functions.
    torch.testing.assert_close(ours(ids), seed(ids), atol=1e-5, rtol=1e-5)

    # Bags: Spotlight's padding id 0 is left out of our pooling too.
    bag = BloomEmbeddingBag(args.num_embeddings, args.embedding_dim, args.ratio, args.k, mode="sum", padding_idx=0)
    bag.load_state_dict(seed.state_dict())
    bag.to(device)
    bags = torch.randint(0, args.num_embeddings, (args.batch, args.bag_length), device=device)

    def seed_bags(b):
        return seed(b).sum(1)

    torch.testing.assert_close(bag(bags), seed_bags(bags), atol=1e-4, rtol=1e-5)
    embedding, step_no = time_layers(
        "embedding", {"seed": (seed, seed), "triton_bloom": (ours, ours)}, ids, args, sync, 0, 4
    )
    bags_result, _ = time_layers(
        "bag", {"seed": (seed, seed_bags), "triton_bloom": (bag, bag)}, bags, args, sync, step_no, 4
    )
    return {"embedding": embedding, "bag": bags_result}


def summarise(result):
    """The recorded ratios: medians of the pair ratios, and the memory ratio."""
    pair, size = result["pair_ratio"], result["module_bytes"]
    return {
        "forward_speedup": pair["forward"]["median"],
        "forward_backward_speedup": pair["forward_backward"]["median"],
        "memory_ratio": size["seed"] / size["triton_bloom"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-embeddings", type=int, default=1_000_000)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--bag-length", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=30, help="timed pairs per measure")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each layer first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (quartiles of the pair ratios), got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    config["command"] = "python bench/perf/seed_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = environment()
    hardware = env["cpu"] if device.type == "cpu" else env.get("gpu")
    load_before = load_average()
    print(f"triton_bloom vs Spotlight's BloomEmbedding on {device} ({hardware})")
    print(
        f"num_embeddings={args.num_embeddings:,} embedding_dim={args.embedding_dim} k={args.k} ratio={args.ratio}; "
        f"{torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs; load average {load_before}"
    )
    print(f"{args.repeats} pairs per measure, the two layers in turns\n", flush=True)
    start = time.perf_counter()
    results = run(args, device)
    wall_s = time.perf_counter() - start
    load_after = load_average()
    summary = {name: summarise(r) for name, r in results.items()}
    shapes = {"embedding": f"ids ({args.batch}, {args.seq})", "bag": f"{args.batch} bags of {args.bag_length} ids, sum"}
    for name, result in results.items():
        print(f"\n{name}: {shapes[name]}\n")
        med, size = result["median_ms"], result["module_bytes"]
        rows = [
            [
                layer,
                f"{med['forward'][layer]:.2f}",
                f"{med['forward_backward'][layer]:.2f}",
                f"{size[layer] / 2**20:.1f}",
            ]
            for layer in LAYERS
        ]
        s = summary[name]
        rows.append(
            [
                "seed / ours, pairs",
                f"{s['forward_speedup']:.2f}x",
                f"{s['forward_backward_speedup']:.2f}x",
                f"{s['memory_ratio']:.2f}x",
            ]
        )
        print(markdown_table(["layer", "forward ms", "fwd+bwd ms", "module MiB"], rows))
    print(f"\n{wall_s:.0f} s; load average {load_before} before, {load_after} after")
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "seed_compare",
                "device": str(device),
                "environment": env,
                "config": config,
                "threads": torch.get_num_threads(),
                "load_average": {"before": load_before, "after": load_after},
                "wall_s": wall_s,
                "method": "the two layers timed in turns, one run each per pair, the order flipped every pair; "
                "speedups are the median of the pair ratios (seed ms / triton_bloom ms), quartiles in pair_ratio",
                "results": results,
                "ratios": summary,
            },
        )
        print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
