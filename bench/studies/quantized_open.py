"""Quantized Bloom rows in the open-id regime: the stream, training and
scoring of ``triton-bloom demo --quick`` (``triton_bloom/demo_open.py``,
imported unchanged), at its budget of 2 B per distinct training id.

Trained in float32 (SparseAdam, the quick demo's learning rate), then
served as trained and quantized after training: plain Bloom k=2 at the
budget's fp32 rows (and its int8/int4 rows, below the budget), and Bloom
k=2 with the rows int8 (then int4) rows buy at the budget, quantized; the
vocabulary table of the most frequent ids + an OOV row (fp32, the rival a
user tries first) as the reference.  Run: ``python -m
bench.studies.quantized_open --seeds 0``; writes
``bench/results/quantized_open_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import triton

from triton_bloom import BloomEmbedding, embedding_bytes, quantize
from triton_bloom.demo_layers import layer_specs
from triton_bloom.demo_open import BYTES_PER_ID, EMBEDDING_DIM, QUICK_LEARNING_RATES, evaluate, train
from triton_bloom.demo_stream import QUICK, eval_set, make_stream

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def run_seed(seed, log):
    stream = make_stream(QUICK, seed)
    ids, counts = stream.train_counts()
    events = stream.split("train")
    test = eval_set(stream, "test", QUICK.eval_events, seed + 2)
    budget = BYTES_PER_ID * ids.numel()
    lr = QUICK_LEARNING_RATES[0]
    d = EMBEDDING_DIM
    rows = []

    def record(label, layer, trained_bytes):
        metrics = evaluate(layer, test)
        rows.append(
            dict(
                seed=seed,
                label=label,
                budget=budget,
                bytes=embedding_bytes(layer),
                trained_bytes=trained_bytes,
                **metrics,
            )
        )
        log(f"seed {seed} {label}: {embedding_bytes(layer) / budget:.3f} of budget, HR@10 {metrics['hr@10']:.4f}")

    def trained(build, index):
        torch.manual_seed(1000 * seed + index)
        layer = build()
        started = time.perf_counter()
        train(layer, stream, events, lr)
        log(f"seed {seed} trained {index} in {time.perf_counter() - started:.0f} s")
        return layer

    label, build, _ = layer_specs(ids, counts, d, budget, full=False, planner=False)[0]
    record(label + " fp32", trained(lambda: build(True), 0), None)
    for index, (bits, row) in enumerate(((None, 4 * d), (8, d + 4), (4, d // 2 + 4)), start=1):
        num_rows = budget // row
        layer = trained(
            lambda num_rows=num_rows: BloomEmbedding(
                None, d, num_rows=num_rows, num_hash_functions=2, padding_idx=None, sparse=True
            ),
            index,
        )
        name = f"Bloom k=2 {num_rows:,} rows"
        record(name + " fp32", layer, embedding_bytes(layer))
        for quantized_bits in (8, 4) if bits is None else (bits,):
            record(f"{name} int{quantized_bits}", quantize(layer, bits=quantized_bits), embedding_bytes(layer))
    return rows, dict(budget=budget, distinct_train_ids=ids.numel(), train_events=events.numel(), lr=lr)


def render(result) -> str:
    meta = result["meta"]
    lines = [
        "# Quantized Bloom rows, open ids (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['seconds'] / 60:.0f} min.  Produced by "
        "`python -m bench.studies.quantized_open` (`bench/studies/quantized_open.py`).",
        "",
        "Setup: the stream, model, training and scoring of `triton-bloom demo --quick` (raw int64 item ids, "
        f"dim {EMBEDDING_DIM}, SparseAdam lr {meta['setup']['lr']}, one pass), budget {BYTES_PER_ID} B per distinct "
        f"training id (about {meta['setup']['budget']:,} B; each seed's own), seeds {', '.join(map(str, meta['seeds']))}.  Every layer "
        "trains in fp32; int8/int4 rows are quantized after training.  Bytes: the served layer's "
        "(`embedding_bytes`), as a share of the budget; the 'more rows' layers trained at their fp32 size "
        "(trained bytes).  HR@10 and AUC on the test events (all, and those on items seen at most a few times "
        "in training: rare).",
        "",
        "| seed | layer | bytes / budget | trained bytes / budget | HR@10 | HR@10 rare | AUC |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        budget = r["budget"]
        trained = "-" if r["trained_bytes"] is None else f"{r['trained_bytes'] / budget:.2f}"
        lines.append(
            f"| {r['seed']} | {r['label']} | {r['bytes'] / budget:.3f} | {trained} | {r['hr@10']:.4f} | "
            f"{r['hr@10_rare']:.4f} | {r['auc']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_open_cpu"))
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
    else:
        started, load_before = time.perf_counter(), os.getloadavg()
        runs, setup = [], None
        for seed in args.seeds:
            seed_runs, setup = run_seed(seed, lambda line: print(line, flush=True))
            runs += seed_runs
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        )
        meta = dict(
            date=datetime.date.today().isoformat(),
            cpu=cpu,
            torch=torch.__version__,
            triton=triton.__version__,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=round(time.perf_counter() - started),
            setup=setup,
            seeds=args.seeds,
        )
        result = dict(meta=meta, runs=runs)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))


if __name__ == "__main__":
    main()
