"""One full training step (forward, backward, optimizer) of an embedding
layer, timed in one run for the layouts a user would choose between:

- ``full_embedding_adam``: ``nn.Embedding`` at full size + ``torch.optim.Adam``;
- ``bloom_adam``: ``BloomEmbedding`` + ``torch.optim.Adam`` (dense gradient);
- ``bloom_sparse_adam``: ``BloomEmbedding(sparse=True)`` + ``torch.optim.SparseAdam``;
- ``bloom_fused_sgd`` / ``bloom_fused_rowwise_adagrad``: the fused sparse
  optimizers, which update the touched rows inside the backward.

Reports milliseconds per step (median), the ratio of the full table's step
time to each, and the bytes of weights plus optimizer state.  Defaults:
``num_embeddings=10_000_000``, ``embedding_dim=64``, Spotlight's ratio 0.2 and
``k=4``, a batch of 16384 ids.

    python bench/perf/train_step.py [--out bench/results/train_step_cpu.json]
"""

import argparse
import functools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.common import environment, markdown_table, median_ms, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, FusedRowWiseAdagrad, FusedSGD  # noqa: E402

LR = 0.01


def layouts(num_embeddings, dim, ratio, k, device):
    """``name -> (module, optimizer or None)`` builders, built one at a time so
    that the full table and its Adam state are freed before the next."""

    def full():
        module = nn.Embedding(num_embeddings, dim, device=device)
        return module, torch.optim.Adam(module.parameters(), lr=LR)

    def bloom(**kwargs):
        def build():
            module = BloomEmbedding(num_embeddings, dim, ratio, k, padding_idx=None, device=device, **kwargs)
            if kwargs.get("fused_optimizer") is not None:
                return module, None
            opt_class = torch.optim.SparseAdam if kwargs.get("sparse") else torch.optim.Adam
            return module, opt_class(module.parameters(), lr=LR)

        return build

    return {
        "full_embedding_adam": full,
        "bloom_adam": bloom(),
        "bloom_sparse_adam": bloom(sparse=True),
        "bloom_fused_sgd": bloom(fused_optimizer=FusedSGD(lr=LR)),
        "bloom_fused_rowwise_adagrad": bloom(fused_optimizer=FusedRowWiseAdagrad(lr=LR)),
    }


def state_bytes(module, optimizer):
    tensors = list(module.parameters())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    fused = getattr(module, "fused_optimizer", None)
    if fused is not None and getattr(fused, "accumulator", None) is not None:
        tensors.append(fused.accumulator)
    return sum(t.numel() * t.element_size() for t in tensors)


def training_step(module, optimizer, ids, target):
    """Forward, a squared-error loss, backward, and the optimizer's update
    (``optimizer`` is ``None`` for the fused ones, which update inside the
    backward).  A function, not a closure in ``run``, so that ``run`` can
    drop each layout with ``del`` before building the next."""
    loss = (module(ids) - target).pow(2).mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(num_embeddings, dim, ratio, k, batch, repeats, device, names=None):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_embeddings, (batch,), generator=g).to(device)
    target = torch.randn(batch, dim, generator=g).to(device)
    results = {}
    for name, build in layouts(num_embeddings, dim, ratio, k, device).items():
        if names and name not in names:
            continue
        module, optimizer = build()
        step = functools.partial(training_step, module, optimizer, ids, target)
        ms = median_ms(step, repeats, warmup=2, sync=sync)
        results[name] = {"ms": ms, "state_bytes": state_bytes(module, optimizer)}
        del module, optimizer, step
    base = results.get("full_embedding_adam")
    for r in results.values():
        r["speedup_vs_full_adam"] = base["ms"] / r["ms"] if base else None
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-embeddings", type=int, default=10_000_000)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = run(args.num_embeddings, args.embedding_dim, args.ratio, args.k, args.batch, args.repeats, device)
    env = environment()
    hardware = env["cpu"] if device.type == "cpu" else env.get("gpu")
    print(
        f"training step on {device} ({hardware}): num_embeddings={args.num_embeddings:,} "
        f"embedding_dim={args.embedding_dim} ratio={args.ratio} k={args.k} batch={args.batch}, "
        f"median of {args.repeats}\n"
    )
    rows = [
        [name, f"{r['ms']:.1f}", f"{r['speedup_vs_full_adam']:.2f}x", f"{r['state_bytes'] / 2**20:.0f}"]
        for name, r in results.items()
    ]
    print(markdown_table(["layout", "ms / step", "speed-up vs full + Adam", "weights + optimizer MiB"], rows))
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
        write_json(
            args.out,
            {
                "benchmark": "train_step",
                "device": str(device),
                "environment": env,
                "config": config,
                "results": results,
            },
        )
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
