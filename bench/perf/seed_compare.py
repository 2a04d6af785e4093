"""triton_bloom against Spotlight's BloomEmbedding on this machine.

Two comparisons, each timed in one run on the same ids, reported as ratios
(seed time / our time):

- ``embedding``: ``BloomEmbedding`` vs Spotlight's layer, forward and
  forward+backward, ids of shape ``(batch, seq)``;
- ``bag``: ``BloomEmbeddingBag(mode="sum")`` vs the seed-style path (index
  the hash cache, gather the ``(n, k, dim)`` rows, sum over ``k``, then pool
  each bag), ``batch`` bags of ``bag_length`` ids.

Defaults: ``num_embeddings=1_000_000``, ``embedding_dim=64``, Spotlight's
``compression_ratio=0.2`` and ``k=4``, ids ``(4096, 8)``, bags ``4096 x 20``.

    python bench/perf/seed_compare.py [--out bench/results/seed_compare_cpu.json]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, median_ms, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, BloomEmbeddingBag  # noqa: E402


def module_bytes(module):
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]  # the seed's cache
    return sum(t.numel() * t.element_size() for t in tensors)


def time_layers(layers, ids, repeats, sync):
    """Forward and forward+backward median ms of each ``name -> (module, fn)``."""
    results = {}
    for name, (module, fn) in layers.items():

        def step():
            fn(ids).sum().backward()
            module.embeddings.weight.grad = None

        results[name] = {
            "forward_ms": median_ms(lambda: fn(ids), repeats, sync=sync),
            "forward_backward_ms": median_ms(step, repeats, sync=sync),
            "module_bytes": module_bytes(module),
        }
    return results


def ratios(results):
    seed, ours = results["seed"], results["triton_bloom"]
    return {
        "forward_speedup": seed["forward_ms"] / ours["forward_ms"],
        "forward_backward_speedup": seed["forward_backward_ms"] / ours["forward_backward_ms"],
        "memory_ratio": seed["module_bytes"] / ours["module_bytes"],
    }


def run(args, device):
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    seed = SpotlightBloomEmbedding(args.num_embeddings, args.embedding_dim, args.ratio, args.k).to(device)
    ours = BloomEmbedding(args.num_embeddings, args.embedding_dim, args.ratio, args.k).to(device)
    ours.load_state_dict(seed.state_dict())
    ids = torch.randint(0, args.num_embeddings, (args.batch, args.seq), device=device)
    # Same outputs, or the timing would compare different functions.
    torch.testing.assert_close(ours(ids), seed(ids), atol=1e-5, rtol=1e-5)
    embedding = time_layers({"seed": (seed, seed), "triton_bloom": (ours, ours)}, ids, args.repeats, sync)

    # Bags: Spotlight's padding id 0 is left out of our pooling too.
    bag = BloomEmbeddingBag(args.num_embeddings, args.embedding_dim, args.ratio, args.k, mode="sum", padding_idx=0)
    bag.load_state_dict(seed.state_dict())
    bag.to(device)
    bags = torch.randint(0, args.num_embeddings, (args.batch, args.bag_length), device=device)

    def seed_bags(b):
        return seed(b).sum(1)

    torch.testing.assert_close(bag(bags), seed_bags(bags), atol=1e-4, rtol=1e-5)
    bags_result = time_layers({"seed": (seed, seed_bags), "triton_bloom": (bag, bag)}, bags, args.repeats, sync)
    return {"embedding": embedding, "bag": bags_result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-embeddings", type=int, default=1_000_000)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--bag-length", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    results = run(args, device)
    summary = {name: ratios(r) for name, r in results.items()}
    env = environment()
    hardware = env["cpu"] if device.type == "cpu" else env.get("gpu")
    print(f"triton_bloom vs Spotlight's BloomEmbedding on {device} ({hardware}), median of {args.repeats} runs")
    print(f"num_embeddings={args.num_embeddings:,} embedding_dim={args.embedding_dim} k={args.k} ratio={args.ratio}")
    shapes = {"embedding": f"ids ({args.batch}, {args.seq})", "bag": f"{args.batch} bags of {args.bag_length} ids, sum"}
    for name, result in results.items():
        print(f"\n{name}: {shapes[name]}\n")
        rows = [
            [layer, f"{r['forward_ms']:.2f}", f"{r['forward_backward_ms']:.2f}", f"{r['module_bytes'] / 2**20:.1f}"]
            for layer, r in result.items()
        ]
        s = summary[name]
        rows.append(
            [
                "seed / triton_bloom",
                f"{s['forward_speedup']:.2f}x",
                f"{s['forward_backward_speedup']:.2f}x",
                f"{s['memory_ratio']:.2f}x",
            ]
        )
        print(markdown_table(["layer", "forward ms", "forward+backward ms", "module MiB"], rows))
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "seed_compare",
                "device": str(device),
                "environment": env,
                "config": config,
                "results": results,
                "ratios": summary,
            },
        )
        print(f"\nwrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
