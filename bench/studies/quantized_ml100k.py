"""Post-training int8/int4 quantization of trained Bloom tables on
MovieLens-100K, in the current format and the old one, on the same trained
models.

The model and protocol are ``quality.py``'s implicit task (BPR matrix
factorisation, leave-last-out split, full ranking of the held-out item
against every unseen item): Bloom tables for users and items at 0.2 of the
full tables' bytes, ``k = 4``, dim 32, trained in float32 with the learning
rate and L2 ``quality.py``'s tuning chose for that table on validation
(``bench/results/quality_cpu.json``: lr 0.005, L2 0.001), early stopping on
validation AUC.  Each trained model is scored as trained, through
``triton_bloom.quantize`` (int8, int4: both tables quantized, scored
through the quantized lookups by ``bloom_rank``) and with its tables in the
old format (``quantized_format.py``).  Run:
``python -m bench.studies.quantized_ml100k --seeds 0 1 2``; writes
``bench/results/quantized_ml100k_cpu.{md,json}``.  Needs ml-100k
(``bench/studies/data.py`` fetches it from the recbole wheel on PyPI).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import time

import numpy as np
import torch
import triton

from triton_bloom import embedding_bytes, quantize
from triton_bloom.quantized_ops import LAYOUT

from . import data as datasets
from .quality import HYPER, TableSpec, make_tasks
from .quantized_format import OLD_LAYOUT, new_round_trip, old_bytes, old_round_trip, relative_error, with_old_rows

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
SPEC = TableSpec("bloom", budget=0.2, k=4)
LR, L2 = 0.005, 0.001


def train(task, seed, log):
    """``quality.fit``'s loop, keeping the trained model (the best
    validation epoch's weights)."""
    hp = dataclasses.replace(task.hyper, lr=LR, l2=L2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.model(SPEC, hp)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    best, best_state, best_epoch = None, None, 0
    for epoch in range(1, hp.max_epochs + 1):
        model.train()
        task.epoch(model, optimizer, rng, hp)
        model.eval()
        valid = task.evaluate(model, "valid")[task.select]
        if best is None or valid > best:
            best, best_state, best_epoch = valid, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= hp.patience:
            break
    model.load_state_dict(best_state)
    log(f"seed {seed}: trained, best epoch {best_epoch}, valid AUC {best:.4f}")
    return model


def table_bytes(model) -> int:
    return embedding_bytes(model.users) + embedding_bytes(model.items)


def run_seed(task, seed, log):
    model = train(task, seed, log)
    rows = []

    def record(label, served, nbytes, error=None):
        metrics = task.evaluate(served, "test")
        rows.append(dict(seed=seed, label=label, bytes=nbytes, relative_error=error, **metrics))
        log(f"seed {seed} {label}: AUC {metrics['auc']:.4f} HR@10 {metrics['hr@10']:.4f} MRR {metrics['mrr']:.4f}")

    record("fp32", model, table_bytes(model))
    tables = (model.users.weight, model.items.weight)
    for bits in (8, 4):
        error = relative_error(torch.cat(tables), torch.cat([new_round_trip(w, bits) for w in tables]))
        quantized = quantize(model, bits=bits)
        record(f"int{bits}", quantized, table_bytes(quantized), error)
        error = relative_error(torch.cat(tables), torch.cat([old_round_trip(w, bits) for w in tables]))
        nbytes = sum(old_bytes(w.shape[0], w.shape[1], bits) for w in tables)
        record(f"int{bits} (old format)", with_old_rows(model, bits), nbytes, error)
    return rows, dict(users=model.users.num_rows, items=model.items.num_rows, dim=model.users.embedding_dim)


def render(result) -> str:
    meta, runs = result["meta"], result["runs"]
    full = meta["full_fp32_bytes"]
    lines = [
        "# Quantized Bloom tables on MovieLens-100K (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['seconds'] / 60:.0f} min.  Produced by "
        f"`python -m bench.studies.quantized_ml100k --seeds {' '.join(map(str, meta['seeds']))}` "
        "(`bench/studies/quantized_ml100k.py`).",
        "",
        "Setup: `quality.py`'s implicit task on ml-100k (BPR, leave-last-out, the held-out item ranked against "
        f"every unseen item), Bloom user and item tables at 0.2 of the full tables' bytes ({meta['rows']['users']} "
        f"and {meta['rows']['items']} rows of dim {meta['rows']['dim']}), k=4, lr {LR}, L2 {L2} (quality.py's "
        "tuned choice for this table), early stopping on validation AUC; seeds "
        f"{', '.join(map(str, meta['seeds']))} (init and sampling).  Quantized after training: current format "
        f"`{meta['layout']}`, old format `{meta['old_layout']}`, both on the same trained tables.  Bytes: both "
        "tables, as a share of the full fp32 tables.  Change: against the same trained model in fp32, per seed "
        "(mean +- sd).  Relative error: `||W - Q|| / ||W||` over both tables.",
        "",
        "| tables | bytes / full fp32 | AUC | change | HR@10 | change | MRR | relative error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["seed"]: r for r in runs if r["label"] == "fp32"}

    def mean_sd(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [r for r in runs if r["label"] == label]
        cells = [label, f"{rows[0]['bytes'] / full:.4f}"]
        for metric in ("auc", "hr@10"):
            cells.append("{:.4f} +- {:.4f}".format(*mean_sd([r[metric] for r in rows])))
            change = mean_sd([r[metric] - base[r["seed"]][metric] for r in rows])
            cells.append("-" if label == "fp32" else f"{change[0]:+.4f} +- {change[1]:.4f}")
        cells.append("{:.4f}".format(mean_sd([r["mrr"] for r in rows])[0]))
        errors = [r["relative_error"] for r in rows if r["relative_error"] is not None]
        cells.append(f"{statistics.fmean(errors):.4f}" if errors else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| seed | tables | AUC | HR@10 | MRR |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['label']} | {r['auc']:.4f} | {r['hr@10']:.4f} | {r['mrr']:.4f} |" for r in runs]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_ml100k_cpu"))
    parser.add_argument("--cache-dir", help="where ml-100k is kept")
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
    else:
        started, load_before = time.perf_counter(), os.getloadavg()
        (task,) = make_tasks(datasets.load_ml100k(args.cache_dir), ["implicit"], HYPER)
        runs, rows = [], None
        for seed in args.seeds:
            seed_runs, rows = run_seed(task, seed, lambda line: print(line, flush=True))
            runs += seed_runs
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
        train = task.split.train
        meta = dict(
            date=datetime.date.today().isoformat(),
            cpu=cpu,
            torch=torch.__version__,
            triton=triton.__version__,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=round(time.perf_counter() - started),
            seeds=args.seeds,
            rows=rows,
            full_fp32_bytes=(train.num_users + train.num_items) * rows["dim"] * 4,
            layout=LAYOUT,
            old_layout=OLD_LAYOUT,
        )
        result = dict(meta=meta, runs=runs)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))


if __name__ == "__main__":
    main()
