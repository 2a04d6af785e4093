"""bf16 tables trained with stochastic rounding against float32 and against
bf16 round-to-nearest, on the same training run (issue 23, item 3).

The setup is the closed-vocabulary two-tower model of ``triton-bloom demo
--closed --quick`` (its data at its size, model, BPR training and metrics,
imported from ``triton_bloom/demo.py``): Bloom item tables (ratio 0.2 by
default, k=4, dim 32) trained by a fused optimizer inside the backward, the
per-item bias by ``torch.optim`` (float32 in every run).  Three runs per seed, identical but for the tables:

- ``fp32``: float32 tables;
- ``bf16 nearest``: bfloat16 tables, ``stochastic_rounding=False``;
- ``bf16 stochastic``: bfloat16 tables, stochastic rounding (the default).

Per seed the data, the initial weights (drawn in float32, then cast) and the
batches are the same for the three.  Run: ``python -m bench.studies.stochastic_rounding``
(``--seeds 0 1 2``, ``--optimizer sgd|adagrad``, ``--ratio``, ``--lr``); writes
``bench/results/stochastic_rounding_cpu.{md,json}``.  The recorded page
combines two runs, each section with its command: the default, and
``--ratio 1.0 --lr 3 --out bench/results/stochastic_rounding_cpu_small_updates``
(a row per id, whose small updates are where round-to-nearest loses them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD
from triton_bloom.demo import TwoTower, make_dataset, metrics, model_ranks, train_epoch, user_vectors

DIM, K = 32, 4
RATIO = 0.2
HISTORY, BATCH, L2 = 16, 1024, 1e-4
SIZE = dict(users=5_000, items=2_500, epochs=8)
# Learning rates, picked once on seed 0's float32 run among 10, 30 and 100
# (SGD; the loss is a mean over the batch, hence the size).
LR = {"sgd": 30.0, "adagrad": 0.05}
RUNS = ("fp32", "bf16 nearest", "bf16 stochastic")
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def build(run, optimizer, lr, num_items, seed, ratio=RATIO):
    """The two towers with Bloom tables of ``run``'s dtype and rounding."""
    dtype = torch.float32 if run == "fp32" else torch.bfloat16
    make = FusedSGD if optimizer == "sgd" else FusedRowWiseAdagrad
    common = dict(compression_ratio=ratio, num_hash_functions=K, padding_idx=None, backend="torch")
    stochastic = run == "bf16 stochastic"
    torch.manual_seed(seed)
    history = BloomEmbeddingBag(
        num_items, DIM, mode="mean", fused_optimizer=make(lr=lr, stochastic_rounding=stochastic, seed=seed), **common
    )
    items = BloomEmbedding(
        num_items, DIM, fused_optimizer=make(lr=lr, stochastic_rounding=stochastic, seed=seed + 1000), **common
    )
    # Drawn in float32 (the same draw for the three runs), then cast.
    return TwoTower(_Float(history.to(dtype)), _Float(items.to(dtype)), num_items)


