"""Two processes train a model whose Bloom table is sharded row-wise by TorchRec.

Runs on CPU (gloo) as written; on GPUs pass ``--backend nccl`` and each rank
uses its own CUDA device.  It prints what the k-fold ids cost: the bytes of
one rank's ``KeyedJaggedTensor`` before and after the Bloom transform (what
enters the input all-to-all), and the time of a training step.

    python examples/torchrec_example.py                 # k = 4, 2 ranks, CPU
    python examples/torchrec_example.py --k 1 --batch 4096 --bag 20
"""

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


class Model(nn.Module):
    """A user's history (a bag of item ids) through a Bloom table, then an MLP."""

    def __init__(self, args, device):
        super().__init__()
        from triton_bloom import BloomEmbeddingBag
        from triton_bloom.torchrec import BloomEmbeddingBagCollection

        # Only the hashing and sizes are read: build it on the meta device.
        history = BloomEmbeddingBag(
            args.items,
            args.dim,
            compression_ratio=0.2,
            num_hash_functions=args.k,
            mode=args.mode,
            padding_idx=0,
            device="meta",
        )
        self.sparse = BloomEmbeddingBagCollection({"history": history}, device=torch.device("meta"))
        self.mlp = nn.Sequential(nn.Linear(args.dim, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)

    def forward(self, features):
        return self.mlp(self.sparse(features).values()).squeeze(1)


def batch(args, rank, step, device):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 2 * args.bag + 1, (args.batch,), generator=g)
    ids = torch.randint(0, args.items, (int(lengths.sum()),), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(["history"], ids, lengths)
    return kjt.to(device), labels.to(device)


def kjt_bytes(kjt):
    weights = kjt.weights_or_none()
    tensors = [kjt.values(), kjt.lengths()] + ([weights] if weights is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def run(rank, args, port):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingPlan

    from triton_bloom import BloomEmbeddingBag
    from triton_bloom.torchrec import copy_weights_from_collection

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=args.world_size)
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.world_size))
    torch.manual_seed(0)
    model = Model(args, device)

    # FBGEMM trains the table inside the backward ("fused"): name the kernel
    # and the optimizer, or a hand-built plan trains nothing as you meant.
    sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05, "eps": 1e-8}
    )
    plan = construct_module_sharding_plan(
        model.sparse.ebc,
        {"history": row_wise(compute_kernel="fused")},
        sharder=sharder,
        local_size=args.world_size,
        world_size=args.world_size,
        device_type=device.type,
    )
    model = DistributedModelParallel(model, device=device, plan=ShardingPlan({"sparse.ebc": plan}), sharders=[sharder])
    dense = torch.optim.Adagrad([p for n, p in model.named_parameters() if "ebc" not in n], lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()

    times = []
    for step in range(args.steps):
        features, labels = batch(args, rank, step, device)
        start = time.perf_counter()
        loss = loss_fn(model(features), labels)
        loss.backward()  # the Bloom table's fused Adagrad step happens here
        dense.step()
        dense.zero_grad()
        times.append(time.perf_counter() - start)

    # The k-fold ids: what this rank sends into the input all-to-all.
    features, _ = batch(args, rank, args.steps, device)
    transform = model.module.sparse.transform
    before, after = kjt_bytes(features), kjt_bytes(transform(features))

    # The trained table back in a plain BloomEmbeddingBag (a collective).
    history = BloomEmbeddingBag(
        args.items,
        args.dim,
        compression_ratio=0.2,
        num_hash_functions=args.k,
        mode=args.mode,
        padding_idx=0,
        device=device,
    )
    copy_weights_from_collection(model, {"history": history})
    with torch.no_grad():
        sharded = model.module.sparse(features).values()
        jt = features["history"]
        plain = history(jt.values(), jt.offsets()[:-1])
    if rank == 0:
        report = {
            "k": args.k,
            "mode": args.mode,
            "ranks": args.world_size,
            "batch_per_rank": args.batch,
            "ids_per_rank": features.values().numel(),
            "kjt_bytes_before": before,
            "kjt_bytes_after": after,
            "ratio": round(after / before, 2),
            "step_ms_median": round(1000 * sorted(times[1:] or times)[len(times[1:] or times) // 2], 1),
            "loss": round(loss.item(), 4),
            "max_diff_sharded_vs_bloom": float((sharded - plain).abs().max()),
        }
        print(json.dumps(report))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="hash functions per id")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="samples per rank")
    parser.add_argument("--bag", type=int, default=10, help="mean ids per bag")
    parser.add_argument("--mode", default="mean", choices=["sum", "mean"], help="pooling (mean makes the KJT weighted)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run, args=(args, port), nprocs=args.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
