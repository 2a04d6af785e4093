"""BloomEmbedding against Spotlight's BloomEmbedding on this machine.

Times the forward and the forward+backward of both layers on the same ids in
one run, and reports the ratios (seed time / our time), with the module
memory of each.  Defaults are the core issue's setting:
``num_embeddings=1_000_000, embedding_dim=64, k=4``, ids of shape ``(4096, 8)``.

    python bench/seed_compare.py [--out bench/results/seed_compare_cpu.json]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, median_ms, write_json  # noqa: E402
from triton_bloom import BloomEmbedding  # noqa: E402


def module_bytes(module):
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]  # the seed's cache
    return sum(t.numel() * t.element_size() for t in tensors)


def run(num_embeddings, embedding_dim, k, batch, seq, ratio, repeats, device):
    torch.manual_seed(0)
    seed = SpotlightBloomEmbedding(num_embeddings, embedding_dim, ratio, k).to(device)
    ours = BloomEmbedding(num_embeddings, embedding_dim, ratio, k).to(device)
    ours.load_state_dict(seed.state_dict())
    ids = torch.randint(0, num_embeddings, (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    # Same outputs, or the timing compares different functions.
    torch.testing.assert_close(ours(ids), seed(ids), atol=1e-5, rtol=1e-5)

    def forward(module):
        return lambda: module(ids)

    def train_step(module):
        def step():
            module(ids).sum().backward()
            module.embeddings.weight.grad = None

        return step

    results = {}
    for name, module in (("seed", seed), ("triton_bloom", ours)):
        results[name] = {
            "forward_ms": median_ms(forward(module), repeats, sync=sync),
            "forward_backward_ms": median_ms(train_step(module), repeats, sync=sync),
            "module_bytes": module_bytes(module),
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-embeddings", type=int, default=1_000_000)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = {k: getattr(args, k) for k in ("num_embeddings", "embedding_dim", "k", "batch", "seq", "ratio", "repeats")}
    results = run(args.num_embeddings, args.embedding_dim, args.k, args.batch, args.seq, args.ratio, args.repeats, device)
    seed, ours = results["seed"], results["triton_bloom"]
    ratios = {
        "forward_speedup": seed["forward_ms"] / ours["forward_ms"],
        "forward_backward_speedup": seed["forward_backward_ms"] / ours["forward_backward_ms"],
        "memory_ratio": seed["module_bytes"] / ours["module_bytes"],
    }
    env = environment()
    print(f"BloomEmbedding vs Spotlight's BloomEmbedding on {device} ({env['cpu'] if device.type == 'cpu' else env.get('gpu')})")
    print(f"num_embeddings={args.num_embeddings:,} embedding_dim={args.embedding_dim} k={args.k} "
          f"ids=({args.batch}, {args.seq}) ratio={args.ratio}; median of {args.repeats} runs\n")  # fmt: skip
    rows = [
        [name, f"{r['forward_ms']:.2f}", f"{r['forward_backward_ms']:.2f}", f"{r['module_bytes'] / 2**20:.1f}"]
        for name, r in results.items()
    ]
    rows.append(["seed / triton_bloom", f"{ratios['forward_speedup']:.2f}x", f"{ratios['forward_backward_speedup']:.2f}x",
                 f"{ratios['memory_ratio']:.2f}x"])  # fmt: skip
    print(markdown_table(["layer", "forward ms", "forward+backward ms", "module MiB"], rows))
    if args.out:
        write_json(args.out, {"benchmark": "seed_compare", "device": str(device), "environment": env,
                              "config": config, "results": results, "ratios": ratios})  # fmt: skip
        print(f"\nwrote {args.out}")
    return ratios


if __name__ == "__main__":
    main()