class _Float(torch.nn.Module):
    """A table whose vectors reach the rest of the model in float32."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, *args, **kwargs):
        return self.table(*args, **kwargs).float()

    @property
    def weight(self):
        return self.table.weight


def run_one(run, data, optimizer, lr, epochs, seed, ratio=RATIO):
    model = build(run, optimizer, lr, data.num_items, seed, ratio)
    bias_optimizer = torch.optim.SGD(model.item_bias.parameters(), lr=lr if optimizer == "sgd" else 0.0)
    if optimizer == "adagrad":
        bias_optimizer = torch.optim.Adagrad(model.item_bias.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        losses.append(train_epoch(model, bias_optimizer, data, BATCH, HISTORY, L2, generator))
    with torch.no_grad():
        auc, hits = metrics(model_ranks(_Scored(model), data, user_vectors(model, data)), data)
    return dict(auc=auc, hr10=hits, losses=losses)


class _Scored(TwoTower):
    """The trained model with its item table read out in float32 for ranking."""

    def __init__(self, model):
        torch.nn.Module.__init__(self)
        self.history = model.history
        with torch.no_grad():
            self.items = torch.nn.Embedding.from_pretrained(
                model.items(torch.arange(model.item_bias.weight.shape[0])).float()
            )
        self.item_bias = model.item_bias


def machine():
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return cpu


def render(result) -> str:
    meta, setup = result["meta"], result["meta"]["setup"]
    summary = result["summary"]
    lines = [
        "# bf16 tables: stochastic rounding against round-to-nearest and float32 (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"{meta['seconds'] / 60:.0f} min.  Produced by `{meta['command']}` (`bench/studies/stochastic_rounding.py`).",
        "",
        f"Setup: the closed-vocabulary two-tower model of `triton-bloom demo --closed --quick` "
        f"({setup['users']:,} users x {setup['items']:,} items, {setup['interactions']:,} interactions, one per "
        f"user held out); Bloom item tables (ratio {setup['ratio']}, k={setup['k']}, dim {setup['dim']}) trained "
        f"by the fused {setup['optimizer']} (lr {setup['lr']}), batch "
        f"{setup['batch']}, {setup['epochs']} epochs, BPR; the item bias in float32 by torch.optim.  Per seed "
        "the three runs share data, initial weights (bf16: the float32 draw cast) and batches.  PyTorch path "
        "(`backend='torch'`), whose stochastic rounding draws the same bits as the kernels'.",
        "",
        "| tables | AUC | HR@10 | final training loss |",
        "|---|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['run']} | {r['auc_mean']:.4f} +- {r['auc_sd']:.4f} | {r['hr10_mean']:.4f} +- "
            f"{r['hr10_sd']:.4f} | {r['loss_mean']:.4f} |"
        )
    lines += ["", "Per seed (AUC, HR@10):", ""]
    for seed in meta["seeds"]:
        cells = [
            f"{run}: {r['auc']:.4f}, {r['hr10']:.4f}"
            for run in RUNS
            for r in result["runs"]
            if r["seed"] == seed and r["run"] == run
        ]
        lines.append(f"- seed {seed}: " + "; ".join(cells))
    lines += ["", result["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(runs, seeds) -> str:
    """Whether each bf16 run's mean AUC and final loss lie within the float32
    runs' range over the seeds, and the paired differences, in words."""

    def value(run, seed, key):
        r = next(r for r in runs if r["run"] == run and r["seed"] == seed)
        return r["losses"][-1] if key == "loss" else r[key]

    words = []
    for key, name in (("auc", "AUC"), ("loss", "final training loss")):
        fp32 = [value("fp32", s, key) for s in seeds]
        lo, hi = min(fp32), max(fp32)
        for run in RUNS[1:]:
            mean = statistics.mean(value(run, s, key) for s in seeds)
            deltas = [value(run, s, key) - value("fp32", s, key) for s in seeds]
            inside = "inside" if lo <= mean <= hi else "outside"
            words.append(
                f"{run}: mean {name} {mean:.4f}, {inside} the float32 runs' range [{lo:.4f}, {hi:.4f}]; "
                "minus float32's, seed by seed: " + ", ".join(f"{d:+.4f}" for d in deltas) + "."
            )
    return "Reading (as measured):\n\n" + "\n".join(f"- {w}" for w in words)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizer", choices=sorted(LR), default="sgd")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ratio", type=float, default=RATIO, help="the tables' compression_ratio")
    parser.add_argument("--epochs", type=int, default=SIZE["epochs"])
    parser.add_argument("--users", type=int, default=SIZE["users"])
    parser.add_argument("--items", type=int, default=SIZE["items"])
    parser.add_argument("--out", default=os.path.join(RESULTS, "stochastic_rounding_cpu"))
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(render(result))
        return 0
    torch.set_num_threads(1)
    lr = args.lr if args.lr is not None else LR[args.optimizer]
    started, load_before = time.time(), os.getloadavg()
    runs, interactions = [], 0
    for seed in args.seeds:
        data = make_dataset(args.users, args.items, seed=seed)
        interactions = data.num_interactions
        for run in RUNS:
            t0 = time.perf_counter()
            r = run_one(run, data, args.optimizer, lr, args.epochs, seed, args.ratio)
            runs.append(dict(seed=seed, run=run, **r))
            print(f"seed {seed} {run}: AUC {r['auc']:.4f} HR@10 {r['hr10']:.4f} loss {r['losses'][-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    summary = []
    for run in RUNS:
        group = [r for r in runs if r["run"] == run]
        aucs, hits = [r["auc"] for r in group], [r["hr10"] for r in group]
        summary.append(
            dict(
                run=run,
                auc_mean=statistics.mean(aucs),
                auc_sd=statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                hr10_mean=statistics.mean(hits),
                hr10_sd=statistics.stdev(hits) if len(hits) > 1 else 0.0,
                loss_mean=statistics.mean(r["losses"][-1] for r in group),
            )
        )
    result = dict(
        meta=dict(
            date=datetime.date.today().isoformat(),
            command="python -m bench.studies.stochastic_rounding " + " ".join(sys.argv[1:] if argv is None else argv),
            cpu=machine(),
            torch=torch.__version__,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=time.time() - started,
            seeds=args.seeds,
            setup=dict(
                users=args.users,
                items=args.items,
                interactions=interactions,
                ratio=args.ratio,
                k=K,
                dim=DIM,
                optimizer=args.optimizer,
                lr=lr,
                batch=BATCH,
                epochs=args.epochs,
            ),
        ),
        runs=runs,
        summary=summary,
        verdict=verdict(runs, args.seeds),
    )
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
